# SPDX-License-Identifier: Apache-2.0
"""`BaseWeight`: the frozen base weight W₀ (N, K) of a LoRA layer in some storage format, as the
one step of the layer that depends on that format: the base products ``y += x·W₀ᵀ`` (forward) and
``dX += dY·W₀`` (backward). Backends that compute the LoRA terms on their own (cpu, cuda) call
these; a backend whose main loop fuses W₀ (triton) declares which formats it reads itself."""

from __future__ import annotations

import abc
from typing import ClassVar, Dict, List, Tuple, Type

import torch
from torch import Tensor

# Rows of W₀ per step of `row_norms_sq` and of the tiled formats' products: bounds the temporary
# (a block of rows in the compute dtype), never the whole N x K.
ROW_BLOCK = 256


class BaseWeight(abc.ABC):
    """A frozen (no gradient) base weight W₀ of shape (N, K) that computes in `dtype` on `device`.

    Subclasses set `format` (the registry key, e.g. "dense", "nf4") and implement the two
    products, `dense` (the oracle's view) and `flatten`/`unflatten` (the flat tensor list the
    torch.library schema carries, so torch.compile sees plain tensors)."""

    format: ClassVar[str]

    @property
    @abc.abstractmethod
    def shape(self) -> Tuple[int, int]:
        """(N, K)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The compute dtype: x, lora_A, lora_B and bias must have it; y and dX come out in it."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def matmul_into(self, y: Tensor, x2d: Tensor) -> None:
        """y (M, N) += x2d (M, K) · W₀ᵀ, in place, in `dtype`."""

    @abc.abstractmethod
    def grad_input_into(self, dx: Tensor, dy: Tensor) -> None:
        """dx (M, K) += dy (M, N) · W₀, in place, in `dtype`."""

    @abc.abstractmethod
    def dense(self) -> Tensor:
        """W₀ as a dense (N, K) tensor in `dtype`: the oracle's and the tests' view (materializes N x K)."""

    @abc.abstractmethod
    def flatten(self) -> Tuple[List[Tensor], List[int]]:
        """(tensors, ints) from which `unflatten` rebuilds this weight."""

    @classmethod
    @abc.abstractmethod
    def unflatten(cls, tensors: List[Tensor], meta: List[int]) -> BaseWeight: ...

    def max_temporary_bytes(self) -> int:
        """The most memory one product allocates besides its output (a tile, its scratch): the
        format's memory contract (a 4-bit base keeps it under 1/8 of its dequantized weight)."""
        return 0

    def row_norms_sq(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """‖W₀ₙ‖² per output row n: (N,) summed in `dtype` (float32, or float64 for an fp64 base),
        in blocks of ROW_BLOCK rows (DoRA's norm)."""
        n, k = self.shape
        out = torch.empty(n, dtype=dtype, device=self.device)
        for n0 in range(0, n, ROW_BLOCK):
            rows = self.dense_rows(n0, min(n0 + ROW_BLOCK, n))
            out[n0 : n0 + rows.shape[0]] = rows.to(dtype).pow(2).sum(1)
        return out

    def dense_rows(self, n0: int, n1: int) -> Tensor:
        """Rows n0:n1 of W₀ (n1 - n0, K) in `dtype`; tiled formats override this with a direct dequantization."""
        return self.dense()[n0:n1]


FORMATS: Dict[str, Type[BaseWeight]] = {}


def register_format(cls: Type[BaseWeight]) -> Type[BaseWeight]:
    """Class decorator: make `cls` the BaseWeight of `cls.format`."""
    FORMATS[cls.format] = cls
    return cls
