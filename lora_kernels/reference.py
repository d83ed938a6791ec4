# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch LoRA maths and the Python mirror of the dropout generator: the test oracle.

Everything here runs on any device and dtype, is written for clarity rather than speed, and
defines the behaviour every fused backend (cpu, triton, cuda) must reproduce.

The dropout rule itself lives in `lora_kernels.dropout`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lora_kernels.dropout import dropout_multiplier


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    return int(seed.reshape(-1)[0].item())


def lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The oracle, differentiable by plain autograd: x (..., K) -> y (..., N).

    ``y = x·weightᵀ + bias + scaling·(D ⊙ x)·lora_Aᵀ·lora_Bᵀ`` with D from the dropout rule
    when ``dropout_p > 0`` (then `seed` is required).
    """
    x_lora = x
    if dropout_p > 0.0:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        d = dropout_multiplier(_seed_int(seed), m, k, dropout_p, x.dtype, x.device)
        x_lora = x * d.reshape(x.shape)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


# --- the `reference` backend: the fused op's forward/backward written as plain PyTorch ---------


def forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x2d (M, K) -> (y (M, N), xa (M, r)); xa = dropout(x)·Aᵀ is what backward needs."""
    x_lora = x2d
    if seed is not None:
        m, k = x2d.shape
        x_lora = x2d * dropout_multiplier(_seed_int(seed), m, k, dropout_p, x2d.dtype, x2d.device)
    xa = x_lora @ lora_A.t()
    y = F.linear(x2d, weight, bias) + scaling * (xa @ lora_B.t())
    return y, xa


def backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx):
    """docs/design.md §1 gradients: (dx (M, K) or None, dA (r, K), dB (N, r)); the mask is regenerated."""
    # g and the rank-r products in fp32 for fp16/bf16, as the kernels do: a g rounded to 16 bits
    # loses dA to cancellation when dropout scales x up.
    acc = torch.promote_types(dy.dtype, torch.float32)
    g = dy.to(acc) @ lora_B.to(acc)  # (M, r)
    d = None
    if seed is not None:
        m, k = x2d.shape
        d = dropout_multiplier(_seed_int(seed), m, k, dropout_p, acc, x2d.device)
    x_lora = x2d.to(acc) if d is None else x2d.to(acc) * d
    grad_a = (scaling * (g.t() @ x_lora)).to(x2d.dtype)
    grad_b = (scaling * (dy.to(acc).t() @ xa.to(acc))).to(x2d.dtype)
    grad_x = None
    if compute_dx:
        lora_term = scaling * (g @ lora_A.to(acc))
        grad_x = (dy @ weight).to(acc) + (lora_term if d is None else lora_term * d)
        grad_x = grad_x.to(x2d.dtype)
    return grad_x, grad_a, grad_b
