# SPDX-License-Identifier: Apache-2.0
"""Several adapters summed in one layer (`contract.StackedSpec`, docs/design.md §10) on the
single-adapter kernels of fwd.py / bwd.py; the only new kernel code is the dX epilogue's segment
loop (`bwd._dx_segments`).

  y  = x·W₀ᵀ + b + Σₜ sₜ·xa[:, segₜ]·B[:, segₜ]ᵀ,   xa[:, segₜ] = Dₜ(x)·A[segₜ]ᵀ
  g  = dY·B;  dB[:, segₜ] = sₜ·dYᵀ·xa[:, segₜ];  dA[segₜ] = sₜ·g[:, segₜ]ᵀ·Dₜ(x)
  dX = dY·W₀ + Σₜ sₜ·Dₜ⊙(g[:, segₜ]·A[segₜ])

Forward: the F2 pre-pass (`_lora_fwd_xa_kernel`) once per "run" of adapters, writing its column
slice of the (M, R) xa in place: an adapter that drops is a run of its own (its mask, seeds[t]),
consecutive adapters that do not drop share one. Then ONE forward GEMM over the whole rank R
(no dropout, scaling 1) with Bᵀ's columns pre-scaled by sₜ (an (N, R) copy): the base GEMM
and every adapter's expand are one kernel whatever T.
Backward: one dY pass over the concatenation (g, and dB with sₜ applied to the fp32 sum), one dA
pass per run on g's column slice, and one dX GEMM whose epilogue loops over the T segments
(mask t regenerated from seeds[t]). Nothing M×K is saved or materialised. An adapter that drops
is a run of its own, whose pre-pass and dA pass are the single-adapter launches (same config,
seed and threshold), so its xa columns are the bits a one-adapter call with seeds[t:t+1] gives;
adapters without dropout share a run (another R_PAD, so maybe another config), and every dA
gets its sₜ after the fp32 sum.
The dX epilogue's tile is capped (`configs.SEGMENTS_TIGHT_ACC_PER_THREAD`): with dropout and
K % 8 != 0 or a segment padded to R_PAD >= 64 only the small-tile fallback compiles spill-free
(slower; GPU performance unmeasured). Known limit: with dropout and a rank sum padded to R_PAD
256 (ΣR > 128) every selectable dX tile spills (ptxas: 4-1206 bytes; tests/test_triton_stacked.py
compiles them all), correct but slower; chunking R in the epilogue would lift it.
"""

from __future__ import annotations

import functools

import torch

from lora_kernels.backends.triton import configs
from lora_kernels.backends.triton.bwd import launch_da, launch_dx, launch_gdb, pinned_dx, plan_backward
from lora_kernels.backends.triton.dropout import dropout_params
from lora_kernels.backends.triton.fwd import _device_of, check_dtype, launch_gemm, launch_xa, r_pad
from lora_kernels.contract import StackedSpec


def _drops(spec: StackedSpec, seeds) -> tuple:
    """Per adapter: whether it applies a mask (seeds given and its rate > 0)."""
    return tuple(seeds is not None and p > 0.0 for p in spec.dropout_ps)


def _check_seeds(spec: StackedSpec, seeds, device) -> None:
    if seeds is None:
        return
    t = len(spec.ranks)
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (t,):
        got = f"{tuple(seeds.shape)} {seeds.dtype}" if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise ValueError(f"seeds must be an int64 tensor of shape ({t},) (one per adapter), got {got}")
    if seeds.device != device:
        raise ValueError(f"seeds must be on x's device {device}, got {seeds.device}")


def _runs(spec: StackedSpec, drops: tuple) -> list:
    """Adapter ranges [t0, t1) launched together: each dropping adapter alone, consecutive
    non-dropping ones as one, as (t0, t1, first rank column, last + 1)."""
    runs, offsets = [], spec.offsets
    for t in range(len(spec.ranks)):
        if runs and not drops[t] and not drops[runs[-1][0]]:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1])
    return [(t0, t1, offsets[t0], offsets[t1 - 1] + spec.ranks[t1 - 1]) for t0, t1 in runs]


@functools.lru_cache(maxsize=64)
def _tables(spec: StackedSpec, drops: tuple, device: torch.device):
    """Per-spec device constants (built once, no host->device copy per call): the fp32 (R,) column
    scaling sₜ of every rank column; the dX segment table int32 (T, 4) = (offset, rank, threshold,
    adapter index), the adapters that drop first (`bwd._dx_segments`), and its fp32 (T,)
    factors cₜ = sₜ/(1-pₜ) (sₜ without a mask)."""
    cols = torch.repeat_interleave(torch.tensor(spec.scalings, dtype=torch.float32),
                                   torch.tensor(spec.ranks, dtype=torch.int64))
    rows, factors = [], []
    for t in sorted(range(len(spec.ranks)), key=lambda t: not drops[t]):
        a = spec.adapters[t]
        threshold, inv_keep = dropout_params(a.dropout_p) if drops[t] else (0, 1.0)
        rows.append((spec.offsets[t], spec.ranks[t], threshold, t))
        factors.append(a.scaling * inv_keep)
    seg = torch.tensor(rows, dtype=torch.int32)
    return cols.to(device), seg.to(device), torch.tensor(factors, dtype=torch.float32).to(device)


