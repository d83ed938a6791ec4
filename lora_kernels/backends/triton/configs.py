# SPDX-License-Identifier: Apache-2.0
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
# Offered only when nothing above fits shared memory (large R_PAD, fp32): small tiles, two stages.
_FALLBACK = [
    (32, 32, 32, 1, 4, 2),
    (16, 32, 32, 1, 2, 2),
]
# fp32 inputs with IEEE dots run on FMA units, whose operand tiles live in registers: ptxas (-v,
# sm80/sm90, AOT) spills from 32x64x32/4 warps up at R_PAD 64 (the epilogue's g·A tile) and from
# 64x64x64/4 warps up at R_PAD 16. fp32 (either precision) selects only these, at any M.
_FP32_R16 = [(32, 64, 32, 1, 4, 4), (32, 32, 32, 1, 4, 2), (16, 32, 32, 1, 4, 2)]
# R_PAD 32-64: 32x32 only (sm86 spills 36 bytes at 16x32x32/4 warps in F1, dropout, K % 8 != 0);
# R_PAD > 64 adds 16x32, which fits shared memory at R_PAD 256 on sm86.
_FP32_MID_R = [(32, 32, 32, 1, 4, 2)]
_FP32_WIDE_R = [(32, 32, 32, 1, 4, 2), (16, 32, 32, 1, 4, 2)]
# 4-bit W (`nf4.W_4BIT`): each step dequantizes its W tile in registers (a byte, a code lookup and
# a scale select per element), so a thread holds its share of the W tile on top of the
# accumulators. ptxas (-v, AOT, R_PAD 16, F2 / F1 with dropout / dX with dropout) spills at
# 16-bit 128x128x32/4 warps (sm80, 108 bytes), 64x128x32/4 (dX, 20), 16x64x128/4 (8-16),
# 64x64x64/4 (sm80, 20), 128x128x64/8 (sm90 F1, 28), 16x32x64/2 (sm86 F1 dropout, 16), fp32
# 32x32x32/4 (4-12) and fp32 16x32x32/4 warps/2 stages (sm90 F1, 12); none at these (sm80/86/90).
_W4_SM80 = [(128, 64, 32, 8, 8, 4)]
_W4_SM90 = [(128, 64, 64, 8, 8, 4)]
_W4_SMALL = [(32, 64, 32, 1, 4, 4), (16, 32, 64, 1, 4, 3)]
_W4_FP32 = [(16, 32, 32, 1, 4, 1)]
_INTERPRET_GEMM = (32, 32, 32, 4, 4, 1)  # small but >1 tile on the test shapes, so masks are hit

# Memory-bound kernels: the F2 pre-pass, (BLOCK_M, BLOCK_K, warps, stages), and the dY pass for
# g and dB, (BLOCK_M, BLOCK_N, warps, stages). Wide tiles along the streamed dim, few rows; the
# last entries are small-tile fallbacks for large R_PAD / fp32.
_XA = [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4), (16, 256, 4, 4), (32, 32, 4, 2),
       (16, 32, 2, 2)]
