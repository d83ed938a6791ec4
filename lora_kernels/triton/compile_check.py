"""Compile the backend's kernels for NVIDIA GPUs without one: Triton -> PTX -> cubin for sm80/sm90,
so a machine without a GPU (CI) still catches kernels that do not lower. Nothing is run.

    python -m lora_kernels.triton.compile_check [--arch 80,90] [--dtype bf16] [--quick | --all-configs] [-v]

Arguments are specialised the way a launch on contiguous, 16-byte aligned tensors is (unit
strides are constexpr 1, other ints and pointers divisible by 16), so the software pipeline
(cp.async / TMA, wgmma on sm90) is what a GPU run compiles. With -v, ptxas reports registers and
spill bytes per kernel. Must run without TRITON_INTERPRET=1 (the kernels are then interpreted).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_kernels.triton import bwd, configs, fwd

_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_xar", "stride_yn", "stride_dyn",
                 "stride_gr", "stride_dxk", "stride_dak", "stride_dbr"}
_NOT_DIVISIBLE = {"R", "scaling", "inv_keep", "threshold", "M_BUCKET"}
_FP32_BUFFERS = {"db_ptr", "da_ptr"}


def compile_kernel(autotuned, constexprs: dict, config, arch: int, dtype: str = "bf16", verbose: bool = False):
    """Compile one kernel (an Autotuner) with `constexprs` and one `config` for sm`arch`."""
    fn = autotuned.fn
    consts = dict(constexprs, **config.kwargs)
    consts.update({name: 1 for name in fn.arg_names if name in _UNIT_STRIDES})
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_BUFFERS else f"*{dtype}"
        elif name in ("scaling", "inv_keep"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and name not in _NOT_DIVISIBLE}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    report = f"smem={kernel.metadata.shared}"
    if verbose:
        report += " " + _ptxas_usage(kernel.asm["ptx"], arch)
    return kernel, report


def _ptxas_usage(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={sm}", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'}"


QUICK = {"fwd F1 dropout=True aligned=False", "fwd F2 dropout=False aligned=True", "fwd xa dropout=True",
         "bwd gdb deterministic=False", "bwd dx dropout=True dx=True deterministic=True aligned=True",
         "bwd dx dropout=True dx=True deterministic=False aligned=False"}


def cases(arch: int, all_configs: bool, quick: bool = False):
    """(name, kernel, constexprs, config) to compile: every kernel, every switch that changes code
    (quick: one config and the heaviest variants of each kernel)."""
    if quick:
        seen = set()
        for name, kernel, consts, cfg in cases(arch, all_configs=False):
            if name in QUICK and name not in seen:
                seen.add(name)
                yield name, kernel, consts, cfg
        return
    gemm = configs.gemm_configs(interpret=False, capability=(arch // 10, 0))
    dx = configs.dx_configs(interpret=False, capability=(arch // 10, 0))
    xa, gdb = configs.xa_configs(interpret=False), configs.gdb_configs(interpret=False)
    if not all_configs:  # the first large config and the first decode config of each list
        first_small = len(gemm) - len(configs._SMALL)
        gemm, dx, xa, gdb = [gemm[0], gemm[first_small]], [dx[0], dx[first_small]], xa[:1], gdb[:1]
    prec = "ieee"
    for cfg, fuse, drop, aligned in itertools.product(gemm, (True, False), (True, False), (True, False)):
        if not drop and not aligned:
            continue  # K_ALIGNED only matters to the mask
        consts = dict(HAS_BIAS=True, HAS_DROPOUT=drop, FUSE_XA=fuse, K_ALIGNED=aligned, R_PAD=16, DOT_PRECISION=prec)
        if not drop:
            consts["seed_ptr"] = None
        yield f"fwd F{1 if fuse else 2} dropout={drop} aligned={aligned}", fwd._lora_fwd_kernel, consts, cfg
    for cfg, drop in itertools.product(xa, (True, False)):
        consts = dict(HAS_DROPOUT=drop, K_ALIGNED=True, R_PAD=16, DOT_PRECISION=prec)
        if not drop:
            consts["seed_ptr"] = None
        yield f"fwd xa dropout={drop}", fwd._lora_fwd_xa_kernel, consts, cfg
    for cfg, det in itertools.product(gdb, (True, False)):
        yield f"bwd gdb deterministic={det}", bwd._lora_bwd_gdb_kernel, dict(R_PAD=16, DETERMINISTIC=det,
                                                                           DOT_PRECISION=prec), cfg
    for cfg, (drop, cdx, det, aligned) in itertools.product(
        dx, [(True, True, True, True), (True, True, False, False), (False, True, True, True), (True, False, True, True)]
    ):
        consts = dict(HAS_DROPOUT=drop, COMPUTE_DX=cdx, DETERMINISTIC=det, K_ALIGNED=aligned, R_PAD=16,
                      DOT_PRECISION=prec)
        if not drop:
            consts["seed_ptr"] = None
        name = f"bwd dx dropout={drop} dx={cdx} deterministic={det} aligned={aligned}"
        yield name, bwd._lora_bwd_dx_kernel, consts, cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not two per kernel")
    parser.add_argument("--quick", action="store_true", help="one config, the heaviest variant of each kernel")
    parser.add_argument("-v", "--verbose", action="store_true", help="ptxas register/spill report")
    args = parser.parse_args(argv)
    if configs.INTERPRET:
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    failures = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for name, kernel, consts, cfg in cases(arch, args.all_configs, args.quick):
            tiles = dict(cfg.kwargs)
            try:
                _, report = compile_kernel(kernel, consts, cfg, arch, args.dtype, args.verbose)
                print(f"ok   sm{arch} {name} {tiles} warps={cfg.num_warps} stages={cfg.num_stages} {report}")
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL sm{arch} {name} {tiles}: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