def stacked_forward(x2d, weight, bias, lora_A, lora_B, spec: StackedSpec, seeds):
    """x2d (M, K) any strides, weight (N, K) or a `nf4.PackedWeight4bit`, bias (N,) or None,
    lora_A (R, K) and lora_B (N, R) (the adapters' ranks concatenated, `spec`), seeds int64 (T,)
    or None -> (y (M, N), xa (M, R)) in x's dtype."""
    check_dtype(x2d)
    _check_seeds(spec, seeds, x2d.device)
    m = x2d.shape[0]
    n, big_r = weight.shape[0], spec.total_rank
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    xa = torch.empty((m, big_r), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y, xa
    drops = _drops(spec, seeds)
    col_scale = _tables(spec, drops, x2d.device)[0]
    with _device_of(x2d):
        for t0, _, lo, hi in _runs(spec, drops):
            seed = seeds[t0 : t0 + 1] if drops[t0] else None
            launch_xa(x2d, lora_A[lo:hi], xa[:, lo:hi], spec.adapters[t0].dropout_p, seed)
        # sₜ folded into Bᵀ's columns (rounded once to the compute dtype, as the single-adapter
        # GEMM rounds s·xa): the GEMM then runs at scaling 1 without dropout.
        b_scaled = (lora_B * col_scale).to(lora_B.dtype)  # promoted to fp32 for the product
        launch_gemm(x2d, weight, bias, lora_A, b_scaled, xa, y, 1.0, 0.0, None, False)
    return y, xa


def stacked_backward(dy, x2d, weight, lora_A, lora_B, xa, spec: StackedSpec, seeds, compute_dx, deterministic=None):
    """dy (M, N) contiguous, x2d (M, K) any strides, weight as `stacked_forward`, lora_A (R, K),
    lora_B (N, R), xa (M, R) from the forward -> (dx (M, K) or None, dA (R, K), dB (N, R)).
    `deterministic` as `bwd.lora_backward`."""
    check_dtype(x2d)
    _check_seeds(spec, seeds, x2d.device)
    m, k = x2d.shape
    n, big_r = weight.shape[0], spec.total_rank
    dev = x2d.device
    if m == 0:
        dx = torch.zeros((0, k), dtype=x2d.dtype, device=dev) if compute_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    deterministic = configs.resolve_deterministic(deterministic)
    drops = _drops(spec, seeds)
    col_scale, seg_table, seg_factors = _tables(spec, drops, dev)
    grad_a = torch.empty((big_r, k), dtype=lora_A.dtype, device=dev)
    dx = torch.empty((m, k), dtype=x2d.dtype, device=dev) if compute_dx else None
    with _device_of(x2d):
        plan = plan_backward(m, n, k, big_r, x2d, weight, any(drops), False, deterministic)
        g, db_buf = launch_gdb(plan, dy, lora_B, xa, 1.0, deterministic)
        for t0, t1, lo, hi in _runs(spec, drops):
            a = spec.adapters[t0]
            run_plan = plan_backward(m, n, k, hi - lo, x2d, weight, drops[t0], False, deterministic)
            threshold, inv_keep = dropout_params(a.dropout_p) if drops[t0] else (0, 1.0)
            # One adapter: its sₜ/(1-pₜ) inside the pass, as a one-adapter call applies it (same
            # bits); several (no dropout): sₜ per rank row on the fp32 sum.
            scale = a.scaling * inv_keep if t1 - t0 == 1 else 1.0
            da_buf = launch_da(run_plan, x2d, g[:, lo:hi], scale, threshold, seeds[t0 : t0 + 1] if drops[t0] else None,
                               deterministic)
            da = da_buf.sum(0)
            grad_a[lo:hi] = da if t1 - t0 == 1 else da * col_scale[lo:hi, None]
        if compute_dx:
            rp = max(r_pad(r) for r in spec.ranks)
            segments = len(spec.ranks)
            cfg = pinned_dx(m, k, rp, x2d, weight, any(drops), segments=segments) if deterministic else None
            launch_dx(cfg, dy, weight, lora_A, g, dx, seeds if any(drops) else None, 1.0, 1.0, 0, rp,
                      segments=dict(seg_ptr=seg_table, seg_scale_ptr=seg_factors, NUM_SEGMENTS=segments,
                                    MASKED_SEGMENTS=sum(drops)))
    grad_b = (db_buf.sum(0) * col_scale).to(lora_B.dtype)
    return dx, grad_a, grad_b
