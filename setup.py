"""Builds lora_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build
and nvcc is found (or when forced).

Switches (environment):
  LORA_KERNELS_CUDA=auto|1|0   build the CUDA kernels when possible (auto, default) / always / never
  LORA_KERNELS_NO_EXTENSION=1  build no extension at all (pure-Python install: reference backend only)
  TORCH_CUDA_ARCH_LIST         CUDA archs, default "8.0;8.6;8.9;9.0+PTX" (PTX: newer GPUs JIT it)
  NVCC_THREADS                 nvcc --threads (default 2)
  MAX_JOBS                     ninja jobs (default: by free memory, ~3 GiB a job)
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _free_mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return int(info["MemAvailable"]) / 2**20
    except (OSError, KeyError, ValueError):
        return 8.0


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _want_cuda(torch) -> bool:
    mode = os.environ.get("LORA_KERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"LORA_KERNELS_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False
    possible = torch.version.cuda is not None and _cuda_home() is not None
    if mode == "1" and not possible:
        raise RuntimeError("LORA_KERNELS_CUDA=1 but torch is not a CUDA build or nvcc was not found (set CUDA_HOME)")
    if not possible:
        warnings.warn("building lora_kernels without CUDA kernels: torch has no CUDA or nvcc was not found")
    return possible


def _cuda_include_dirs():
    # pip's CUDA wheels put the toolkit headers torch needs (cusparse.h, ...) here.
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def extensions():
    if os.environ.get("LORA_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(_free_mem_gib() / 3)))))
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 for torch >= 2.10)
    kwargs = dict(
        name="lora_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda(torch):
        cuda_home = _cuda_home()
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        kwargs["include_dirs"] += _cuda_include_dirs()
        nvcc_flags = [
            "-O3",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        ]
        ext = cpp_extension.CUDAExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags + ["-DLORA_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA linear layer (dropout included) for PyTorch: C++/CUDA and Triton kernels",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "peft": ["peft>=0.13", "transformers>=4.45"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy"],
        "bench": ["pytest-benchmark", "peft>=0.13", "transformers>=4.45"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