# The dY pass is not autotuned: its config is a pure function of the shape (`gdb_config`), so
# its reduction layout, and thus dB's bits, never depend on timing. First match in this order.
_GDB = [(64, 128, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3), (16, 64, 4, 2), (16, 32, 2, 2), (16, 16, 2, 1)]
# R_PAD >= 64: the (BLOCK_N, R_PAD) fp32 dB accumulator is 64 registers a thread on 4 warps; ptxas
# spills 4-224 bytes (sm80/sm90 bf16), none with 8 warps.
_GDB_WIDE_R = [(64, 128, 8, 3), (32, 128, 8, 3), (16, 128, 8, 3), (16, 64, 4, 2), (16, 32, 2, 2), (16, 16, 2, 1)]
# fp32 (FMA dots, operands in registers): sm80 spills 512 bytes at 64x64 (R_PAD 16) and 9368 at
# 32x64 (R_PAD 64) on 4 warps.
_GDB_FP32 = [(32, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 2, 1)]
_GDB_FP32_WIDE_R = [(16, 32, 4, 2), (16, 16, 2, 1)]  # R_PAD > 16 (32x32: 3732 bytes at R_PAD 64)
# The dA pass (x stream, BLOCK_M, BLOCK_K, warps, stages): likewise a pure function of the shape.
# 64x128 on 4 warps spills (sm80 R_PAD 64: 8 bytes, 660 with K % 8 != 0; sm90 R_PAD 16, K % 8 != 0:
# 28), so is 32x128 on sm86 (R_PAD 64, K % 8 != 0: 16); 64-column tiles do not.
_DA = [(64, 64, 4, 3), (32, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 2), (16, 32, 2, 2), (16, 16, 2, 1)]
# fp32: (R_PAD, BLOCK_K) accumulator + gᵀ·x on FMA units: sm80 spills 172 bytes at 64x128 (R_PAD
# 16) and 6416 at 16x128 (R_PAD 64).
_DA_FP32 = [(16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 2, 1)]
# fp32 pre-pass (x·Aᵀ on FMA units): sm80 spills 724 bytes at 64x128 (R_PAD 16), 4504 at 32x128
# (R_PAD 64); fp32 selects only these.
_XA_FP32_R16 = [(32, 64, 4, 3), (16, 64, 4, 2), (32, 32, 4, 2)]
_XA_FP32_WIDE_R = [(16, 64, 4, 2), (32, 32, 4, 2)]  # R_PAD > 16
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
    rows = (_SM90_LARGE if major >= 9 else _SM80_LARGE) + _SMALL
    extras = _FP32_R16 + _FP32_WIDE_R
    # 4-bit-only rows go before the fallbacks, so the dense order (autotune, pinned dX, and the
    # last-row fallback) stays as it was.
    w4 = (_W4_SM90 if major >= 9 else _W4_SM80) + _W4_SMALL + _W4_FP32
    rows += [t for t in w4 if t not in rows + _FALLBACK + extras]
    rows += _FALLBACK
    for t in extras:
        if t not in rows:
            rows.append(t)
    return rows


def gemm_configs(interpret: bool = INTERPRET, capability=None):
    """Forward GEMM: the large configs of the GPU generation + the decode ones."""
    return [_config(*c) for c in _gemm_rows(interpret, capability)]


def dx_configs(interpret: bool = INTERPRET, capability=None):
    """The dX GEMM: the same tiles, output BLOCK_M x BLOCK_K, stepping over N by BLOCK_N."""
    return [_dx_config(*c) for c in _gemm_rows(interpret, capability)]


def xa_configs(interpret: bool = INTERPRET):
    rows = [_INTERPRET_STREAM] if interpret else _XA + [t for t in _XA_FP32_R16 if t not in _XA]
    return [_stream_config("BLOCK_K", *c) for c in rows]


def da_configs(interpret: bool = INTERPRET, elem: int = 2):
    """The dA pass's candidates for `elem`-byte inputs, in order of preference (`da_config` takes
    the first that fits)."""
    rows = [_INTERPRET_STREAM] if interpret else (_DA_FP32 if elem == 4 else _DA)
    return [_stream_config("BLOCK_K", *c) for c in rows]


def gdb_configs(interpret: bool = INTERPRET, elem: int = 2, r_pad: int = 16):
    """The dY pass's candidates for `elem`-byte inputs and `r_pad`, in order of preference
    (`gdb_config` takes the first that fits)."""
    if interpret:
        rows = [_INTERPRET_STREAM]
    elif elem == 4:
        rows = _GDB_FP32 if r_pad <= 16 else _GDB_FP32_WIDE_R
    else:
        rows = _GDB_WIDE_R if r_pad >= 64 else _GDB
    return [_stream_config("BLOCK_N", *c) for c in rows]


