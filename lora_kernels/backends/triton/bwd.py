# SPDX-License-Identifier: Apache-2.0
"""Backward (docs/design.md §1, §3): three kernels, then fp32 partials reduced in a fixed order.

  `_lora_bwd_gdb_kernel`  one pass over dY on a 2-D grid (P row programs x C column chunks):
                          g = dY·B as C fp32 partials (M, r) and dB = s·dYᵀ·xa as P fp32
                          partials (N, r).
  `_lora_bwd_da_kernel`   one pass over x on a 2-D grid (P' row programs x K tiles): dA partial p
                          = s·Σ gᵀ·(D⊙x) over the row blocks p, p+P', ... (mask made once per element).
  `_lora_bwd_dx_kernel`   the dX GEMM, dX = dY·W + s·D⊙(g·A_tile), mask made once per element in
                          its epilogue. dA is not accumulated here: holding a (r, BLOCK_K) fp32
                          accumulator, the A tile and x next to the GEMM tile made ptxas spill.
Partial buffers are bounded by the grid (`configs.PARTIAL_BYTES`), not by M. g stays fp32 (hi/lo
split into two 16-bit operands for fp16/bf16 dots) and D⊙x is x·mask (exact in x's dtype), the
1/(1-p) factor applied to the fp32 results.
deterministic=True: the dY pass always runs a config chosen from the shape alone and the dX
kernel a pinned config (`configs.pinned_dx_config`, no autotuning), so the summation layout,
and the bits, are the same in every process on the same GPU model; partials are summed in a fixed
order. deterministic=False: the dX kernel is autotuned and dA/dB are fp32 atomics into one buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.backends.triton import configs
from lora_kernels.backends.triton.dropout import _dropout_keep, dropout_params
from lora_kernels.backends.triton.fwd import _device_of, _tile_ids, check_dtype, r_pad
from lora_kernels.backends.triton.nf4 import W_4BIT, _dequant_4bit, weight_args


@triton.jit
def _split_hi_lo(g, dtype: tl.constexpr):
    """fp32 g -> (hi, lo) in `dtype` with hi + lo = g to ~16 mantissa bits (2 MMAs keep g ~fp32)."""
    hi = g.to(dtype)
    return hi, (g - hi.to(tl.float32)).to(dtype)


@triton.jit
def _lora_bwd_gdb_kernel(
    dy_ptr, stride_dym, stride_dyn,
    b_ptr, stride_bn, stride_br,
    xa_ptr, stride_xam, stride_xar,
    gp_ptr, stride_gpc, stride_gpm, stride_gpr,
    db_ptr, stride_dbp, stride_dbn, stride_dbr,
    M, N, R, scaling, ROW_PROGRAMS, CHUNK_N,
    R_PAD: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (p, c): columns [c·CHUNK_N, +CHUNK_N) of dY, rows of blocks p, p+P, ...
    g partial c (rows, r) = dY·B over the chunk; dB partial p (cols, r) = s·dYᵀ·xa over its rows."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    n_start = pid_c * CHUNK_N
    n_end = tl.minimum(N, n_start + CHUNK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        db = tl.full((BLOCK_N, R_PAD), 0.0, tl.float32)
        for m0 in range(pid_p * BLOCK_M, M, ROW_PROGRAMS * BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows = offs_m.to(tl.int64)
            mask_m = offs_m < M
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            xa = tl.load(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            db = tl.dot(tl.trans(dy), xa, db, input_precision=DOT_PRECISION)
            g = tl.dot(dy, b, input_precision=DOT_PRECISION)
            g_ptrs = gp_ptr + pid_c.to(tl.int64) * stride_gpc + rows[:, None] * stride_gpm + offs_r[None, :] * stride_gpr
            g_mask = mask_m[:, None] & mask_r[None, :]
            if n0 != n_start:  # this program wrote these rows of partial c one column block ago
                g += tl.load(g_ptrs, mask=g_mask, other=0.0)
            tl.store(g_ptrs, g, mask=g_mask)
        db_ptrs = db_ptr + pid_p.to(tl.int64) * stride_dbp + offs_n[:, None].to(tl.int64) * stride_dbn \
            + offs_r[None, :] * stride_dbr
        db_mask = mask_n[:, None] & mask_r[None, :]
        if DETERMINISTIC:
            tl.store(db_ptrs, db * scaling, mask=db_mask)
        else:
            tl.atomic_add(db_ptrs, db * scaling, mask=db_mask, sem="relaxed")
        tl.debug_barrier()  # the g stores above are read back, maybe by other threads, next block


@triton.jit
def _lora_bwd_da_kernel(
    x_ptr, stride_xm, stride_xk,
    g_ptr, stride_gm, stride_gr,
    da_ptr, stride_dap, stride_dar, stride_dak,
    seed_ptr,
    M, K, R, scale, threshold, ROW_PROGRAMS,
    HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, K_ALIGNED: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (p, k-tile): dA partial p (r, K-tile) = scale·Σ gᵀ·(mask⊙x) over row blocks p, p+P, ...
    (scale = s/(1-p)); the mask is made once per element of the pass. Memory-bound: one read of x."""
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = offs_k.to(tl.int64)
    mask_k = offs_k < K
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    da = tl.full((R_PAD, BLOCK_K), 0.0, tl.float32)
    for m0 in range(pid_p * BLOCK_M, M, ROW_PROGRAMS * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        mask_m = offs_m < M
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:  # x·mask (never where(keep, x, 0)): a NaN/Inf in a dropped element propagates
            keep = _dropout_keep(seed, rows * K + pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
            x = x * keep.to(x.dtype)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # fp32 (BLOCK_M, R_PAD)
        if x.dtype == tl.float32:
            da = tl.dot(tl.trans(g), x, da, input_precision=DOT_PRECISION)
        else:
            g_hi, g_lo = _split_hi_lo(g, x.dtype)
            da = tl.dot(tl.trans(g_lo), x, tl.dot(tl.trans(g_hi), x, da))
    da_ptrs = da_ptr + pid_p.to(tl.int64) * stride_dap + offs_r[:, None] * stride_dar + cols[None, :] * stride_dak
    da_mask = mask_r[:, None] & mask_k[None, :]
    if DETERMINISTIC:
        tl.store(da_ptrs, da * scale, mask=da_mask)
    else:
        tl.atomic_add(da_ptrs, da * scale, mask=da_mask, sem="relaxed")


@triton.jit
def _dot_g(g, a, acc, DOT_PRECISION: tl.constexpr):
    """acc + g·a for fp32 g (hi/lo split into a's dtype when a is 16-bit, as the dX epilogue does)."""
    if a.dtype == tl.float32:
        return tl.dot(g, a, acc, input_precision=DOT_PRECISION)
    g_hi, g_lo = _split_hi_lo(g, a.dtype)
    return tl.dot(g_lo, a, tl.dot(g_hi, a, acc))


@triton.jit
def _dx_segments(acc, g_ptr, stride_gm, stride_gr, a_ptr, stride_ar, stride_ak, seed_ptr, seg_ptr, seg_scale_ptr,
                 rows, cols, mask_m, mask_k, flat_start, NUM_SEGMENTS: tl.constexpr, MASKED_SEGMENTS: tl.constexpr,
                 K_ALIGNED: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dX epilogue of several adapters: acc + Σₜ cₜ·Dₜ⊙(g[:, segₜ]·A[segₜ, tile]). Two runtime
    loops over the segment table: its first MASKED_SEGMENTS rows make a mask, the others have
    their cₜ folded into g and are accumulated in place (no second fp32 tile)."""
    offs_r = tl.arange(0, R_PAD)
    if MASKED_SEGMENTS > 0:  # (seed_ptr is None otherwise)
        for t in tl.range(0, MASKED_SEGMENTS, num_stages=1):
            g, a, c = _segment_operands(g_ptr, stride_gm, stride_gr, a_ptr, stride_ar, stride_ak, seg_ptr, seg_scale_ptr,
                                        t, rows, cols, mask_m, mask_k, offs_r)
            lora = _dot_g(g, a, tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32), DOT_PRECISION)
            seed = tl.load(seed_ptr + tl.load(seg_ptr + 4 * t + 3))
            keep = _dropout_keep(seed, flat_start, tl.load(seg_ptr + 4 * t + 2), BLOCK_M, BLOCK_K, K_ALIGNED)
            acc += lora * keep.to(tl.float32) * c
    for t in tl.range(MASKED_SEGMENTS, NUM_SEGMENTS, num_stages=1):
        g, a, c = _segment_operands(g_ptr, stride_gm, stride_gr, a_ptr, stride_ar, stride_ak, seg_ptr, seg_scale_ptr,
                                    t, rows, cols, mask_m, mask_k, offs_r)
        acc = _dot_g(g * c, a, acc, DOT_PRECISION)
    return acc


@triton.jit
def _segment_operands(g_ptr, stride_gm, stride_gr, a_ptr, stride_ar, stride_ak, seg_ptr, seg_scale_ptr, t,
                      rows, cols, mask_m, mask_k, offs_r):
    """Segment table row t -> (g[:, seg] fp32 (BLOCK_M, R_PAD), A[seg, tile] (R_PAD, BLOCK_K), cₜ)."""
    start = tl.load(seg_ptr + 4 * t)
    mask_r = offs_r < tl.load(seg_ptr + 4 * t + 1)
    cols_r = (start + offs_r).to(tl.int64)
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols_r[None, :] * stride_gr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    a = tl.load(a_ptr + cols_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    return g, a, tl.load(seg_scale_ptr + t)


@triton.autotune(
    configs=configs.dx_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "DOT_PRECISION", "W_FORMAT", "QBLOCK", "NUM_SEGMENTS",
         "MASKED_SEGMENTS"],
    prune_configs_by={"early_config_prune": configs.prune_dx},
)
@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, stride_dym, stride_dyn,
    w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr,
    a_ptr, stride_ar, stride_ak,
    g_ptr, stride_gm, stride_gr,
    dx_ptr, stride_dxm, stride_dxk,
    seed_ptr,
    M, N, K, R, scaling, inv_keep, threshold, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W_FORMAT: tl.constexpr = 0, QBLOCK: tl.constexpr = 1,
    seg_ptr=None, seg_scale_ptr=None, NUM_SEGMENTS: tl.constexpr = 0, MASKED_SEGMENTS: tl.constexpr = 0,
):
    """One (BLOCK_M, BLOCK_K) tile, grouped order: dX = dY·W + s·D⊙(g·A_tile). BLOCK_N is the
    reduction step over N; g is fp32 (M, r), split hi/lo into two 16-bit operands. W_FORMAT as in
    `fwd._lora_fwd_kernel`: 1 dequantizes each step's (BLOCK_N, BLOCK_K) W tile in registers.

    NUM_SEGMENTS > 0 (several adapters, `stacked.py`): g (M, R) and A (R, K) hold the adapters'
    rank columns side by side and the epilogue adds Σₜ cₜ·Dₜ⊙(g[:, segₜ]·A[segₜ]) instead
    (`_dx_segments`); seg_ptr is an int32 (NUM_SEGMENTS, 4) table (offset, rank, threshold,
    adapter index), its first MASKED_SEGMENTS rows the adapters that drop; seg_scale_ptr the fp32
    cₜ = sₜ/(1-pₜ) per row, seed_ptr the adapters' seeds; R_PAD pads one segment. NUM_SEGMENTS 0 (the default, tables None) compiles the single-adapter kernel as before."""
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    offs_n = tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    if W_FORMAT == W_4BIT:  # flat index n*K + k of the W tile: int64 start + int32 offsets
        w_flat0 = (pid_k * BLOCK_K).to(tl.int64)
        w_row_off = offs_n[:, None] * K
    else:
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if W_FORMAT == W_4BIT:
            w = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, w_flat0, w_row_off, mask_n[:, None],
                              tl.arange(0, BLOCK_K)[None, :], K - pid_k * BLOCK_K, BLOCK_K, QBLOCK,
                              dy_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        dy_ptrs += tl.cast(stride_dyn, tl.int64) * BLOCK_N
        if W_FORMAT == W_4BIT:
            w_flat0 += tl.cast(K, tl.int64) * BLOCK_N
        else:
            w_ptrs += tl.cast(stride_wn, tl.int64) * BLOCK_N

    # Epilogue. g, the A tile and the mask are made only now so they hold no registers in the loop.
    if NUM_SEGMENTS > 0:
        acc = _dx_segments(acc, g_ptr, stride_gm, stride_gr, a_ptr, stride_ar, stride_ak, seed_ptr, seg_ptr,
                           seg_scale_ptr, rows, cols, mask_m, mask_k, rows * K + pid_k * BLOCK_K,
                           NUM_SEGMENTS, MASKED_SEGMENTS, K_ALIGNED, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_K)
    else:
        g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # fp32 (BLOCK_M, R_PAD)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # (R_PAD, BLOCK_K)
        if HAS_DROPOUT:  # D⊙(g·A_tile) needs g·A_tile on its own
            lora = _dot_g(g, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_PRECISION)
            keep = _dropout_keep(tl.load(seed_ptr), rows * K + pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K,
                                 K_ALIGNED)
            acc += lora * keep.to(tl.float32) * (scaling * inv_keep)
        else:  # fold s into g and accumulate in place (no second fp32 tile)
            acc = _dot_g(g * scaling, a, acc, DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, deterministic=None):
    """dy (M, N) contiguous, x2d (M, K) any strides, weight (N, K) or a `nf4.PackedWeight4bit`
    (dequantized tile by tile in the dX GEMM), lora_A (r, K), lora_B (N, r),
    xa (M, r) -> (dx (M, K) or None, dA (r, K), dB (N, r)) in the parameters' dtype.
    The dropout mask is regenerated from `seed` (None: no dropout). `deterministic` (None: env
    LORA_KERNELS_TRITON_DETERMINISTIC, default on) picks pinned configs + ordered partial sums
    over autotuning + atomics."""
    check_dtype(x2d)
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    dev = x2d.device
    if m == 0:
        dx = torch.zeros((0, k), dtype=x2d.dtype, device=dev) if compute_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    deterministic = configs.resolve_deterministic(deterministic)
    plan = plan_backward(m, n, k, r, x2d, weight, seed is not None, bool(compute_dx), deterministic)
    threshold, inv_keep = dropout_params(dropout_p) if seed is not None else (0, 1.0)
    dx = torch.empty((m, k), dtype=x2d.dtype, device=dev) if compute_dx else None
    with _device_of(x2d):
        g, db_buf = launch_gdb(plan, dy, lora_B, xa, scaling, deterministic)
        da_buf = launch_da(plan, x2d, g, float(scaling) * inv_keep, threshold, seed, deterministic)
        if compute_dx:
            launch_dx(plan.dx, dy, weight, lora_A, g, dx, seed, scaling, inv_keep, threshold, plan.r_pad)
    grad_a = da_buf.sum(0).to(lora_A.dtype)
    grad_b = db_buf.sum(0).to(lora_B.dtype)
    return dx, grad_a, grad_b


def launch_gdb(plan, dy, lora_B, xa, scaling, deterministic):
    """The dY pass: (g (M, r) fp32, dB partials (P, N, r) fp32 whose sum is s·dYᵀ·xa), g = dY·B."""
    m, n = dy.shape
    r = lora_B.shape[1]
    alloc = torch.empty if deterministic else torch.zeros
    g_parts = torch.empty((plan.g_chunks, m, r), dtype=torch.float32, device=dy.device)
    db_buf = alloc((plan.db_partials, n, r), dtype=torch.float32, device=dy.device)
    gcfg = plan.gdb
    _lora_bwd_gdb_kernel[(plan.gdb_rows, plan.g_chunks)](
        dy, dy.stride(0), dy.stride(1),
        lora_B, lora_B.stride(0), lora_B.stride(1),
        xa, xa.stride(0), xa.stride(1),
        g_parts, *g_parts.stride(),
        db_buf, db_buf.stride(0) if deterministic else 0, db_buf.stride(1), db_buf.stride(2),
        m, n, r, float(scaling), plan.gdb_rows, plan.chunk_n,
        R_PAD=plan.r_pad, DETERMINISTIC=deterministic, DOT_PRECISION=configs.dot_precision(dy.dtype),
        num_warps=gcfg.num_warps, num_stages=gcfg.num_stages, **gcfg.kwargs,
    )
    # torch's sum over the leading dim is a fixed-order reduction (deterministic on CUDA and CPU).
    g = g_parts[0] if plan.g_chunks == 1 else g_parts.sum(0)
    return g, db_buf


def launch_da(plan, x2d, g, scale, threshold, seed, deterministic):
    """The dA pass: partials (P', r, K) fp32 summing to scale·gᵀ·(mask⊙x), g (M, r) fp32 any strides
    (a column slice of a wider g too); the mask of `seed` and `threshold` (seed None: none)."""
    m, k = x2d.shape
    r = g.shape[1]
    alloc = torch.empty if deterministic else torch.zeros
    da_buf = alloc((plan.da_partials, r, k), dtype=torch.float32, device=x2d.device)
    dcfg = plan.da
    _lora_bwd_da_kernel[(plan.da_rows, triton.cdiv(k, dcfg.kwargs["BLOCK_K"]))](
        x2d, x2d.stride(0), x2d.stride(1),
        g, g.stride(0), g.stride(1),
        da_buf, da_buf.stride(0) if deterministic else 0, da_buf.stride(1), da_buf.stride(2),
        seed,
        m, k, r, scale, threshold, plan.da_rows,
        HAS_DROPOUT=seed is not None, DETERMINISTIC=deterministic, K_ALIGNED=k % 8 == 0, R_PAD=plan.r_pad,
        DOT_PRECISION=configs.dot_precision(x2d.dtype), num_warps=dcfg.num_warps, num_stages=dcfg.num_stages,
        **dcfg.kwargs,
    )
    return da_buf


def launch_dx(cfg, dy, weight, lora_A, g, dx, seed, scaling, inv_keep, threshold, rp, segments=None):
    """The dX GEMM into dx (M, K): dY·W + s·D⊙(g·A); `cfg` the pinned config (deterministic) or
    None (autotuned). `segments`: None, or dict(seg_ptr=, seg_scale_ptr=, NUM_SEGMENTS=) for several
    adapters (see `_lora_bwd_dx_kernel`; rp then pads one segment)."""
    m, k = dx.shape
    n, r = weight.shape[0], lora_A.shape[0]
    w_args, w_flags = weight_args(weight)
    args = (
        dy, dy.stride(0), dy.stride(1),
        *w_args,
        lora_A, lora_A.stride(0), lora_A.stride(1),
        g, g.stride(0), g.stride(1),
        dx, dx.stride(0), dx.stride(1),
        seed,
        m, n, k, r, float(scaling), inv_keep, threshold, configs.m_bucket(m),
    )
    flags = dict(HAS_DROPOUT=seed is not None, K_ALIGNED=k % 8 == 0, R_PAD=rp,
                 DOT_PRECISION=configs.dot_precision(dy.dtype), **w_flags, **(segments or {}))
    if cfg is not None:  # pinned: the same tiles, hence the same bits, in every process
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(k, cfg.kwargs["BLOCK_K"]),)
        _lora_bwd_dx_kernel.fn[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
        _lora_bwd_dx_kernel[grid](*args, **flags)


class BackwardPlan:
    """Launch geometry of one backward call, a pure function of the shapes, dtype and device:
    gdb / dx configs (dx: None when autotuned), grid sizes and the partial buffers' leading dims."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def partial_bytes(self, m: int, n: int, k: int, r: int) -> dict:
        """fp32 bytes of the g, dB and dA partial buffers."""
        return {"g": self.g_chunks * m * r * 4, "dB": self.db_partials * n * r * 4, "dA": self.da_partials * r * k * 4}


def plan_backward(m, n, k, r, x2d, weight, has_dropout, compute_dx, deterministic, smem_limit=None):
    """The `BackwardPlan` for an (M, K) x, an (N, K) weight (dense or `nf4.PackedWeight4bit`) and
    rank r (see `lora_backward`)."""
    rp = r_pad(r)
    elem = x2d.element_size()
    limit = smem_limit or configs.device_smem_limit(x2d.device)
    gdb = configs.gdb_config(m, elem, rp, limit)
    gdb_rows, g_chunks = configs.gdb_grid(m, n, r, gdb.kwargs["BLOCK_M"], gdb.kwargs["BLOCK_N"])
    col_blocks = triton.cdiv(n, gdb.kwargs["BLOCK_N"])
    chunk_n = triton.cdiv(col_blocks, g_chunks) * gdb.kwargs["BLOCK_N"]
    g_chunks = triton.cdiv(n, chunk_n)  # rounding can leave fewer chunks than asked
    da = configs.da_config(m, elem, rp, limit)
    da_rows = min(triton.cdiv(m, da.kwargs["BLOCK_M"]), configs.da_row_programs_cap(k, r))
    dx_cfg = pinned_dx(m, k, rp, x2d, weight, has_dropout, limit) if deterministic and compute_dx else None
    return BackwardPlan(r_pad=rp, gdb=gdb, gdb_rows=gdb_rows, g_chunks=g_chunks, chunk_n=chunk_n, da=da,
                        da_rows=da_rows, dx=dx_cfg, db_partials=gdb_rows if deterministic else 1,
                        da_partials=da_rows if deterministic else 1)


def pinned_dx(m, k, rp, x2d, weight, has_dropout, smem_limit=None, segments=0):
    """The deterministic dX config (`configs.pinned_dx_config`) for an (M, K) x at R_PAD `rp`
    (`segments`: NUM_SEGMENTS of the several-adapter epilogue, 0 for one adapter)."""
    w_args, w_flags = weight_args(weight)
    named = {"M_BUCKET": configs.m_bucket(m), "w_ptr": w_args[0], "dy_ptr": x2d}
    limit = smem_limit or configs.device_smem_limit(x2d.device)
    extra = {"NUM_SEGMENTS": segments} if segments else {}
    return configs.pinned_dx_config(_lora_bwd_dx_kernel.configs, named, R_PAD=rp, HAS_DROPOUT=has_dropout,
                                    K_ALIGNED=k % 8 == 0, SMEM_LIMIT=limit, **w_flags, **extra)
