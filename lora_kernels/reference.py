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

from lora_kernels.base_weights import BaseWeight
from lora_kernels.dropout import dropout_multiplier


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    return int(seed.reshape(-1)[0].item())


def lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor | BaseWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The oracle, differentiable by plain autograd: x (..., K) -> y (..., N).

    ``y = x·weightᵀ + bias + scaling·(D ⊙ x)·lora_Aᵀ·lora_Bᵀ`` with D from the dropout rule
    when ``dropout_p > 0`` (then `seed` is required). A `BaseWeight` counts as its dense W₀.
    """
    if isinstance(weight, BaseWeight):
        weight = weight.dense()
    x_lora = x
    if dropout_p > 0.0:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        d = dropout_multiplier(_seed_int(seed), m, k, dropout_p, x.dtype, x.device)
        x_lora = x * d.reshape(x.shape)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


def lora_linear_stacked_eager(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, seeds=None) -> torch.Tensor:
    """Oracle of several adapters summed: x (..., K) -> y (..., N) =
    ``x·W₀ᵀ + bias + Σₜ scalings[t]·(Dₜ ⊙ x)·lora_As[t]ᵀ·lora_Bs[t]ᵀ`` with lora_As[t] (r_t, K),
    lora_Bs[t] (N, r_t) and Dₜ the dropout rule under ``seeds[t]`` (int64 (T,)) when dropout_ps[t] > 0."""
    y = lora_linear_eager(x, weight, bias, lora_As[0], lora_Bs[0], scalings[0], dropout_ps[0],
                          None if seeds is None else seeds[0:1])
    for t in range(1, len(lora_As)):
        seed = None if seeds is None else seeds[t : t + 1]
        x_lora = x
        if dropout_ps[t] > 0.0:
            k = x.shape[-1]
            d = dropout_multiplier(_seed_int(seed), x.numel() // k, k, dropout_ps[t], x.dtype, x.device)
            x_lora = x * d.reshape(x.shape)
        y = y + scalings[t] * F.linear(F.linear(x_lora, lora_As[t]), lora_Bs[t])
    return y


def lora_linear_per_row_eager(x, weight, bias, lora_A, lora_B, scalings, adapter_ids) -> torch.Tensor:
    """Oracle of a mixed batch, row by row: x (..., K), lora_A (T, r, K), lora_B (T, N, r),
    scalings (T,) floats, adapter_ids (M,) int over the M = prod(x.shape[:-1]) rows (-1: base
    only) -> y (..., N) with ``yₘ = xₘ·W₀ᵀ + b + s·(xₘ·A₍ᵢₘ₎ᵀ)·B₍ᵢₘ₎ᵀ``."""
    if isinstance(weight, BaseWeight):
        weight = weight.dense()
    x2d = x.reshape(-1, x.shape[-1])
    y = F.linear(x2d, weight, bias)
    ids = adapter_ids.reshape(-1).to(torch.int64)
    terms = []
    for m in range(x2d.shape[0]):
        i = int(ids[m])
        if i < 0:
            terms.append(torch.zeros_like(y[m]))
        else:
            terms.append(scalings[i] * (lora_B[i] @ (lora_A[i] @ x2d[m])))
    lora = torch.stack(terms) if terms else torch.zeros_like(y)
    return (y + lora).reshape(*x.shape[:-1], y.shape[-1])