# Usable shared memory per block (opt-in maximum) by SM version, for the static report and for
# pruning without a GPU; on a GPU the device's own figure is read (`smem_limit`).
SMEM_LIMIT_BY_ARCH = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                      100: 227 * 1024, 120: 99 * 1024}


def device_smem_limit(device) -> int:
    """Shared memory a block may opt into on `device` (a CUDA device), else the sm90 table entry."""
    if device is not None and device.type == "cuda":
        return _device_smem_limit(device.index if device.index is not None else torch.cuda.current_device())
    return SMEM_LIMIT_BY_ARCH[90]


_DEVICE_SMEM = {}


def _device_smem_limit(index: int) -> int:
    if index not in _DEVICE_SMEM:
        _DEVICE_SMEM[index] = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return _DEVICE_SMEM[index]


def smem_limit(capability=None) -> int:
    """Per-block shared memory limit: the table entry of `capability` ((major, minor)), or the
    current CUDA device's `shared_memory_per_block_optin` when capability is None."""
    if capability is None:
        if torch.cuda.is_available():
            return _device_smem_limit(torch.cuda.current_device())
        capability = (9, 0)
    arch = capability[0] * 10 + capability[1]
    return SMEM_LIMIT_BY_ARCH.get(arch, min(SMEM_LIMIT_BY_ARCH.values()))


# --- shared memory the compiled kernels allocate (upper bounds) --------------------------------
# Triton gives each dot operand tile `num_stages` pipeline buffers in the main loop; operands
# loaded before the loop (Bᵀ, xa, A) and tiles changed in registers before a dot (the masked x)
# need buffers of their own, and the epilogue's small dots more. The model adds all of them (it
# does not count on buffers being reused after the loop), so it is an upper bound: `compile_check
# --report` compiles every selectable config and fails if `metadata.shared` ever exceeds it.
SMEM_SLACK = 1024  # barriers and small scratch


def smem_w_tile(tile, stages, elem, w_format=0):
    """Shared memory of the W operand of a GEMM main loop (`tile` elements a step). Dense: one
    buffer per pipeline stage. 4-bit (`nf4.W_4BIT`): the tile dequantized in registers is staged
    as the dot's operand (two buffers, compute dtype), and Triton's pipeliner may stage the
    gathers of later steps (code-table and scale lookups as 4-byte cp.async): budgeted at 2 bytes
    per element and stage, above the ~1.8 compiled on sm90 (compile_check checks the bound)."""
    if w_format == 0:
        return stages * tile * elem
    return tile * (2 * stages + 2 * elem)


def smem_fwd(bm, bn, bk, stages, elem, r_pad, fused, w_format=0):
    """_lora_fwd_kernel: x, Wᵀ (and for F1 Aᵀ) tiles per stage (`smem_w_tile`), the masked x
    tile, the xa and Bᵀ tiles, the fp32 xa accumulator (F1)."""
    loop = stages * (bm * bk + (bk * r_pad if fused else 0)) * elem + smem_w_tile(bk * bn, stages, elem, w_format)
    loop += bm * bk * elem
    return loop + (bm * r_pad + r_pad * bn) * elem + bm * r_pad * 4 + SMEM_SLACK


def smem_xa(bm, bk, stages, elem, r_pad):
    """_lora_fwd_xa_kernel: x and Aᵀ tiles per stage, the masked x tile; the fp32 result."""
    return stages * (bm * bk + bk * r_pad) * elem + bm * bk * elem + bm * r_pad * 4 + SMEM_SLACK


def smem_gdb(bm, bn, stages, elem, r_pad):
    """_lora_bwd_gdb_kernel: dY and B tiles per stage, dYᵀ and the xa tile; fp32 g and dB."""
    loop = stages * (bm * bn + bn * r_pad) * elem + (bm * bn + bm * r_pad) * elem
    return loop + 2 * bm * r_pad * 4 + bn * r_pad * 4 + SMEM_SLACK


