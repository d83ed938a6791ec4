# SPDX-License-Identifier: Apache-2.0
"""The `reference` backend: the fused op's forward and backward written as plain PyTorch, on any
device and dtype and any base-weight format (through the format's own products). Slow and clear."""

from __future__ import annotations

import torch

from lora_kernels.backends.grouped import backward_per_row, forward_per_row  # noqa: F401  (a mixed batch)
from lora_kernels.backends.registry import Backend, register
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights
from lora_kernels.dropout import dropout_multiplier

BACKEND = register(
    Backend(
        name="reference",
        module=__name__,
        device_types=("cpu", "cuda", "mps", "xpu", "meta"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        variants=("lora", "stacked", "per_row"),
    )
)


def _multiplier(x2d, p, seed, dtype):
    m, k = x2d.shape
    return dropout_multiplier(int(seed.reshape(-1)[0].item()), m, k, p, dtype, x2d.device)


def forward(x2d, weights: LoRAWeights, spec: LoRASpec, seed):
    """x2d (M, K) -> (y (M, N), xa (M, r)); xa = dropout(x)·Aᵀ is what backward needs."""
    x_lora = x2d if seed is None else x2d * _multiplier(x2d, spec.dropout_p, seed, x2d.dtype)
    xa = x_lora @ weights.lora_A.t()
    y = x2d.new_zeros(x2d.shape[0], weights.lora_B.shape[0])
    weights.base.matmul_into(y, x2d)
    if weights.bias is not None:
        y += weights.bias
    return y + spec.scaling * (xa @ weights.lora_B.t()), xa


def backward(dy, x2d, weights: LoRAWeights, xa, spec: LoRASpec, seed, compute_dx) -> LoRAGrads:
    """docs/design.md §1 gradients: LoRAGrads(dx (M, K) or None, dA (r, K), dB (N, r)); the mask is regenerated."""
    # g and the rank-r products in fp32 for fp16/bf16, as the kernels do: a g rounded to 16 bits
    # loses dA to cancellation when dropout scales x up.
    acc = torch.promote_types(dy.dtype, torch.float32)
    s = spec.scaling
    g = dy.to(acc) @ weights.lora_B.to(acc)  # (M, r)
    d = None if seed is None else _multiplier(x2d, spec.dropout_p, seed, acc)
    x_lora = x2d.to(acc) if d is None else x2d.to(acc) * d
    grad_a = (s * (g.t() @ x_lora)).to(x2d.dtype)
    grad_b = (s * (dy.to(acc).t() @ xa.to(acc))).to(x2d.dtype)
    grad_x = None
    if compute_dx:
        lora_term = s * (g @ weights.lora_A.to(acc))
        base_term = torch.zeros_like(x2d, memory_format=torch.contiguous_format)
        weights.base.grad_input_into(base_term, dy)
        grad_x = (base_term.to(acc) + (lora_term if d is None else lora_term * d)).to(x2d.dtype)
    return LoRAGrads(grad_x, grad_a, grad_b)


# --- several adapters summed (contract.StackedSpec) ----------------------------------------------


def _adapter_multipliers(x2d, spec, seeds, dtype):
    """D_t (M, K) per adapter (None where it does not drop): each adapter's rule under seeds[t]."""
    return [None if seeds is None or a.dropout_p == 0.0 else _multiplier(x2d, a.dropout_p, seeds[t : t + 1], dtype)
            for t, a in enumerate(spec.adapters)]


def _column_scales(spec, dtype, device):
    """(R,) the scaling of each rank column."""
    return torch.cat([torch.full((r,), a.scaling, dtype=dtype, device=device) for a, r in zip(spec.adapters, spec.ranks)])


def forward_stacked(x2d, weights: LoRAWeights, spec, seeds):
    """x2d (M, K) -> (y (M, N), xa (M, R)): xa[:, seg_t] = D_t(x)·A_tᵀ, y = base + bias + xa·(B·diag(s))ᵀ."""
    ds = _adapter_multipliers(x2d, spec, seeds, x2d.dtype)
    parts = weights.lora_A.split(list(spec.ranks))
    xa = torch.cat([(x2d if d is None else x2d * d) @ a.t() for d, a in zip(ds, parts)], dim=1)
    y = x2d.new_zeros(x2d.shape[0], weights.lora_B.shape[0])
    weights.base.matmul_into(y, x2d)
    if weights.bias is not None:
        y += weights.bias
    return y + xa @ (weights.lora_B * _column_scales(spec, x2d.dtype, x2d.device)).t(), xa


def backward_stacked(dy, x2d, weights: LoRAWeights, xa, spec, seeds, compute_dx) -> LoRAGrads:
    """LoRAGrads(dx (M, K) or None, dA (R, K), dB (N, R)); each adapter's mask regenerated from its seed."""
    acc = torch.promote_types(dy.dtype, torch.float32)  # as `backward`
    scales = _column_scales(spec, acc, dy.device)
    g = dy.to(acc) @ weights.lora_B.to(acc)  # (M, R)
    ds = _adapter_multipliers(x2d, spec, seeds, acc)
    grad_b = ((dy.to(acc).t() @ xa.to(acc)) * scales).to(x2d.dtype)
    grad_a, lora_dx = [], None
    for d, g_t, a_t, adapter in zip(ds, g.split(list(spec.ranks), dim=1), weights.lora_A.split(list(spec.ranks)),
                                    spec.adapters):
        x_lora = x2d.to(acc) if d is None else x2d.to(acc) * d
        grad_a.append(adapter.scaling * (g_t.t() @ x_lora))
        if compute_dx:
            term = adapter.scaling * (g_t @ a_t.to(acc))
            term = term if d is None else term * d
            lora_dx = term if lora_dx is None else lora_dx + term
    grad_x = None
    if compute_dx:
        base_term = torch.zeros_like(x2d, memory_format=torch.contiguous_format)
        weights.base.grad_input_into(base_term, dy)
        grad_x = (base_term.to(acc) + lora_dx).to(x2d.dtype)
    return LoRAGrads(grad_x, torch.cat(grad_a).to(x2d.dtype), grad_b)

