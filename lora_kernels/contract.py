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
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from lora_kernels._extension import has_op
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


# --- several adapters in one call (docs/design.md §10) ------------------------------------------


@dataclass(frozen=True)
class StackedSpec:
    """Several adapters summed into one layer: ``y = x·W₀ᵀ + b + Σₜ sₜ·(Dₜ(x)·Aₜᵀ)·Bₜᵀ``.

    The weights travel concatenated along the rank: `LoRAWeights.lora_A` is (R, K) and `lora_B`
    (N, R) with R = Σ ranks; adapter t owns rank columns ``offsets[t] : offsets[t] + ranks[t]``
    (ranks may differ: concatenated, never padded). `adapters[t]` is its scaling and dropout rate
    as the op normalised them (`LoRASpec`). Dropout: `seeds` is an int64 (T,) tensor on x's
    device, or None when no adapter drops; adapter t's mask is the single-adapter rule of
    `lora_kernels.dropout` under ``seeds[t]`` (ignored when its rate is 0), so each adapter's
    mask is bit-identical to a one-adapter call with that seed."""

    adapters: Tuple[LoRASpec, ...]
    ranks: Tuple[int, ...]

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Start of each adapter's rank columns: (T,)."""
        out, start = [], 0
        for r in self.ranks:
            out.append(start)
            start += r
        return tuple(out)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @property
    def scalings(self) -> Tuple[float, ...]:
        return tuple(a.scaling for a in self.adapters)

    @property
    def dropout_ps(self) -> Tuple[float, ...]:
        return tuple(a.dropout_p for a in self.adapters)


class RowGroups(NamedTuple):
    """The rows of one mixed-batch call grouped by adapter, computed once per call (forward and
    backward share it). All tensors on x's device, int64.

    ids: (M,) adapter of each row, -1 for base-only rows; order: (M,) row indices sorted by id
    (stable: base rows first, then adapter 0's, 1's, ...); starts: (T + 2,) where the rows of
    adapter t are ``order[starts[t + 1] : starts[t + 2]]`` and the base rows ``order[0 : starts[1]]``."""

    ids: Tensor
    order: Tensor
    starts: Tensor


def check_id_range(ids: Tensor, num_adapters: int) -> None:
    """ValueError naming the first row whose id is outside [-1, num_adapters) (one host sync)."""
    bad = (ids < -1) | (ids >= num_adapters)
    if bool(bad.any()):  # an id out of range would index past the stacks
        m = int(bad.nonzero()[0, 0])
        raise ValueError(f"adapter_ids must be in [-1, {num_adapters}) (-1: base only; {num_adapters} adapters), "
                         f"got adapter_ids[{m}] = {int(ids[m])}")


def group_rows(adapter_ids: Tensor, num_adapters: int) -> RowGroups:
    """`RowGroups` of adapter_ids (M,) int32/int64, values in [-1, num_adapters). On a GPU: one
    stable sort and a search, no host sync, so a decode step never waits on it (the op checks the
    values). On the CPU it checks them itself (`check_id_range`'s ValueError), by the compiled
    counting sort where built: microseconds, where torch.sort and its parallel region cost ~0.1 ms."""
    ids = adapter_ids.reshape(-1).to(torch.int64)
    if ids.device.type == "cpu":
        if has_op("group_rows", "cpu"):
            return RowGroups(ids, *torch.ops.lora_kernels.group_rows(ids, num_adapters))
        check_id_range(ids, num_adapters)
    sorted_ids, order = torch.sort(ids, stable=True)
    bounds = torch.arange(-1, num_adapters + 1, dtype=torch.int64, device=ids.device)
    return RowGroups(ids, order, torch.searchsorted(sorted_ids, bounds))


@dataclass(frozen=True)
class PerRowSpec:
    """A mixed batch: ``yₘ = xₘ·W₀ᵀ + b + s₍ᵢₘ₎·(xₘ·A₍ᵢₘ₎ᵀ)·B₍ᵢₘ₎ᵀ`` with iₘ = ``groups.ids[m]``
    (-1: base only). `LoRAWeights.lora_A` is (T, r, K) and `lora_B` (T, N, r) (ranks padded with
    zeros to a common r); `scalings` (T,) floats. No dropout on this path."""

    scalings: Tuple[float, ...]
    groups: RowGroups
