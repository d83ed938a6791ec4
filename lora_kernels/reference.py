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
