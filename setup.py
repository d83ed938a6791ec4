# SPDX-License-Identifier: Apache-2.0
"""Builds lora_kernels._C: the C++ CPU kernels always; the CUDA kernels where a GPU is visible, or
when forced. Project metadata lives in pyproject.toml.

torch must be installed before building (it provides the compiler flags and headers the extension
is built against), so install with `pip install --no-build-isolation .`; building an sdist needs
no torch.

Switches (environment):
  LORA_KERNELS_CUDA=auto|1|0   CUDA kernels where a GPU is visible and nvcc found (auto, default) / always / never
  LORA_KERNELS_NO_EXTENSION=1  build no extension at all (pure-Python install: reference backend only)
  TORCH_CUDA_ARCH_LIST         CUDA archs, default "8.0;8.6;8.9;9.0+PTX" (PTX: newer GPUs JIT it)
  NVCC_THREADS                 nvcc --threads (default 2)
  MAX_JOBS                     ninja jobs (default: by free memory, ~3 GiB a job)
"""

import glob
import importlib.util
import os
import sys

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
MIN_SETUPTOOLS = 77  # the SPDX `license = "Apache-2.0"` form of pyproject.toml

NO_TORCH_MESSAGE = """
lora_kernels: torch is not installed in the environment building this package.

The C++/CUDA extension is compiled against the torch it will run with, so torch has to be there
first and pip's build isolation (a fresh, torch-less build environment) has to be off:

    pip install torch                          # or the torch build you want, e.g. from the PyTorch index
    pip install --no-build-isolation .         # or: pip install --no-build-isolation lora_kernels-*.tar.gz

For a pure-Python install without compiled kernels (reference backend only):

    LORA_KERNELS_NO_EXTENSION=1 pip install .
"""


def _check_setuptools() -> None:
    major = int(setuptools.__version__.split(".")[0])
    if major < MIN_SETUPTOOLS:
        sys.exit(
            f"lora_kernels needs setuptools>={MIN_SETUPTOOLS} to build (found {setuptools.__version__}): "
            f'pip install -U "setuptools>={MIN_SETUPTOOLS}" wheel'
        )


def _build_policy():
    """lora_kernels/_extension.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_lora_kernels_build_policy", os.path.join(ROOT, "lora_kernels", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return int(info["MemAvailable"]) / 2**20
    except (OSError, KeyError, ValueError):
        return 8.0


def _cuda_include_dirs():
    # pip's CUDA wheels put the toolkit headers torch needs (cusparse.h, ...) here.
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


class TorchMissingBuildExt(build_ext):
    """Stands in for torch's BuildExtension when torch is not importable: metadata and sdists
    build without torch; compiling the extension stops here with what to do instead."""

    def run(self):
        sys.exit(NO_TORCH_MESSAGE)


def extensions():
    """(ext_modules, cmdclass) for setup()."""
    if os.environ.get("LORA_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    try:
        from torch.utils import cpp_extension
    except ModuleNotFoundError:
        return [Extension("lora_kernels._C", sources=sources)], {"build_ext": TorchMissingBuildExt}

    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(_free_mem_gib() / 3)))))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch
    kwargs = dict(
        name="lora_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    policy = _build_policy()
    no_cuda_reason = policy.cuda_build_reason()
    if no_cuda_reason is None:
        cuda_home = policy.cuda_home()
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
        print(f"lora_kernels: building the C++ CPU and CUDA kernels ({os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = cpp_extension.CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx_flags + ["-DLORA_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
            **kwargs,
        )
    else:
        print(f"lora_kernels: building the C++ CPU kernels only ({no_cuda_reason})")
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


_check_setuptools()
ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
