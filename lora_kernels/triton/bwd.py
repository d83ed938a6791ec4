"""Backward (DESIGN §1, §3): two kernels, then fp32 partials reduced in a fixed order.

  `_lora_bwd_gdb_kernel`  one pass over dY: g = dY·B (M, r) complete per row block, and the row
                          block's share of dB = s·dYᵀ·xa (N, r).
  `_lora_bwd_dx_kernel`   dX = dY·W + s·D⊙(g·A) per (BLOCK_M, BLOCK_K) tile, the mask regenerated
                          for that tile; the same epilogue loads the x tile once and adds the row
                          block's share of dA = s·gᵀ·(D⊙x) (r, K).
deterministic=True: each row block writes its own fp32 partial of dA/dB and the partials are summed
in a fixed order afterwards (bitwise reproducible). deterministic=False: fp32 atomics into one
buffer (no partials, run-to-run bits may differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.triton import configs
from lora_kernels.triton.dropout import _dropout_keep, dropout_params
from lora_kernels.triton.fwd import _device_of, _tile_ids, check_dtype, r_pad


@triton.autotune(
    configs=configs.gdb_configs(),
    key=["M_BUCKET", "N", "R_PAD", "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": configs.prune_gdb},
    reset_to_zero=["db_ptr"],  # atomics accumulate; partials are fully overwritten anyway
)
@triton.jit
def _lora_bwd_gdb_kernel(
    dy_ptr, stride_dym, stride_dyn,
    b_ptr, stride_bn, stride_br,
    xa_ptr, stride_xam, stride_xar,
    g_ptr, stride_gm, stride_gr,
    db_ptr, stride_dbp, stride_dbn, stride_dbr,
    M, N, R, scaling, M_BUCKET,
    R_PAD: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows [pid·BLOCK_M, +BLOCK_M): g = dY·B, and s·dYᵀ·xa into dB partial `pid` (or atomically)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    offs_n = tl.arange(0, BLOCK_N)
    xa = tl.load(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    db_ptrs = db_ptr + pid_m.to(tl.int64) * stride_dbp + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
    g = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + (n0 + offs_n[:, None]).to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        g = tl.dot(dy, b, g, input_precision=DOT_PRECISION)
        db = scaling * tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION)  # (BLOCK_N, R_PAD)
        db_mask = mask_n[:, None] & mask_r[None, :]
        if DETERMINISTIC:
            tl.store(db_ptrs, db, mask=db_mask)
        else:
            tl.atomic_add(db_ptrs, db, mask=db_mask, sem="relaxed")
        dy_ptrs += tl.cast(stride_dyn, tl.int64) * BLOCK_N
        db_ptrs += BLOCK_N * stride_dbn
    tl.store(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr, g.to(g_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(
    configs=configs.dx_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "COMPUTE_DX", "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": configs.prune_dx},
    reset_to_zero=["da_ptr"],
)
@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, stride_dym, stride_dyn,
    w_ptr, stride_wn, stride_wk,
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ar, stride_ak,
    g_ptr, stride_gm, stride_gr,
    dx_ptr, stride_dxm, stride_dxk,
    da_ptr, stride_dap, stride_dar, stride_dak,
    seed_ptr,
    M, N, K, R, scaling, inv_keep, threshold, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, DETERMINISTIC: tl.constexpr, K_ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile: dX = dY·W + s·D⊙(g·A_tile) (when COMPUTE_DX), and
    s·gᵀ·(D⊙x_tile) into dA partial `pid_m` (or atomically). BLOCK_N is the reduction step over N."""
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    tile_mask = mask_m[:, None] & mask_k[None, :]
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    if COMPUTE_DX:
        offs_n = tl.arange(0, BLOCK_N)
        dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
        for n0 in range(0, N, BLOCK_N):
            mask_n = (n0 + offs_n) < N
            dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            dy_ptrs += tl.cast(stride_dyn, tl.int64) * BLOCK_N
            w_ptrs += tl.cast(stride_wn, tl.int64) * BLOCK_N

    # Epilogue. g, the A tile and the mask are made only now so they hold no registers in the loop.
    g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # (BLOCK_M, R_PAD)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = _dropout_keep(seed, rows * K + pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
    if COMPUTE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # (R_PAD, BLOCK_K)
        if HAS_DROPOUT:  # D⊙(g·A_tile) needs g·A_tile on its own
            lora = tl.dot(g, a, input_precision=DOT_PRECISION)
            acc += tl.where(keep, lora * (scaling * inv_keep), 0.0)
        else:  # fold s into g and accumulate in place (no second fp32 tile)
            acc = tl.dot((g.to(tl.float32) * scaling).to(g.dtype), a, acc, input_precision=DOT_PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)

    # dA share of this row block, from the x tile (loaded once, here, with x's own strides).
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_mask, other=0.0)
    if HAS_DROPOUT:
        x = tl.where(keep, x * inv_keep, 0.0).to(g.dtype)
    da = scaling * tl.dot(tl.trans(g), x, input_precision=DOT_PRECISION)  # (R_PAD, BLOCK_K)
    da_ptrs = da_ptr + pid_m.to(tl.int64) * stride_dap + offs_r[:, None] * stride_dar + cols[None, :] * stride_dak
    da_mask = mask_r[:, None] & mask_k[None, :]
    if DETERMINISTIC:
        tl.store(da_ptrs, da, mask=da_mask)
    else:
        tl.atomic_add(da_ptrs, da, mask=da_mask, sem="relaxed")


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, deterministic=None):
    """dy (M, N) contiguous, x2d (M, K) any strides, weight (N, K), lora_A (r, K), lora_B (N, r),
    xa (M, r) -> (dx (M, K) or None, dA (r, K), dB (N, r)) in the parameters' dtype.
    The dropout mask is regenerated from `seed` (None: no dropout). `deterministic` (None: env
    LORA_KERNELS_TRITON_DETERMINISTIC, default on) picks partials + ordered sum over atomics."""
    check_dtype(x2d)
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    dev = x2d.device
    if m == 0:
        dx = torch.zeros((0, k), dtype=x2d.dtype, device=dev) if compute_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    deterministic = configs.resolve_deterministic(deterministic)
    has_dropout = seed is not None
    threshold, inv_keep = dropout_params(dropout_p) if has_dropout else (0, 1.0)
    rp = r_pad(r)
    precision = configs.dot_precision(x2d.dtype)
    bucket = configs.m_bucket(m)
    g = torch.empty((m, r), dtype=x2d.dtype, device=dev)
    dx = torch.empty((m, k), dtype=x2d.dtype, device=dev) if compute_dx else None
    # Partials: one (N, r) / (r, K) fp32 slice per row block of the launched config. The config
    # is not known before the launch, so allocate for the smallest BLOCK_M the autotuner may pick
    # for this call (its own pruning, replayed) and sum only the slices the launched config wrote.
    if deterministic:
        named = {"M_BUCKET": bucket, "w_ptr": weight}
        gdb_rows = _min_block_m(configs.prune_gdb(_lora_bwd_gdb_kernel.configs, named))
        dx_rows = _min_block_m(configs.prune_dx(_lora_bwd_dx_kernel.configs, named, R_PAD=rp,
                                                HAS_DROPOUT=has_dropout, COMPUTE_DX=bool(compute_dx)))
        db_buf = torch.empty((triton.cdiv(m, gdb_rows), n, r), dtype=torch.float32, device=dev)
        da_buf = torch.empty((triton.cdiv(m, dx_rows), r, k), dtype=torch.float32, device=dev)
    else:
        db_buf = torch.zeros((1, n, r), dtype=torch.float32, device=dev)
        da_buf = torch.zeros((1, r, k), dtype=torch.float32, device=dev)
    with _device_of(x2d):
        _lora_bwd_gdb_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            dy, dy.stride(0), dy.stride(1),
            lora_B, lora_B.stride(0), lora_B.stride(1),
            xa, xa.stride(0), xa.stride(1),
            g, g.stride(0), g.stride(1),
            db_buf, db_buf.stride(0) if deterministic else 0, db_buf.stride(1), db_buf.stride(2),
            m, n, r, float(scaling), bucket,
            R_PAD=rp, DETERMINISTIC=deterministic, DOT_PRECISION=precision,
        )
        db_blocks = _blocks_used(_lora_bwd_gdb_kernel, m, db_buf) if deterministic else 1
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
        _lora_bwd_dx_kernel[grid](
            dy, dy.stride(0), dy.stride(1),
            weight, weight.stride(0), weight.stride(1),
            x2d, x2d.stride(0), x2d.stride(1),
            lora_A, lora_A.stride(0), lora_A.stride(1),
            g, g.stride(0), g.stride(1),
            dx, *(dx.stride() if compute_dx else (0, 0)),
            da_buf, da_buf.stride(0) if deterministic else 0, da_buf.stride(1), da_buf.stride(2),
            seed,
            m, n, k, r, float(scaling), inv_keep, threshold, bucket,
            HAS_DROPOUT=has_dropout, COMPUTE_DX=bool(compute_dx), DETERMINISTIC=deterministic,
            K_ALIGNED=k % 8 == 0, R_PAD=rp, DOT_PRECISION=precision,
        )
        da_blocks = _blocks_used(_lora_bwd_dx_kernel, m, da_buf) if deterministic else 1
    # torch's sum over the leading dim is a fixed-order reduction (deterministic on CUDA and CPU).
    grad_a = da_buf[:da_blocks].sum(0).to(lora_A.dtype)
    grad_b = db_buf[:db_blocks].sum(0).to(lora_B.dtype)
    return dx, grad_a, grad_b


def _min_block_m(candidates) -> int:
    return min(c.kwargs["BLOCK_M"] for c in candidates)


def _blocks_used(kernel, m: int, partials: torch.Tensor) -> int:
    """Row blocks written by the config `kernel` (an Autotuner) just launched with."""
    used = triton.cdiv(m, kernel.best_config.kwargs["BLOCK_M"])
    assert used <= partials.shape[0], "partial buffer sized for fewer row blocks than launched"
    return used
