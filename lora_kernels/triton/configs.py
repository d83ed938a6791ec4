"""Autotune configs, their pruning, and the host-side choices (schedule, determinism) of the triton
backend.

Config lists are per GPU generation (sm80: mma.sync, cp.async pipelines; sm90: wgmma wants
BLOCK_M >= 64 and 8 warps for wide tiles) plus small-M ("decode", M <= 64) configs, which trade
BLOCK_M for wide K/N tiles because those GEMMs are bound by reading W, not by MMA. Under
TRITON_INTERPRET=1 every kernel gets one small config, so tests never autotune.
None of these lists has been timed on a GPU yet (GPU performance: unmeasured).
"""

from __future__ import annotations

import os

import torch
import triton
from triton import knobs

# Read when the kernels are decorated: `triton.jit` picks the interpreter at decoration time too.
INTERPRET = bool(knobs.runtime.interpret)

SMALL_M = 64  # M <= SMALL_M uses the decode configs
# "auto" schedule: F1 (one kernel, xa inside the GEMM main loop) up to this many rows, F2 (xa
# pre-pass + GEMM) above. Small M: the GEMM is bound by reading W, F1's extra MMA/RNG work is
# hidden and F2's extra launch + read of x is not. Large M: the GEMM is MMA-bound, F1's extra
# MMA (~R_PAD/BLOCK_N) and the RNG repeated for every N tile cost more than F2's one extra read of
# x. The crossover is a guess until measured on a GPU (bench/ should set it).
F1_MAX_M = int(os.environ.get("LORA_KERNELS_TRITON_F1_MAX_M", "256"))
SCHEDULES = ("auto", "F1", "F2")


def _config(bm, bn, bk, group_m, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


def _capability():
    if not torch.cuda.is_available():
        return (9, 0)
    return torch.cuda.get_device_capability()


# GEMM tiles (BLOCK_M, output cols, reduction step, GROUP_M, warps, stages). Forward: output cols
# are BLOCK_N and the step is BLOCK_K. dX: the output tile is BLOCK_M x BLOCK_K (columns of x)
# and the step over N is BLOCK_N, so `dx_configs` maps the same tuples the other way round.
_SM90_LARGE = [
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (128, 64, 64, 8, 8, 4),  # 32 accumulators a thread: room for the mask (F1/dX with dropout)
    (64, 128, 64, 8, 4, 4),
]
_SM80_LARGE = [
    (128, 256, 32, 8, 8, 3),
    (256, 128, 32, 8, 8, 3),
    (128, 128, 32, 8, 4, 4),
    (128, 128, 64, 8, 4, 3),
    (128, 64, 32, 8, 4, 4),
    (128, 64, 32, 8, 8, 4),  # 32 accumulators a thread: room for the mask (F1/dX with dropout)
    (64, 128, 32, 8, 4, 4),
]
_SMALL = [
    (16, 64, 128, 1, 4, 4),
    (16, 128, 128, 1, 4, 3),
    (32, 64, 128, 1, 4, 4),
    (32, 128, 64, 1, 4, 4),
    (64, 64, 64, 1, 4, 4),
    (16, 32, 256, 1, 2, 4),
]
_INTERPRET_GEMM = (32, 32, 32, 4, 4, 1)  # small but >1 tile on the test shapes, so masks are hit

# Memory-bound kernels: the F2 pre-pass, (BLOCK_M, BLOCK_K, warps, stages), and the dY pass for
# g and dB, (BLOCK_M, BLOCK_N, warps, stages). Wide tiles along the streamed dim, few rows.
_XA = [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4), (16, 256, 4, 4)]
_GDB = [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4), (16, 256, 4, 4)]
_INTERPRET_STREAM = (32, 32, 4, 1)


def _stream_config(dim, bm, bd, warps, stages):
    return triton.Config({"BLOCK_M": bm, dim: bd}, num_warps=warps, num_stages=stages)


