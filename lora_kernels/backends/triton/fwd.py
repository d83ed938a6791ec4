# SPDX-License-Identifier: Apache-2.0
"""Forward: ``y = x·Wᵀ + b + s·xa·Bᵀ`` with ``xa = dropout(x)·Aᵀ`` (docs/design.md §1, §3).

Two schedules, both kept selectable (`configs.resolve_schedule`):
  F1  one kernel: every (BLOCK_M, BLOCK_N) tile also accumulates dropout(x)·Aᵀ from the x tile it
      already loaded; the N tiles of a row block all compute the same xa, the first one stores it.
      Only for R_PAD <= 64 ("auto": only without dropout and for small M, see configs).
  F2  `_lora_fwd_xa_kernel` makes xa once (one read of x, the mask generated once), then the GEMM
      reads the (M, r) xa in its epilogue.
r is padded to R_PAD = max(16, next_pow2(r)) (the MMA minimum) with masked loads, never in memory.
Row indices are cast to int64 before they meet a stride, so M·K and M·N may exceed 2**31.
Kernels call triton builtins only, not triton's own jit helpers (tl.zeros, tl.cdiv, tl.randint4x):
see dropout.py for why.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lora_kernels.backends.triton import configs
from lora_kernels.backends.triton.dropout import _dropout_keep, dropout_params
from lora_kernels.backends.triton.nf4 import W_4BIT, _dequant_4bit, weight_args


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row blocks at a time so their W tiles stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.autotune(
    configs=configs.xa_configs(),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": configs.prune_stream},
)
@triton.jit
def _lora_fwd_xa_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ar, stride_ak,
    xa_ptr, stride_xam, stride_xar,
    seed_ptr,
    M, K, R, inv_keep, threshold, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """F2 pre-pass: xa[rows] = dropout(x[rows])·Aᵀ for one block of BLOCK_M rows (memory-bound)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak  # Aᵀ tile
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        flat_row = rows * K
    acc = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if HAS_DROPOUT:  # x·mask, exact in x's dtype; NaN/Inf in a dropped element propagates
            keep = _dropout_keep(seed, flat_row + k0, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
            x = x * keep.to(x.dtype)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += tl.cast(stride_xk, tl.int64) * BLOCK_K
        a_ptrs += tl.cast(stride_ak, tl.int64) * BLOCK_K
    if HAS_DROPOUT:
        acc = acc * inv_keep  # 1/(1-p) on the fp32 sum, not on every rounded x element
    xa_ptrs = xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(
    configs=configs.gemm_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "FUSE_XA", "HAS_DROPOUT", "DOT_PRECISION", "W_FORMAT", "QBLOCK"],
    prune_configs_by={"early_config_prune": configs.prune_fwd},
)
@triton.jit
def _lora_fwd_kernel(
    x_ptr, stride_xm, stride_xk,
    w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr,
    bias_ptr,
    a_ptr, stride_ar, stride_ak,
    b_ptr, stride_bn, stride_br,
    xa_ptr, stride_xam, stride_xar,
    y_ptr, stride_ym, stride_yn,
    seed_ptr, ws_ptr,
    M, N, K, R, scaling, inv_keep, threshold, M_BUCKET, K_PER_SPLIT,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_XA: tl.constexpr, K_ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_MODE: tl.constexpr = 0, W_FORMAT: tl.constexpr = 0, QBLOCK: tl.constexpr = 1,
):
    """One (BLOCK_M, BLOCK_N) tile of y = x·Wᵀ + b + s·xa·Bᵀ. FUSE_XA (F1): xa is accumulated here
    and stored by the pid_n == 0 tiles; else (F2) it is read from xa_ptr.

    Split-K (F2 only, SPLIT_MODE 1 or 2; K_PER_SPLIT a multiple of BLOCK_K): program axis 1 picks
    the K range [pid_k·K_PER_SPLIT, +K_PER_SPLIT); split 0 alone adds b + s·xa·Bᵀ. The fp32 partial
    goes to ws_ptr: SPLIT_MODE 1 stores it at ws[pid_k] (summed in split order by
    `_splitk_reduce_kernel`: deterministic), 2 atomically adds it into ws[0] (order not fixed).

    W_FORMAT 0: w_ptr is W (N, K) with strides; 1 (`nf4.W_4BIT`): w_ptr the packed 4-bit codes,
    absmax_ptr/code_ptr their scales and table, QBLOCK the blocksize; each step's Wᵀ tile is
    dequantized in registers (`nf4._dequant_4bit`) right before its dot."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    if SPLIT_MODE == 0:  # compile-time: F1/unsplit F2 keep constant loop bounds (F1 spilled otherwise)
        k_begin = 0
        k_end = K
    else:
        k_begin = pid_k * K_PER_SPLIT
        k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    offs_kk = (k_begin + offs_k).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_kk[None, :] * stride_xk
    if W_FORMAT == W_4BIT:  # flat index n*K + k of the Wᵀ tile: int64 start + int32 offsets
        w_flat0 = (pid_n * BLOCK_N).to(tl.int64) * K + k_begin
        w_row_off = tl.arange(0, BLOCK_N)[None, :] * K
    else:
        w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_kk[:, None] * stride_wk  # Wᵀ tile
    # Epilogue operands Bᵀ and bias are loaded before the main loop, so their latency hides
    # behind it (xa, a row-block operand, is loaded after: preloading it too made sm80 128x128
    # tiles on 4 warps spill).
    bt = tl.load(b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # Bᵀ tile (R_PAD, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if FUSE_XA:
        a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak  # Aᵀ tile
        acc_xa = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            flat_row = rows * K
    for k0 in range(k_begin, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if W_FORMAT == W_4BIT:
            w = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, w_flat0, w_row_off, mask_n[None, :], offs_k[:, None],
                              k_end - k0, BLOCK_K, QBLOCK, x_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if FUSE_XA:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if HAS_DROPOUT:  # x·mask (exact; NaN propagates), 1/(1-p) after the loop
                keep = _dropout_keep(seed, flat_row + k0, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
                x = x * keep.to(x.dtype)
            acc_xa = tl.dot(x, a, acc_xa, input_precision=DOT_PRECISION)
            a_ptrs += tl.cast(stride_ak, tl.int64) * BLOCK_K
        x_ptrs += tl.cast(stride_xk, tl.int64) * BLOCK_K
        if W_FORMAT == W_4BIT:
            w_flat0 += BLOCK_K
        else:
            w_ptrs += tl.cast(stride_wk, tl.int64) * BLOCK_K

    # Epilogue: + b + s·xa·B_tileᵀ; xa is rounded to the input dtype exactly as it is stored (and
    # as F2 reads it back), so F1 and F2 give the same y up to summation order.
    xa_ptrs = xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
    xa_mask = mask_m[:, None] & mask_r[None, :]
    if FUSE_XA:
        if HAS_DROPOUT:
            acc_xa = acc_xa * inv_keep
        xa = acc_xa.to(xa_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(xa_ptrs, xa, mask=xa_mask)
    else:
        xa = tl.load(xa_ptrs, mask=xa_mask, other=0.0)
    # Accumulate into acc (no second BLOCK_M x BLOCK_N fp32 tile: that spills at 128x256): s is
    # folded into the small xa operand, one extra rounding of the LoRA term in the input dtype.
    xa_s = (xa.to(tl.float32) * scaling).to(xa.dtype)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_MODE == 0:
        acc = tl.dot(xa_s, bt, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        if pid_k == 0:  # the LoRA term and the bias exactly once
            acc = tl.dot(xa_s, bt, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += bias[None, :]
        ws_ptrs = ws_ptr + rows[:, None] * N + cols[None, :]
        if SPLIT_MODE == 1:
            tl.store(ws_ptrs + tl.cast(pid_k, tl.int64) * M * N, acc, mask=out_mask)
        else:
            tl.atomic_add(ws_ptrs, acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, y_ptr, stride_ym, stride_yn, M, N, SPLIT_K, BLOCK: tl.constexpr):
    """y = sum over s of ws[s] (fp32 (SPLIT_K, M, N), contiguous), in split order, cast to y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(ws_ptr + tl.cast(s, tl.int64) * M * N + offs, mask=mask, other=0.0)
    rows = offs // N
    cols = offs % N
    tl.store(y_ptr + rows * stride_ym + cols * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(x: torch.Tensor) -> None:
    """The kernels accumulate in fp32: fp64 is not served (the reference and cpu backends do it)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float16, bfloat16 and float32, got {x.dtype}")


def r_pad(r: int) -> int:
    """r padded to the MMA minimum (16) and a power of two (tl.arange)."""
    return max(16, triton.next_power_of_2(r))


def lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, schedule=None):
    """x2d (M, K) any strides, weight (N, K) or a `nf4.PackedWeight4bit` of shape (N, K) (read
    and dequantized by the GEMM itself), bias (N,) or None, lora_A (r, K), lora_B (N, r) ->
    (y (M, N), xa (M, r)), both in x's dtype. Dropout is on iff `seed` (int64, shape (1,)) is given.
    `schedule`: "auto" | "F1" | "F2" (None: env LORA_KERNELS_TRITON_SCHEDULE, default "auto")."""
    check_dtype(x2d)
    m = x2d.shape[0]
    n, r = weight.shape[0], lora_A.shape[0]
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    xa = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y, xa
    fuse_xa = configs.resolve_schedule(schedule, m, r_pad(r), seed is not None) == "F1"
    with _device_of(x2d):
        if not fuse_xa:
            launch_xa(x2d, lora_A, xa, dropout_p, seed)
        launch_gemm(x2d, weight, bias, lora_A, lora_B, xa, y, scaling, dropout_p, seed, fuse_xa)
    return y, xa


def _common_flags(x2d, r, has_dropout) -> dict:
    return dict(HAS_DROPOUT=has_dropout, K_ALIGNED=x2d.shape[1] % 8 == 0, R_PAD=r_pad(r),
                DOT_PRECISION=configs.dot_precision(x2d.dtype))


def launch_xa(x2d, lora_A, xa, dropout_p, seed):
    """The F2 pre-pass into `xa` (M, r), any strides (a column slice of a wider xa too):
    xa = dropout(x)·lora_Aᵀ with x2d (M, K), lora_A (r, K); dropout iff `seed` is given."""
    m, k = x2d.shape
    r = lora_A.shape[0]
    threshold, inv_keep = dropout_params(dropout_p) if seed is not None else (0, 1.0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _lora_fwd_xa_kernel[grid](
        x2d, x2d.stride(0), x2d.stride(1),
        lora_A, lora_A.stride(0), lora_A.stride(1),
        xa, xa.stride(0), xa.stride(1),
        seed,
        m, k, r, inv_keep, threshold, configs.m_bucket(m),
        **_common_flags(x2d, r, seed is not None),
    )


def launch_gemm(x2d, weight, bias, lora_A, lora_B, xa, y, scaling, dropout_p, seed, fuse_xa):
    """The forward GEMM into y (M, N): y = x·Wᵀ + b + s·xa·Bᵀ, xa (M, r) read (F2) or made and
    stored here (F1, `fuse_xa`); split-K at decode (F2)."""
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    has_dropout = seed is not None
    threshold, inv_keep = dropout_params(dropout_p) if has_dropout else (0, 1.0)
    w_args, w_flags = weight_args(weight)
    plan = None if fuse_xa else configs.splitk_plan(
        m, n, k, _sm_count(x2d), x2d.element_size(), r_pad(r), configs.device_smem_limit(x2d.device),
        w_format=w_flags["W_FORMAT"])
    args = (
        x2d, x2d.stride(0), x2d.stride(1),
        *w_args,
        bias,
        lora_A, lora_A.stride(0), lora_A.stride(1),
        lora_B, lora_B.stride(0), lora_B.stride(1),
        xa, xa.stride(0), xa.stride(1),
        y, y.stride(0), y.stride(1),
        seed,
    )
    scalars = (m, n, k, r, float(scaling), inv_keep, threshold, configs.m_bucket(m))
    flags = dict(HAS_BIAS=bias is not None, FUSE_XA=fuse_xa, **_common_flags(x2d, r, has_dropout), **w_flags)
    if plan is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _lora_fwd_kernel[grid](*args, None, *scalars, k, **flags)
    else:
        _launch_splitk(plan, args, scalars, flags, y)


def _launch_splitk(plan, args, scalars, flags, y):
    """Split-K forward (decode, see `configs.splitk_plan`): partials into an fp32 workspace, then
    `_splitk_reduce_kernel` sums them in split order; non-deterministic mode atomically adds them
    into one zeroed fp32 buffer instead (the reduce kernel then only casts it)."""
    cfg, split_k, k_per_split = plan
    m, n = y.shape
    atomic = not configs.resolve_deterministic(None)
    copies = 1 if atomic else split_k
    alloc = torch.zeros if atomic else torch.empty
    ws = alloc((copies, m, n), dtype=torch.float32, device=y.device)
    tiles = triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(n, cfg.kwargs["BLOCK_N"])
    _lora_fwd_kernel.fn[(tiles, split_k)](
        *args, ws, *scalars, k_per_split, **flags, SPLIT_MODE=2 if atomic else 1,
        **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block = configs.SPLITK_REDUCE_BLOCK
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](ws, y, y.stride(0), y.stride(1), m, n, copies, BLOCK=block)


def _sm_count(t: torch.Tensor) -> int:
    """SMs of t's GPU; `configs.DEFAULT_SM_COUNT` for CPU tensors (interpreter)."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return configs.DEFAULT_SM_COUNT


def _device_of(t: torch.Tensor):
    """Launch on t's GPU (Triton uses the current device); a no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
