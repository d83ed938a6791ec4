# SPDX-License-Identifier: Apache-2.0
"""Base-weight formats (one module each): how the frozen W₀ is stored and multiplied.

`FORMATS` maps a format name to its `BaseWeight` class; `as_base_weight` wraps a plain tensor
as "dense" and passes a `BaseWeight` through."""

from __future__ import annotations

from typing import Union

from torch import Tensor

from lora_kernels.base_weights.base import FORMATS, ROW_BLOCK, BaseWeight, register_format
from lora_kernels.base_weights.dense import DenseWeight
from lora_kernels.base_weights.nf4 import FP4Weight, NF4Weight

__all__ = [
    "BaseWeight",
    "DenseWeight",
    "FORMATS",
    "FP4Weight",
    "NF4Weight",
    "ROW_BLOCK",
    "as_base_weight",
    "register_format",
]


def as_base_weight(weight: Union[Tensor, BaseWeight]) -> BaseWeight:
    """A tensor (N, K) -> DenseWeight; a BaseWeight unchanged; TypeError otherwise."""
    if isinstance(weight, BaseWeight):
        return weight
    if isinstance(weight, Tensor):
        return DenseWeight(weight)
    raise TypeError(f"weight must be a torch.Tensor (N, K) or a lora_kernels BaseWeight, got {type(weight).__name__}")