def smem_dx(bm, bk, bn, stages, elem, r_pad, w_format=0):
    """_lora_bwd_dx_kernel: dY tiles per stage and the W tiles (`smem_w_tile`); epilogue g (hi/lo
    for 16-bit), the A tile, the fp32 g and g·A tile."""
    loop = stages * bm * bn * elem + smem_w_tile(bn * bk, stages, elem, w_format)
    g_parts = 2 if elem < 4 else 1
    epilogue = (g_parts * bm * r_pad + r_pad * bk) * elem + bm * r_pad * 4 + bm * bk * 4
    return loop + epilogue + SMEM_SLACK


def smem_da(bm, bk, stages, elem, r_pad):
    """_lora_bwd_da_kernel: x tiles per stage and the masked x tile; gᵀ (hi/lo for 16-bit) and
    the fp32 g; the fp32 dA block."""
    g_parts = 2 if elem < 4 else 1
    loop = stages * bm * bk * elem + bm * bk * elem + 2 * g_parts * bm * r_pad * elem + bm * r_pad * 4
    return loop + r_pad * bk * 4 + SMEM_SLACK


# A tile that also makes a dropout mask (F1 main loop, dX epilogue) holds the Philox state next to
# the fp32 accumulator: ptxas (-v, sm80/sm90, bf16, AOT-compiled) spills hundreds to thousands of
# bytes once a thread owns more than this many accumulator elements (e.g. 128x128 on 4 warps).
MASKED_ACC_PER_THREAD = 64
# The dX epilogue with K % 8 != 0 (a spill group per row) or R_PAD >= 64 (a wider g·A dot): sm80
# spills 16 (aligned, R_PAD 64) to 1156 bytes at 128x64 on 4 warps, sm90 424 at 128x128 on 8.
# The several-adapter epilogue (NUM_SEGMENTS > 0: loops over the segments) spills above 32 with or
# without dropout (sm80 bf16, R_PAD 16: 172 bytes at 128x64 on 4 warps with dropout, 16-20 at
# 128x128 on 4 without), and at 32 when the mask is also tight (K % 8 != 0: sm80 196 bytes at
# 128x64 on 8 warps; R_PAD 64: sm80 8-32): then only the small-tile fallback is left.
SEGMENTS_TIGHT_ACC_PER_THREAD = 16
# The full sweep of that epilogue (tests/test_triton_stacked.py: every selectable config, sm80/86/
# 90, fp16/bf16, dense and 4-bit W₀) found two more tiles that spill: (BLOCK_M, BLOCK_N, BLOCK_K,
# stages) → predicate on (R_PAD, W_FORMAT, dropout). With dropout at R_PAD 256 (a stacked rank
# sum over 128) every selectable tile spills (4-1206 bytes): a limit of the epilogue (the fix is
# chunking R in it), documented in stacked.py, not something pruning can avoid.
SEGMENTS_SPILL_TILES = {
    # sm90 8 bytes; kept where it is the only survivor (decode buckets): the one spill left there
    (32, 32, 64, 4): lambda r_pad, w_format, drop: w_format == 1 and r_pad >= 64,
    (32, 64, 128, 4): lambda r_pad, w_format, drop: not drop and r_pad >= 256,  # sm90 80 bytes
}
DX_TIGHT_MASKED_ACC_PER_THREAD = 32
# F1 without dropout still holds the xa accumulator next to the GEMM's: sm86 spills 32 bytes at
# 128x128 on 4 warps (128 accumulators a thread).
F1_ACC_PER_THREAD = 64
# F1 makes the mask inside the main loop, next to the Philox state of a whole x tile: sm80 spills
# (232 bytes at 128x64 on 4 warps) above this many accumulators, sm90 (4 bytes at 16x32x256 on 2
# warps) above this many 8-element mask groups a thread per K step.
F1_MASKED_ACC_PER_THREAD = 32
F1_MASK_GROUPS_PER_THREAD = 4
# With K % 8 != 0 (spill groups counted) F1 spills at 2.1 groups a thread (sm90 16x128x128, 28
# bytes) and at 32x128x64 (sm86/sm90, R_PAD 16): this forced-only path (auto runs F2 with
# dropout) keeps at most 2, which leaves the smallest tile.
F1_UNALIGNED_MASK_GROUPS_PER_THREAD = 2
# F1 keeps a (BLOCK_M, R_PAD) fp32 accumulator for xa next to the GEMM's: beyond this R_PAD it
# spills, so F1 is not offered ("auto" never picks it; an explicit "F1" is refused).
F1_MAX_R_PAD = 64


