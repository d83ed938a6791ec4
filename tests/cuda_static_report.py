# SPDX-License-Identifier: Apache-2.0
"""Static report of the CUDA kernels (csrc/cuda): what ptxas makes of each kernel for sm_80 (A100) and
sm_90 (H100), checked against the launch plans (launchers.h) on those GPUs — without a GPU.

    python -m tests.cuda_static_report [--arch 80 --arch 90] [--out bench/results/cuda-static-report.txt]

Each .cu is compiled with `nvcc -cubin -Xptxas -v` (device code only, the flags of setup.py); for every
kernel instance the table gives registers, spill bytes and static shared memory, and for the LLM
shapes the plan's grid, dynamic shared memory and blocks per SM next to the blocks per SM the compiled
kernel really gets (registers, shared memory and threads, with the hardware's allocation rules). The
plans come from the emulated backend (csrc/cuda/emulation: the same launchers.h, compiled for the CPU).

The run fails (exit 1, the failures listed) when a hot kernel spills for r <= 64, a block needs more
shared memory than the arch allows, a kernel gets fewer blocks per SM than its plan assumes, or the
split-K A-projection takes more than one wave. tests/test_cuda_static_report.py runs it in CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNEL_FILES = ["dropout_project.cu", "backward_dy.cu", "backward_dx.cu", "lora_expand.cu"]
HOT = ("project_kernel", "dy_pass_kernel", "dx_da_kernel", "expand_kernel")

# Per arch: the GPU its plan is evaluated on, and the per-SM limits of that arch.
GPUS = {
    80: dict(name="A100", num_sms=108, smem_per_sm=164 * 1024, smem_optin=163 * 1024, max_threads=2048),
    90: dict(name="H100", num_sms=132, smem_per_sm=228 * 1024, smem_optin=227 * 1024, max_threads=2048),
}
REGS_PER_SM, REG_UNIT, MAX_BLOCKS_PER_SM, SMEM_RESERVED, THREADS = 65536, 256, 32, 1024, 256
# The LLM shapes of the benchmark (M, K, N), decode included, and the ranks checked.
SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (16, 4096, 4096), (1, 4096, 14336)]
RANKS = [16, 64]
DTYPE_NAMES = {"__half": "float16", "__nv_bfloat16": "bfloat16", "float": "float32", "double": "float64"}


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _include_dirs() -> list[str]:
    import site

    from torch.utils import cpp_extension

    dirs = [CSRC] + cpp_extension.include_paths()
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return dirs


@dataclass
class KernelInfo:
    family: str  # project_kernel, ...
    dtype: str  # float16, bfloat16, float32, float64
    nr: int
    operand: str  # expand_kernel: the dtype of its rank operand (g: float32 in backward), else ""
    regs: int
    spill_stores: int
    spill_loads: int
    static_smem: int


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        raise RuntimeError("c++filt (binutils) is needed to read the kernel names")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def compile_and_read(path: str, arch: int) -> list[KernelInfo]:
    """ptxas figures of every hot kernel instance in one .cu for sm_<arch>."""
    cmd = [
        nvcc_path(), "-cubin", f"-arch=sm_{arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas", "-v",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "-o", os.devnull, path,
    ] + [f"-I{d}" for d in _include_dirs()]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path} (sm_{arch}):\n{res.stderr[-4000:]}")
    entries, current = [], None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = {"name": m.group(1)}
            entries.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spills"] = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    infos = []
    for e, name in zip(entries, _demangle([e["name"] for e in entries])):
        m = re.search(r"(\w+_kernel)<([\w:]+)(?:, ([\w:]+))?, (\d)>", name)
        if not m or m.group(1) not in HOT:
            continue
        dtype = DTYPE_NAMES[m.group(2)]
        operand = DTYPE_NAMES[m.group(3)] if m.group(3) else ""
        infos.append(KernelInfo(m.group(1), dtype, int(m.group(4)), operand, e["regs"], *e["spills"], e["smem"]))
    return infos


def load_emulation():
    """torch.ops.lora_kernels_emu: the cuda backend compiled for the CPU (built once per source state)."""
    import torch
    from torch.utils.cpp_extension import load

    sources = sorted(
        glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))
        + glob.glob(os.path.join(CSRC, "cuda", "*.h")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))
        + glob.glob(os.path.join(CSRC, "cuda", "emulation", "*")) + glob.glob(os.path.join(CSRC, "*.h"))
    )
    digest = hashlib.sha1()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    load(
        name=f"lora_kernels_cuda_emu_{digest.hexdigest()[:10]}",
        sources=[os.path.join(CSRC, "cuda", "emulation", "emulated_ops.cpp")],
        extra_include_paths=[CSRC],
        extra_cflags=["-O2", "-DLK_EMULATE", "-Wno-unknown-pragmas"],
        is_python_module=False,
    )
    return torch.ops.lora_kernels_emu


def occupancy(info: KernelInfo, dyn_smem: int, gpu: dict) -> int:
    """Blocks of 256 threads per SM the hardware runs: registers (per-warp allocation in units of
    256), shared memory (+1 KiB reserved per block) and threads."""
    regs_per_warp = math.ceil(info.regs * 32 / REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // (THREADS // 32)
    by_smem = gpu["smem_per_sm"] // (dyn_smem + info.static_smem + SMEM_RESERVED)
    return min(by_regs, by_smem, gpu["max_threads"] // THREADS, MAX_BLOCKS_PER_SM)


PLAN_KERNELS = [  # plan_on_device's order: (family, operand of expand_kernel or None)
    ("project_kernel", None), ("dy_pass_kernel", None), ("dx_da_kernel", None),
    ("expand_kernel", "grad"), ("expand_kernel", "out"),
]


def _instance(infos, family, dtype, nr, which):
    for k in infos:
        if k.family != family or k.dtype != dtype or k.nr != nr:
            continue
        if which == "grad" and k.operand != ("float64" if dtype == "float64" else "float32"):
            continue
        if which == "out" and k.operand != dtype:
            continue
        return k
    raise LookupError(f"no compiled {family}<{dtype}, NR={nr}> ({which})")


def report(archs, dtypes=("bfloat16", "float16"), shapes=SHAPES, ranks=RANKS, jobs=2):
    """Returns (lines of the report, list of failures)."""
    import torch

    emu = load_emulation()
    jobs_list = [(f, a) for a in archs for f in KERNEL_FILES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda fa: compile_and_read(os.path.join(CSRC, "cuda", fa[0]), fa[1]), jobs_list))
    compiled = {a: [] for a in archs}
    for (_, a), infos in zip(jobs_list, results):
        compiled[a] += infos

    lines, failures = [], []
    lines.append("Compiled kernels (nvcc -Xptxas -v): registers, spill stores/loads (bytes), static smem (bytes)")
    lines.append(f"{'arch':6}{'kernel':16}{'dtype':10}{'operand':9}{'NR':>3}{'regs':>6}{'spill':>9}{'smem':>6}")
    for a in archs:
        for k in sorted(compiled[a], key=lambda k: (k.family, k.dtype, k.operand, k.nr)):
            spill = f"{k.spill_stores}/{k.spill_loads}"
            lines.append(f"sm_{a:<3}{k.family[:-7]:16}{k.dtype:10}{k.operand or '-':9}{k.nr:>3}{k.regs:>6}{spill:>9}{k.static_smem:>6}")
            if k.spill_stores or k.spill_loads:  # every instance has NR <= 4, i.e. serves r <= 64
                failures.append(f"sm_{a} {k.family}<{k.dtype}, NR={k.nr}>: spills {spill} bytes")

    lines.append("")
    lines.append("Launch plans on the arch's GPU: grid, dynamic smem per block, blocks/SM the plan assumes vs the")
    lines.append("compiled kernel gets (registers, smem, threads), waves = grid / (SMs x blocks/SM the kernel gets)")
    lines.append(f"{'gpu':6}{'M':>6}{'K':>6}{'N':>6}{'r':>4} {'dtype':9}{'kernel':12}{'NR':>3}{'grid':>6}{'smem':>8}{'plan':>5}{'gets':>5}{'waves':>7}")
    for a in archs:
        gpu = GPUS[a]
        for dtype in dtypes:
            for (M, K, N) in shapes:
                for r in ranks:
                    plan = emu.plan_on_device(M, K, N, r, getattr(torch, dtype), gpu["num_sms"], gpu["smem_per_sm"], gpu["smem_optin"])
                    for i, (family, which) in enumerate(PLAN_KERNELS):
                        grid, smem, assumed, nr = plan[4 * i : 4 * i + 4]
                        k = _instance(compiled[a], family, dtype, nr, which)
                        gets = occupancy(k, smem, gpu)
                        waves = grid / (gpu["num_sms"] * max(gets, 1))
                        label = family[:-7] + ("(dX)" if which == "grad" else "(y)" if which == "out" else "")
                        lines.append(f"{gpu['name']:6}{M:>6}{K:>6}{N:>6}{r:>4} {dtype:9}{label:12}{nr:>3}{grid:>6}{smem:>8}{assumed:>5}{gets:>5}{waves:>7.2f}")
                        where = f"{gpu['name']} M={M} K={K} N={N} r={r} {dtype} {label}"
                        if smem + k.static_smem > gpu["smem_optin"]:
                            failures.append(f"{where}: {smem + k.static_smem} bytes of shared memory > {gpu['smem_optin']}")
                        if gets < assumed:
                            failures.append(f"{where}: the plan assumes {assumed} blocks/SM, the kernel gets {gets}")
                        if family == "project_kernel":
                            unsplit = math.ceil(M / 128) * math.ceil(r / (16 * nr))
                            if grid > unsplit and grid > gpu["num_sms"] * assumed:
                                failures.append(f"{where}: split-K grid of {grid} blocks takes more than one wave "
                                                f"({gpu['num_sms'] * assumed} slots)")
    lines.append("")
    lines.append("FAILED:" if failures else "OK: no spills in the hot kernels, smem within limits, plans hold.")
    lines += [f"  {f}" for f in failures]
    return lines, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(GPUS), help="repeatable (default: 80 and 90)")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args(argv)
    if nvcc_path() is None:
        print("nvcc not found (set CUDA_HOME): the static CUDA report needs it", file=sys.stderr)
        return 2
    lines, failures = report(args.arch or sorted(GPUS))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
