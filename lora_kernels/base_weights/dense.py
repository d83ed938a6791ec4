# SPDX-License-Identifier: Apache-2.0
"""The dense base weight: a plain (N, K) float tensor, as nn.Linear holds it."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from lora_kernels.base_weights.base import BaseWeight, register_format


@register_format
class DenseWeight(BaseWeight):
    """W₀ stored as a dense (N, K) tensor of the compute dtype."""

    format = "dense"

    def __init__(self, weight: Tensor):
        self.weight = weight

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def matmul_into(self, y: Tensor, x2d: Tensor) -> None:
        y.addmm_(x2d, self.weight.t())

    def grad_input_into(self, dx: Tensor, dy: Tensor) -> None:
        dx.addmm_(dy, self.weight)

    def dense(self) -> Tensor:
        return self.weight

    def dense_rows(self, n0: int, n1: int) -> Tensor:
        return self.weight[n0:n1]

    def flatten(self) -> Tuple[List[Tensor], List[int]]:
        return [self.weight], []

    @classmethod
    def unflatten(cls, tensors: List[Tensor], meta: List[int]) -> DenseWeight:
        return cls(tensors[0])