def _elem(named_args, name):
    return named_args[name].element_size()


def _compute_elem(named_args, name):
    """Bytes per element of the compute dtype: `name`'s tensor (x or dY) when given, else W's
    (the same dtype for a dense W; a 4-bit W's uint8 codes say nothing about it)."""
    return _elem(named_args, name if named_args.get(name) is not None else "w_ptr")


def _device(named_args, name):
    return getattr(named_args.get(name), "device", None)


def _no_config(kernel: str, r_pad: int, limit: int):
    return ValueError(
        f"triton backend: no {kernel} config fits {limit} bytes of shared memory per block at rank r "
        f"(padded to {r_pad}); use r <= 128 or another backend"
    )


def fp32_tiles(r_pad: int) -> list:
    """The GEMM tiles fp32 inputs may select at `r_pad` (see `_FP32_R16`)."""
    return _FP32_R16 if r_pad <= 16 else _FP32_MID_R if r_pad <= 64 else _FP32_WIDE_R


def _prune_gemm(configs, named_args, kwargs, out_cols, step, mask_acc, smem, kernel, mask_groups=0, max_acc=0,
                compute_arg="x_ptr"):
    small_m = named_args["M_BUCKET"] <= SMALL_M
    elem = _compute_elem(named_args, compute_arg)
    r_pad = kwargs.get("R_PAD", 16)
    # K % 8 != 0: every row of a tile makes one more mask group (its spill group).
    extra_groups_per_row = 0 if kwargs.get("K_ALIGNED", True) else 1
    limit = kwargs.get("SMEM_LIMIT") or device_smem_limit(_device(named_args, "w_ptr"))
    fits = [c for c in configs if smem(_tiles(c, out_cols, step), elem, r_pad) <= limit]
    if not fits:
        raise _no_config(kernel, r_pad, limit)
    w4 = kwargs.get("W_FORMAT", 0) != 0
    if w4:  # only the 4-bit rows, fallback included (see `_W4_SM80`)
        allowed = (_W4_FP32 if elem == 4 else _W4_SM80 + _W4_SM90 + _W4_SMALL) + [_INTERPRET_GEMM]
        fits = [c for c in fits if _tiles(c, out_cols, step) in allowed]
        if not fits:
            raise _no_config(kernel + " (4-bit W)", r_pad, limit)
    large, small = (_W4_SM80 + _W4_SM90, _W4_SMALL) if w4 else (_SM80_LARGE + _SM90_LARGE, _SMALL)
    kept = []
    for c in fits:
        bm, out, red, _, warps, _ = tiles = _tiles(c, out_cols, step)
        if elem == 4:
            if w4 or tiles in fp32_tiles(r_pad):
                kept.append(c)
            continue
        if tiles in _FALLBACK or tiles not in small + large or (tiles in small) != small_m:
            continue
        if max_acc and bm * out > max_acc * 32 * warps:
            continue
        if mask_acc and bm * out > mask_acc * 32 * warps:
            continue
        if mask_groups and bm * (red // 8 + extra_groups_per_row) > mask_groups * 32 * warps:
            continue
        kept.append(c)
    # Every survivor of `fits` was checked; the last one is the smallest tile that fits.
    return kept or fits[-1:]


def prune_fwd(configs, named_args, **kwargs):
    """Decode configs for M <= SMALL_M, the others above (fp32: only `fp32_tiles`, at any M); no
    spilling tile sizes for F1 (its xa accumulator, and the mask it makes in its main loop); only
    configs whose shared memory (`smem_fwd`) fits the device. Raises ValueError naming r when none
    fits."""
    fused = kwargs.get("FUSE_XA", False)
    mask = fused and kwargs.get("HAS_DROPOUT", False)
    w_format = kwargs.get("W_FORMAT", 0)

    def smem(t, elem, rp):
        return smem_fwd(t[0], t[1], t[2], t[5], elem, rp, fused, w_format)

    mask_acc = F1_MASKED_ACC_PER_THREAD if mask else 0
    aligned = kwargs.get("K_ALIGNED", True)
    mask_groups = (F1_MASK_GROUPS_PER_THREAD if aligned else F1_UNALIGNED_MASK_GROUPS_PER_THREAD) if mask else 0
    return _prune_gemm(configs, named_args, kwargs, "BLOCK_N", "BLOCK_K", mask_acc, smem, "forward GEMM",
                       mask_groups, F1_ACC_PER_THREAD if fused else 0)


def prune_dx(configs, named_args, **kwargs):
    """As `prune_fwd` for the dX kernel (dY and W tiles in the pipeline, `smem_dx`); its epilogue
    makes the mask when there is dropout (fewer accumulators a thread when K % 8 != 0 or R_PAD >= 64)."""
    mask = kwargs.get("HAS_DROPOUT", False)
    w_format = kwargs.get("W_FORMAT", 0)

    def smem(t, elem, rp):
        return smem_dx(t[0], t[1], t[2], t[5], elem, rp, w_format)

    tight = not kwargs.get("K_ALIGNED", True) or kwargs.get("R_PAD", 16) >= 64
    mask_acc = (DX_TIGHT_MASKED_ACC_PER_THREAD if tight else MASKED_ACC_PER_THREAD) if mask else 0
    segments = kwargs.get("NUM_SEGMENTS", 0) > 0
    if segments:
        mask_acc = SEGMENTS_TIGHT_ACC_PER_THREAD if mask and tight else DX_TIGHT_MASKED_ACC_PER_THREAD
    kept = _prune_gemm(configs, named_args, kwargs, "BLOCK_K", "BLOCK_N", mask_acc, smem, "dX GEMM",
                       compute_arg="dy_ptr")
    if not segments:
        return kept
    r_pad = kwargs.get("R_PAD", 16)

    def spills(c):
        kw = c.kwargs
        rule = SEGMENTS_SPILL_TILES.get((kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages))
        return rule is not None and rule(r_pad, w_format, mask)

    return [c for c in kept if not spills(c)] or kept[-1:]


def prune_stream(configs, named_args, **kwargs):
    """xa pre-pass: rows per program no larger than the next power of two of M (decode M gets
    16/32-row tiles; fp32: only the small `_XA_FP32_*` tiles), and shared memory (`smem_xa`)
    within the device's limit."""
    m = named_args["M_BUCKET"]
    elem = _elem(named_args, "x_ptr")
    r_pad = kwargs.get("R_PAD", 16)
    limit = kwargs.get("SMEM_LIMIT") or device_smem_limit(_device(named_args, "x_ptr"))
    fits = [c for c in configs if smem_xa(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, r_pad) <= limit]
    if not fits:
        raise _no_config("xa pre-pass", r_pad, limit)
    if elem == 4:
        rows = _XA_FP32_R16 if r_pad <= 16 else _XA_FP32_WIDE_R
        kept = [c for c in fits if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in rows]
        return kept or fits[-1:]
    kept = [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m) and
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in _XA]
    return kept or fits[-1:]


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so variable sequence lengths do not retune every call."""
    return min(triton.next_power_of_2(max(int(m), 1)), 16384)


def resolve_schedule(schedule, m: int, r_pad: int = 16, has_dropout: bool = False) -> str:
    """"F1" or "F2" for `schedule` ("auto", "F1", "F2" or None = env LORA_KERNELS_TRITON_SCHEDULE).

    auto: F1 only without dropout, for M <= F1_MAX_M and R_PAD <= F1_MAX_R_PAD. With dropout F1
    makes the mask in the GEMM main loop once per N tile (and its main loop is ALU-bound, ~674 vs
    ~112 SASS instructions per K step on sm90 bf16); F2 makes it once per element."""
    if schedule is None:
        schedule = os.environ.get("LORA_KERNELS_TRITON_SCHEDULE", "auto")
    if schedule not in SCHEDULES:
        raise ValueError(f"triton schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "F1" and r_pad > F1_MAX_R_PAD:
        raise ValueError(f"triton schedule F1 supports r <= {F1_MAX_R_PAD} (its xa accumulator lives in "
                         f"registers); got r padded to {r_pad}: use schedule F2 or auto")
    if schedule == "auto":
        return "F1" if m <= F1_MAX_M and r_pad <= F1_MAX_R_PAD and not has_dropout else "F2"
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
    """"tf32" for fp32 inputs when torch allows TF32 for fp32 matmuls, else "ieee".

    Works in every state of both torch APIs: the new `torch.backends.cuda.matmul.fp32_precision`
    (which resolves "none" from `torch.backends.fp32_precision`) is read first, because reading
    the legacy `allow_tf32` raises once the two APIs were mixed; old torch has only the legacy one."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # mixed-API state that the new attribute did not resolve: stay exact
        return "ieee"


