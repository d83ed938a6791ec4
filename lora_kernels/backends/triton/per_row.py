# SPDX-License-Identifier: Apache-2.0
"""Mixed batch (per-row adapter ids, S-LoRA/Punica style): ``yₘ = xₘ·W₀ᵀ + b + s₍ᵢₘ₎·(xₘ·A₍ᵢₘ₎ᵀ)·B₍ᵢₘ₎ᵀ``.

Forward, two launches, no Python loop over adapters and no host sync:
  `_per_row_shrink_kernel`  xa = x·A_idᵀ, SGMV-style: program (j, g) takes the j-th BLOCK_M rows
                            of group g of the sorted order (`contract.RowGroups`: g = 0 the base
                            rows, which get xa = 0; g = t + 1 adapter t), so a block never spans
                            two adapters: one pipelined K loop with one A_t. The group sizes stay
                            on the GPU: the grid is sized for the worst case, cdiv(M, BLOCK_M) x
                            (T + 1), and programs past their group's end exit at once (decode,
                            M = 64 over 32 adapters: 32 busy programs, 33 with base rows, in
                            parallel, each reading its A_t once; a grid over blocks of the sorted
                            order instead would run each block's adapters one after another).
  `_per_row_fwd_kernel`     the base GEMM y = x·W₀ᵀ + b (main loop as `fwd._lora_fwd_kernel`,
                            dense or 4-bit W₀) over row tiles of the *sorted* order (x rows
                            gathered, y rows scattered back through `order`), the expand in its
                            epilogue: for each distinct adapter t among the tile's rows, acc +=
                            (s_t·xa masked to t's rows)·B_tᵀ as tensor-core dots. A uniform tile
                            (tl.min == tl.max of its adapter ids: the common case once rows are
                            sorted, base rows allowed) runs that once, exactly the one-adapter
                            epilogue; a mixed tile once per adapter it holds; base rows add nothing.
Why sorted order for the GEMM: tiles then mostly hold one adapter (only tiles at a group edge mix),
and the gathered rows cost nothing per element (each row's K slice stays contiguous). At decode
(M <= 64, one row tile) the order is immaterial and the tile is mixed: it runs one dependent round
(a (16, BLOCK_N) B_t slice load and an MMA per 16 rank columns) per adapter it holds.
Why not a per-row gather of B for mixed tiles (acc += (s·xa[:, j])[:, None]·B[id_row, n, j] over
j): compiled for sm80 at R_PAD 64 (bf16, 64x128x32 on 4 warps) it spilled 8328 bytes unrolled
and 12294 bytes as a loop of 4-column steps (the blocked-layout gathers meet the MMA-layout
accumulator every column), where the per-adapter dots spill nothing on every selectable tile.

Backward (training through this path, rare): composed per adapter group, `backends/grouped.py`.
r is padded to R_PAD = max(16, next_pow2(r)) (the MMA minimum) with masked loads; row and
adapter indices are int64 before they meet a stride. GPU speed: unmeasured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.backends.triton import configs
from lora_kernels.backends.triton.fwd import _device_of, _tile_ids, check_dtype, r_pad
from lora_kernels.backends.triton.nf4 import W_4BIT, _dequant_4bit, weight_args

# Rank columns per epilogue dot (the 16-bit MMA's K): see `_per_row_fwd_kernel`'s epilogue.
_R_CHUNK = tl.constexpr(16)


@triton.jit
def _next_adapter(ids, after, T):
    """The smallest adapter id in `ids` above `after` (0-d int64), T when there is none."""
    return tl.min(tl.where(ids > after, ids, T), axis=0)


@triton.autotune(
    configs=configs.xa_configs(),
    key=["M_BUCKET", "K", "R_PAD", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": configs.prune_stream},
)
@triton.jit
def _per_row_shrink_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_at, stride_ar, stride_ak,
    xa_ptr, stride_xam, stride_xar,
    order_ptr, starts_ptr,
    M, K, R, M_BUCKET,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (j, g): sorted positions p in [starts[g] + j·BLOCK_M, +BLOCK_M) ∩ [.., starts[g + 1]),
    rows order[p]: xa[rows] = x[rows]·A_{g-1}ᵀ, or 0 for g = 0 (the base rows)."""
    group = tl.program_id(1)
    end = tl.load(starts_ptr + group + 1)
    first = tl.load(starts_ptr + group) + tl.program_id(0) * BLOCK_M
    if first < end:  # else this block of the worst-case grid has no rows
        offs_p = first + tl.arange(0, BLOCK_M)
        mask_p = offs_p < end
        rows = tl.load(order_ptr + offs_p, mask=mask_p, other=0)  # int64
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        acc = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
        if group > 0:
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
            a_ptrs = a_ptr + (group - 1).to(tl.int64) * stride_at + offs_r[None, :] * stride_ar \
                + offs_k[:, None].to(tl.int64) * stride_ak  # A_tᵀ tile
            for k0 in range(0, K, BLOCK_K):
                mask_k = (k0 + offs_k) < K
                x = tl.load(x_ptrs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
                a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
                x_ptrs += tl.cast(stride_xk, tl.int64) * BLOCK_K
                a_ptrs += tl.cast(stride_ak, tl.int64) * BLOCK_K
        xa_ptrs = xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
        tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_r[None, :])


