# SPDX-License-Identifier: Apache-2.0
"""A mixed batch (per-row adapter ids, `contract.PerRowSpec`) by grouping rows: the base GEMM once
for all M rows, then per adapter one gathered shrink and one expand scattered back (index_add_)
over its rows, using the groups the op computed once per call. Plain PyTorch on any device: the
`cuda` and `reference` backends serve the per-row variant with it, `cpu` and `triton` its
backward (their forwards are fused kernels); on a GPU it is a composition, with one host sync
for the group bounds."""

from __future__ import annotations

import torch

from lora_kernels.contract import LoRAGrads, LoRAWeights, PerRowSpec


def _segments(spec: PerRowSpec):
    """(adapter t, its row indices (n_t,)) for every adapter with rows, in adapter order."""
    starts = spec.groups.starts.tolist()
    order = spec.groups.order
    return [(t, order[starts[t + 1]:starts[t + 2]]) for t in range(len(starts) - 2) if starts[t + 2] > starts[t + 1]]


def forward_per_row(x2d, weights: LoRAWeights, spec: PerRowSpec):
    """x2d (M, K) -> (y (M, N), xa (M, r)); xa is zero on base-only rows."""
    m, n, r = x2d.shape[0], weights.base.shape[0], weights.lora_A.shape[1]
    y = x2d.new_empty(m, n)
    if weights.bias is not None:
        y.copy_(weights.bias.expand(m, n))
    else:
        y.zero_()
    weights.base.matmul_into(y, x2d)  # the base GEMM once, onto the bias (beta = 1)
    xa = x2d.new_zeros(m, r)
    for t, rows in _segments(spec):
        xa_t = x2d.index_select(0, rows) @ weights.lora_A[t].t()
        xa.index_copy_(0, rows, xa_t)
        y.index_add_(0, rows, xa_t @ weights.lora_B[t].t(), alpha=spec.scalings[t])
    return y, xa


def backward_per_row(dy, x2d, weights: LoRAWeights, xa, spec: PerRowSpec, compute_dx) -> LoRAGrads:
    """dy (M, N) -> LoRAGrads(dx (M, K) or None, dA (T, r, K), dB (T, N, r)); the rank-r products
    accumulate in fp32 for fp16/bf16, as the fused kernels do."""
    acc = torch.promote_types(dy.dtype, torch.float32)
    grad_a = torch.zeros(weights.lora_A.shape, dtype=acc, device=dy.device)
    grad_b = torch.zeros(weights.lora_B.shape, dtype=acc, device=dy.device)
    grad_x = None
    if compute_dx:
        grad_x = torch.zeros(x2d.shape, dtype=x2d.dtype, device=x2d.device)
        weights.base.grad_input_into(grad_x, dy)  # the base GEMM once for all rows
        grad_x = grad_x.to(acc)  # a no-op for fp32/fp64; fp16/bf16 add the LoRA terms in fp32
    for t, rows in _segments(spec):
        s = spec.scalings[t]
        dy_t = dy.index_select(0, rows).to(acc)
        g_t = dy_t @ weights.lora_B[t].to(acc)  # (n_t, r)
        grad_a[t] = s * (g_t.t() @ x2d.index_select(0, rows).to(acc))
        grad_b[t] = s * (dy_t.t() @ xa.index_select(0, rows).to(acc))
        if compute_dx:
            grad_x.index_add_(0, rows, g_t @ weights.lora_A[t].to(acc), alpha=s)
    grad_x = grad_x.to(x2d.dtype) if compute_dx else None
    return LoRAGrads(grad_x, grad_a.to(dy.dtype), grad_b.to(dy.dtype))