# --- backward launch geometry: a pure function of the shapes, never of timing ---------------------
# Partial buffers (deterministic reductions) are bounded by a byte budget, not by M.
PARTIAL_BYTES = 64 * 2**20
# Programs the dY pass aims for (its N chunks fill the GPU when M alone does not).
GDB_TARGET_PROGRAMS = 512
GDB_MAX_N_CHUNKS = 8


def gdb_config(m: int, elem: int, r_pad: int, limit: int, interpret: bool = INTERPRET):
    """The dY pass's config: the first of `gdb_configs` with BLOCK_M <= max(16, next_pow2(M))
    whose shared memory (`smem_gdb`) fits `limit`. Raises ValueError naming r when none does."""
    candidates = gdb_configs(interpret, elem, r_pad)
    fits = [c for c in candidates
            if smem_gdb(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, elem, r_pad) <= limit]
    if not fits:
        raise _no_config("dY pass", r_pad, limit)
    small = [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m_bucket(m))]
    return (small or fits[-1:])[0]


def gdb_grid(m: int, n: int, r: int, block_m: int, block_n: int):
    """(row programs P, N chunks C) of the dY pass. dB partials are P x N x r fp32, within
    PARTIAL_BYTES; g partials C x M x r fp32, at most GDB_MAX_N_CHUNKS copies of g (C > 1 only
    while P alone leaves the GPU short of GDB_TARGET_PROGRAMS)."""
    row_blocks = triton.cdiv(m, block_m)
    col_blocks = triton.cdiv(n, block_n)
    p = max(1, min(row_blocks, PARTIAL_BYTES // (n * r * 4)))
    c = max(1, min(col_blocks, GDB_MAX_N_CHUNKS, triton.cdiv(GDB_TARGET_PROGRAMS, p)))
    return p, c


def da_config(m: int, elem: int, r_pad: int, limit: int, interpret: bool = INTERPRET):
    """The dA pass's config: as `gdb_config`, from `da_configs` and `smem_da`."""
    fits = [c for c in da_configs(interpret, elem)
            if smem_da(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, r_pad) <= limit]
    if not fits:
        raise _no_config("dA pass", r_pad, limit)
    small = [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m_bucket(m))]
    return (small or fits[-1:])[0]


def da_row_programs_cap(k: int, r: int) -> int:
    """Most row programs of the dA pass: each writes one (r, K) fp32 dA partial, so
    P x r x K x 4 bytes stays within PARTIAL_BYTES (its K tiles fill the GPU)."""
    return max(1, PARTIAL_BYTES // (r * k * 4))


def pinned_dx_config(configs, named_args, **kwargs):
    """Deterministic mode's dX config: the first survivor of `prune_dx` (a fixed preference
    order, no timing), so every process on the same GPU model sums dA in the same layout."""
    return prune_dx(configs, named_args, **kwargs)[0]


# --- decode split-K forward (F2, M <= SMALL_M): a pure function of the shapes, never of timing ----
# At decode the (M, N) tiles alone are a fraction of a wave (M=16, N=4096, BLOCK_N=64: 64 programs
# on 132 SMs) and each reads a long K strip of W; splitting K fills the GPU. The split layout fixes
# the fp32 summation order, so it must not depend on autotuning.
DEFAULT_SM_COUNT = 132  # H100 SXM / H200: the plan for CPU tensors (interpreter, tests)
SPLITK_MIN_K_STEPS = 4  # BLOCK_K steps a split keeps at least, so its loads still pipeline
SPLITK_MAX = 16
SPLITK_REDUCE_BLOCK = 1024
# Decode tiles by M (BLOCK_M >= M up to 64): `_SMALL` rows, checked by compile_check --report.
_SPLITK_16BIT = [(16, 64, 128, 1, 4, 4), (32, 64, 128, 1, 4, 4), (64, 64, 64, 1, 4, 4)]


def splitk_config(m: int, elem: int, r_pad: int, limit: int, interpret: bool = INTERPRET, w_format: int = 0):
    """The split-K forward tile for M rows of `elem`-byte inputs: the smallest decode row with
    BLOCK_M >= M (fp32: the last of `fp32_tiles`; a 4-bit W, `w_format` 1: a `_W4_SMALL` row) whose shared memory (`smem_fwd`, F2) fits `limit`;
    None when none does (the autotuned kernel then raises its own error)."""
    if interpret:
        rows = [_INTERPRET_GEMM]
    elif w_format:  # the 4-bit rows (`_W4_SMALL`), fewest rows first
        rows = _W4_FP32 if elem == 4 else [t for t in _W4_SMALL[::-1] if t[0] >= min(m, 32)]
    elif elem == 4:
        rows = fp32_tiles(r_pad)[-1:]
    else:
        rows = [t for t in _SPLITK_16BIT if t[0] >= min(m, 64)]
    for t in rows:
        if smem_fwd(t[0], t[1], t[2], t[5], elem, r_pad, False, w_format) <= limit:
            return _config(*t)
    return None


def splitk_plan(m: int, n: int, k: int, sm_count: int, elem: int, r_pad: int, limit: int,
                interpret: bool = INTERPRET, w_format: int = 0):
    """(config, SPLIT_K, K_PER_SPLIT) for the F2 forward GEMM, or None for the unsplit autotuned
    kernel (M > SMALL_M, or one split is enough). SPLIT_K is the fewest splits that make
    tiles·SPLIT_K >= sm_count (one wave), at most SPLITK_MAX and leaving every split at least
    SPLITK_MIN_K_STEPS BLOCK_K steps; K_PER_SPLIT is a multiple of BLOCK_K and no split is empty.
    The fp32 workspace is SPLIT_K·M·N·4 bytes (<= 16·64·N·4)."""
    if m > SMALL_M:
        return None
    cfg = splitk_config(m, elem, r_pad, limit, interpret, w_format)
    if cfg is None:
        return None
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = min(triton.cdiv(sm_count, tiles), SPLITK_MAX, triton.cdiv(k, bk * SPLITK_MIN_K_STEPS))
    if split <= 1:
        return None
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    return (cfg, split, k_per_split) if split > 1 else None