# The gathered rows and the per-adapter epilogue hold registers the one-adapter GEMM does not:
# ptxas (-v, bf16, AOT) spilled at 128 accumulators a thread (sm80 128x256x32/8 warps: 52-232
# bytes at R_PAD 16-64, 128x128x32/4 warps: 4-320 at R_PAD 32-64; sm90 128x256x64/8 warps: 8 at
# R_PAD 64) and at none of <= 64 but one: the 8-warp 128x64 tile, which the configs carry as room
# for a dropout mask (none here), spilled 12 bytes on sm80 at R_PAD 32 (capped at 128 registers);
# its 4-warp twin serves (a 4-bit W₀ keeps it: its only large tile, `configs._W4_SM80/_SM90`,
# compiled spill-free here). The full sweep (tests/test_triton_per_row.py: every selectable config,
# sm80/86/90, fp16/bf16, R_PAD 16..256, dense and 4-bit W₀; 714 compiles) found one more: the
# 32x64x128 tile at 4 stages spilled 12 bytes on sm90 at R_PAD 128 (the xa/B epilogue tiles
# beside a deep K pipeline), so R_PAD >= 128 drops it. Every tile these rules keep compiled
# spill-free in that sweep.
ACC_PER_THREAD = 64
_MASK_ROOM_TILE = (128, 64, 8)  # (BLOCK_M, BLOCK_N, warps)
_WIDE_R_SPILL_TILE = (32, 64, 128, 4)  # (BLOCK_M, BLOCK_N, BLOCK_K, stages), dropped at R_PAD >= 128


def prune_fwd(configs_, named_args, **kwargs):
    """`configs.prune_fwd` (decode/large tiles, shared memory within the device's limit), then only
    tiles with at most ACC_PER_THREAD accumulators a thread, for a dense W₀ without
    `_MASK_ROOM_TILE`, and at R_PAD >= 128 without `_WIDE_R_SPILL_TILE` (the smallest survivor of
    `configs.prune_fwd` if none is left)."""
    kept = configs.prune_fwd(configs_, named_args, **kwargs)
    dense = kwargs.get("W_FORMAT", 0) == 0
    wide_r = kwargs.get("R_PAD", 16) >= 128

    def spills(c):
        kw = c.kwargs
        return ((dense and (kw["BLOCK_M"], kw["BLOCK_N"], c.num_warps) == _MASK_ROOM_TILE)
                or (wide_r and (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages) == _WIDE_R_SPILL_TILE))

    roomy = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= ACC_PER_THREAD * 32 * c.num_warps
             and not spills(c)]
    return roomy or kept[-1:]