def _dx_config(bm, out_cols, step, group_m, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": step, "BLOCK_K": out_cols, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


def _tiles(c, out_cols: str, step: str) -> tuple:
    """A config as its (BLOCK_M, output cols, reduction step, GROUP_M, warps, stages) tuple."""
    kw = c.kwargs
    return (kw["BLOCK_M"], kw[out_cols], kw[step], kw["GROUP_M"], c.num_warps, c.num_stages)


def _gemm_rows(interpret: bool, capability):
    if interpret:
        return [_INTERPRET_GEMM]
    major = (capability or _capability())[0]
    return (_SM90_LARGE if major >= 9 else _SM80_LARGE) + _SMALL


def gemm_configs(interpret: bool = INTERPRET, capability=None):
    """Forward GEMM: the large configs of the GPU generation + the decode ones."""
    return [_config(*c) for c in _gemm_rows(interpret, capability)]


def dx_configs(interpret: bool = INTERPRET, capability=None):
    """The dX GEMM: the same tiles, output BLOCK_M x BLOCK_K, stepping over N by BLOCK_N."""
    return [_dx_config(*c) for c in _gemm_rows(interpret, capability)]


def xa_configs(interpret: bool = INTERPRET):
    rows = [_INTERPRET_STREAM] if interpret else _XA
    return [_stream_config("BLOCK_K", *c) for c in rows]


def gdb_configs(interpret: bool = INTERPRET):
    rows = [_INTERPRET_STREAM] if interpret else _GDB
    return [_stream_config("BLOCK_N", *c) for c in rows]


def _smem_limit():
    # usable dynamic shared memory per block: ~227 KiB on H100, ~163 KiB on A100 (minus slack)
    return 220 * 1024 if _capability()[0] >= 9 else 160 * 1024


# Pruning reads M only through M_BUCKET, the autotune key: a config tuned for one M of a bucket
# is reused for every M of it, and the backward sizes its partial buffers by replaying the prune.

# A tile that also makes a dropout mask (F1 main loop, dX epilogue) holds the Philox state next to
# the fp32 accumulator: ptxas (-v, sm80/sm90, bf16, AOT-compiled) spills hundreds to thousands of
# bytes once a thread owns more than this many accumulator elements (e.g. 128x128 on 4 warps).
# Some kept configs still spill a few dozen bytes in the dX epilogue (acc + g·A + mask); the
# autotuner times them against spill-free ones such as 128x64 on 8 warps.
MASKED_ACC_PER_THREAD = 64


def _prune_gemm(configs, named_args, out_cols: str, step: str, mask_in_tile: bool, r_in_loop: int):
    small_m = named_args["M_BUCKET"] <= SMALL_M
    elem = named_args["w_ptr"].element_size()
    kept = []
    for c in configs:
        bm, out, red, _, warps, stages = tiles = _tiles(c, out_cols, step)
        if (tiles in _SMALL) != small_m:
            continue
        if mask_in_tile and bm * out > MASKED_ACC_PER_THREAD * 32 * warps:
            continue
        if stages * (bm * red + red * out + red * r_in_loop) * elem > _smem_limit():
            continue
        kept.append(c)
    return kept or configs[-1:]


def prune_fwd(configs, named_args, **kwargs):
    """Decode configs for M <= SMALL_M, the others above; no spilling tile sizes when F1 makes the
    mask in its main loop; pipelines (x, Wᵀ and, for F1, Aᵀ tiles) that fit in shared memory."""
    fused = kwargs.get("FUSE_XA", False)
    mask = fused and kwargs.get("HAS_DROPOUT", False)
    return _prune_gemm(configs, named_args, "BLOCK_N", "BLOCK_K", mask, kwargs.get("R_PAD", 16) if fused else 0)


def prune_dx(configs, named_args, **kwargs):
    """As `prune_fwd` for the dX kernel (dY and W tiles in the pipeline); its epilogue makes the
    mask when there is dropout."""
    mask = kwargs.get("HAS_DROPOUT", False) and kwargs.get("COMPUTE_DX", True)
    return _prune_gemm(configs, named_args, "BLOCK_K", "BLOCK_N", mask, 0)


def prune_stream(configs, named_args, **kwargs):
    """Rows per program no larger than the next power of two of M (decode M gets 16/32-row tiles)."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[-1:]


def prune_gdb(configs, named_args, **kwargs):
    """As `prune_stream`, and at least 64 rows per program once M allows: every row block writes
    an (N, r) fp32 dB partial (or as many atomics), so fewer, taller blocks mean less traffic."""
    m = named_args["M_BUCKET"]
    kept = [c for c in prune_stream(configs, named_args) if c.kwargs["BLOCK_M"] >= min(64, m)]
    return kept or prune_stream(configs, named_args)


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so variable sequence lengths do not retune every call."""
    return min(triton.next_power_of_2(max(int(m), 1)), 16384)


def resolve_schedule(schedule, m: int) -> str:
    """"F1" or "F2" for `schedule` ("auto", "F1", "F2" or None = env LORA_KERNELS_TRITON_SCHEDULE)."""
    if schedule is None:
        schedule = os.environ.get("LORA_KERNELS_TRITON_SCHEDULE", "auto")
    if schedule not in SCHEDULES:
        raise ValueError(f"triton schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "auto":
        return "F1" if m <= F1_MAX_M else "F2"
    return schedule


def resolve_deterministic(deterministic) -> bool:
    """`deterministic` or, when None, env LORA_KERNELS_TRITON_DETERMINISTIC (default "1")."""
    if deterministic is None:
        value = os.environ.get("LORA_KERNELS_TRITON_DETERMINISTIC", "1")
        if value not in ("0", "1"):
            raise ValueError(f"LORA_KERNELS_TRITON_DETERMINISTIC must be 0 or 1, got {value!r}")
        return value == "1"
    return bool(deterministic)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots are IEEE unless torch allows TF32 for matmuls (off by default)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
