# SPDX-License-Identifier: Apache-2.0
"""The contract between the op and its backends: what one `lora_linear` call hands a backend.

Every backend (`lora_kernels.backends.<name>`) implements

    forward(x2d, weights: LoRAWeights, spec: LoRASpec, seed) -> (y (M, N), xa (M, r))
    backward(dy, x2d, weights: LoRAWeights, xa, spec, seed, compute_dx) -> LoRAGrads

with x2d (M, K) of any strides, dy (M, N) contiguous, y and grads in the compute dtype
(`weights.base.dtype`), and ``xa = dropout(x)·lora_Aᵀ`` the one activation saved besides x.
Dropout is on iff `seed` (int64, shape (1,), on x's device) is given; the rule is
`lora_kernels.dropout`'s. The maths is docs/design.md §1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor

from lora_kernels.base_weights import BaseWeight, DenseWeight


@dataclass(frozen=True)
class LoRASpec:
    """The scalars of one call, as the op normalised them: `dropout_p` is the rate in effect (0 in
    eval mode or without dropout; "everything dropped" already served as p = 0, scaling = 0)."""

    scaling: float
    dropout_p: float = 0.0


@dataclass(frozen=True)
class LoRAWeights:
    """The layer's parameters: the frozen base W₀ (N, K) in its storage format, bias (N,) or None,
    lora_A (r, K) and lora_B (N, r) contiguous, all computing in `base.dtype` on one device."""

    base: BaseWeight
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor

    @property
    def dense_weight(self) -> Optional[Tensor]:
        """W₀ as the (N, K) tensor when the base is dense (backends that fuse it read it), else None."""
        return self.base.weight if isinstance(self.base, DenseWeight) else None


class LoRAGrads(NamedTuple):
    """What a backend's backward returns: grad_x (M, K) or None (not requested), grad_A (r, K), grad_B (N, r)."""

    x: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