@triton.autotune(
    configs=configs.gemm_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "DOT_PRECISION", "W_FORMAT", "QBLOCK"],
    prune_configs_by={"early_config_prune": prune_fwd},
)
@triton.jit
def _per_row_fwd_kernel(
    x_ptr, stride_xm, stride_xk,
    w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr,
    bias_ptr,
    b_ptr, stride_bt, stride_bn, stride_br,
    xa_ptr, stride_xam, stride_xar,
    y_ptr, stride_ym, stride_yn,
    ids_ptr, order_ptr, scale_ptr,
    M, N, K, R, T, M_BUCKET,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W_FORMAT: tl.constexpr = 0, QBLOCK: tl.constexpr = 1,
):
    """One (BLOCK_M sorted rows, BLOCK_N) tile of y = x·W₀ᵀ + b + s_t·xa·B_tᵀ per row's adapter t.
    Main loop as `fwd._lora_fwd_kernel` (F2, unsplit; W_FORMAT 1 dequantizes 4-bit W₀ tiles in
    registers) on rows gathered through `order`; the epilogue adds the LoRA term of each row's
    adapter: one dot round per distinct adapter the tile holds (one for a uniform tile)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_p = offs_p < M
    rows = tl.load(order_ptr + offs_p, mask=mask_p, other=0)  # int64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.int64)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    if W_FORMAT == W_4BIT:  # flat index n*K + k of the Wᵀ tile: int64 start + int32 offsets
        w_flat0 = (pid_n * BLOCK_N).to(tl.int64) * K
        w_row_off = tl.arange(0, BLOCK_N)[None, :] * K
    else:
        w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk  # Wᵀ tile
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        if W_FORMAT == W_4BIT:
            w = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, w_flat0, w_row_off, mask_n[None, :], offs_k[:, None],
                              K - k0, BLOCK_K, QBLOCK, x_ptr.dtype.element_ty)
            w_flat0 += BLOCK_K
        else:
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            w_ptrs += tl.cast(stride_wk, tl.int64) * BLOCK_K
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += tl.cast(stride_xk, tl.int64) * BLOCK_K

    # Epilogue: the row indices (reloaded rather than kept live across the main loop), the ids,
    # xa and Bᵀ are loaded only now. Per distinct adapter t of the tile: acc += (s_t·xa)·B_tᵀ
    # with xa read for t's rows only (other rows 0), in _R_CHUNK-wide rank slices (whole
    # (R_PAD, BLOCK_N) Bᵀ and (BLOCK_M, R_PAD) xa tiles held more registers next to the accumulator).
    rows = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
    ids = tl.load(ids_ptr + rows, mask=mask_p, other=-1)
    t = _next_adapter(ids, -1, T)
    while t < T:  # a uniform tile: once; a mixed one: once per distinct adapter; base rows: never
        mine = ids == t
        s_t = tl.load(scale_ptr + t)
        for r0 in tl.static_range(0, R_PAD, _R_CHUNK):
            offs_r = r0 + tl.arange(0, _R_CHUNK)
            mask_r = offs_r < R
            xa = tl.load(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                         mask=mine[:, None] & mask_r[None, :], other=0.0)
            bt = tl.load(b_ptr + t * stride_bt + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # B_tᵀ slice (_R_CHUNK, BLOCK_N)
            # s folded into the small xa operand: one rounding to the input dtype, as the
            # one-adapter forward does.
            xa_s = (xa.to(tl.float32) * s_t).to(xa.dtype)
            acc = tl.dot(xa_s, bt, acc, input_precision=DOT_PRECISION)
        t = _next_adapter(ids, t, T)
    if HAS_BIAS:
        acc += bias[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])


def per_row_forward(x2d, weight, bias, lora_A, lora_B, scaling_tensor, groups):
    """x2d (M, K) any strides, weight (N, K) or a `nf4.PackedWeight4bit`, bias (N,) or None,
    lora_A (T, r, K), lora_B (T, N, r), scaling_tensor (T,) fp32, groups a `contract.RowGroups`
    -> (y (M, N), xa (M, r)) in x's dtype; xa rows of base rows (id -1) are 0. Two launches,
    no host sync."""
    check_dtype(x2d)
    m, k = x2d.shape
    t, r = lora_A.shape[0], lora_A.shape[1]
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    xa = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y, xa
    rp = r_pad(r)
    precision = configs.dot_precision(x2d.dtype)
    ids, order = groups.ids, groups.order
    with _device_of(x2d):
        _per_row_shrink_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), t + 1)](
            x2d, x2d.stride(0), x2d.stride(1),
            lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
            xa, xa.stride(0), xa.stride(1),
            order, groups.starts,
            m, k, r, configs.m_bucket(m),
            R_PAD=rp, DOT_PRECISION=precision,
        )
        w_args, w_flags = weight_args(weight)
        _per_row_fwd_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            x2d, x2d.stride(0), x2d.stride(1),
            *w_args,
            bias,
            lora_B, lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
            xa, xa.stride(0), xa.stride(1),
            y, y.stride(0), y.stride(1),
            ids, order, scaling_tensor,
            m, n, k, r, t, configs.m_bucket(m),
            HAS_BIAS=bias is not None, R_PAD=rp, DOT_PRECISION=precision, **w_flags,
        )
    return y, xa
