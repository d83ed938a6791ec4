# SPDX-License-Identifier: Apache-2.0
"""A mixed batch (multi-tenant serving, PEFT's ``adapter_names``): each row of x uses its own
adapter, ``yₘ = xₘ·W₀ᵀ + b + s₍ᵢₘ₎·(xₘ·A₍ᵢₘ₎ᵀ)·B₍ᵢₘ₎ᵀ``, ``iₘ = adapter_ids[m]``, -1 for base-only rows.

The adapters travel stacked, (T, r, K) and (T, N, r); a list of adapters with different ranks is
zero-padded to the largest (a zero row of A and column of B add nothing; pre-stack them once to
serve many calls). The rows are grouped by adapter once per call (`contract.group_rows`, no host
sync); backends: triton fuses the shrink and the expand into the base GEMM's epilogue, cpu/cuda/
reference run the base GEMM once and one gathered product per adapter (`backends/grouped.py`).
No dropout here (PEFT serves mixed batches in eval mode only); gradients flow all the same.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_kernels.backends import BACKENDS, resolve
from lora_kernels.base_weights import BaseWeight, DenseWeight, as_base_weight
from lora_kernels.contract import LoRAWeights, PerRowSpec, check_id_range, group_rows
from lora_kernels.ops import _rows, guarded_backward
from lora_kernels.reference import lora_linear_per_row_eager
from lora_kernels.variants.adapters import (
    AdapterTensors,
    adapter_lists,
    backward_rows,
    check_adapter,
    check_scalings,
    forward_rows,
    per_adapter,
)
from lora_kernels.variants.base import Variant, register_variant


class PerRowCall(NamedTuple):
    """An eager call's non-differentiable part: base weight, spec (scalings, row groups), backend."""

    base: BaseWeight
    spec: PerRowSpec
    backend: str


class _EagerPerRow(torch.autograd.Function):
    """Forward and backward of a mixed batch through the backend's per-row entry points."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, call: PerRowCall):
        weights = LoRAWeights(call.base, bias, lora_A, lora_B)
        y, xa = forward_rows(x, call.base.shape[0], lora_A.shape[1],
                             lambda x2d: BACKENDS[call.backend].forward_per_row(x2d, weights, call.spec))
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.call = call._replace(base=None) if weight is not None else call
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return guarded_backward(ctx, grad_y, _per_row_input_grads)


def _per_row_input_grads(ctx, grad_y) -> tuple:
    """Gradients for _EagerPerRow's inputs (x, weight, bias, lora_A, lora_B, call)."""
    x, weight, lora_A, lora_B, xa = ctx.saved_tensors
    call = ctx.call
    base = DenseWeight(weight) if weight is not None else call.base
    weights = LoRAWeights(base, None, lora_A, lora_B)
    needs_x = ctx.needs_input_grad[0]
    grad_x, grad_w, grad_bias, grad_a, grad_b = backward_rows(
        grad_y, x, weight, base.shape[0], ctx.needs_input_grad[:3], lora_A, lora_B,
        lambda dy, x2d: BACKENDS[call.backend].backward_per_row(dy, x2d, weights, xa, call.spec, needs_x))
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def _check_ids(adapter_ids, count: int, x: Tensor) -> None:
    rows = _rows(x)
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be an integer tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be an integer tensor (int32 or int64), got {adapter_ids.dtype}")
    if adapter_ids.numel() != rows:
        raise ValueError(f"adapter_ids must hold one id per row of x (M = {rows} for x of shape {tuple(x.shape)}), "
                         f"got {adapter_ids.numel()} (shape {tuple(adapter_ids.shape)})")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids must be on x's device {x.device}, got {adapter_ids.device}")
    if rows > 0 and adapter_ids.device.type != "cpu":  # on the CPU `group_rows` checks them as it groups
        check_id_range(adapter_ids.reshape(-1), count)


def stack_adapters(tensors, pad_dim: int) -> Tensor:
    """Per-adapter tensors stacked to (T, ...), zero-padded along `pad_dim` (the rank: 0 for the
    (r_t, K) lora_A's, 1 for the (N, r_t) lora_B's) to the largest: the op's stacked form."""
    width = max(t.shape[pad_dim] for t in tensors)
    padded = []
    for t in tensors:
        extra = width - t.shape[pad_dim]
        pad = (0, 0, 0, extra) if pad_dim == 0 else (0, extra)
        padded.append(F.pad(t, pad) if extra else t)
    return torch.stack(padded)


def lora_linear_per_row(
    x: Tensor,
    weight: Union[Tensor, BaseWeight],
    bias: Optional[Tensor],
    lora_A: AdapterTensors,
    lora_B: AdapterTensors,
    scaling,
    adapter_ids: Tensor,
    backend: str = "auto",
) -> Tensor:
    """A mixed batch in one fused call: row m of x uses adapter ``adapter_ids[m]`` (-1: base only).

    x: (..., K) with M = prod(x.shape[:-1]) rows; weight: (N, K) tensor or `BaseWeight`; bias:
    (N,) or None; lora_A: (T, r, K) tensor or a sequence of T (r_t, K); lora_B: (T, N, r) or a
    sequence of (N, r_t) (differing ranks are zero-padded); scaling: one number or T numbers;
    adapter_ids: integer tensor of M ids in [-1, T) on x's device. Returns y: (..., N); gradients
    reach x, lora_A, lora_B (and a dense weight/bias that require grad). No dropout.
    Raises ValueError/TypeError naming the argument (and the adapter index or row)."""
    As, Bs = adapter_lists(lora_A, lora_B)
    count = len(As)
    scalings = per_adapter("scaling", scaling, count)
    # Stacks share one shape, dtype and device: their tensors are checked once (a decode step with
    # many adapters pays for one check, not T), the scalings one by one.
    stacked = isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor)
    for t in range(1 if stacked else count):
        check_adapter(t, x, weight, bias, As[t], Bs[t], scalings[t], 0.0, False, backend)
    if stacked:
        check_scalings(scalings[1:], x.dtype, first=1)
    _check_ids(adapter_ids, count, x)
    a_stack = lora_A if isinstance(lora_A, Tensor) else stack_adapters(As, 0)
    b_stack = lora_B if isinstance(lora_B, Tensor) else stack_adapters(Bs, 1)
    dense = weight.contiguous() if isinstance(weight, Tensor) else None
    base = as_base_weight(dense if dense is not None else weight)
    name = resolve(backend, x.device, x.dtype, base.format, variant="per_row")
    scalings = tuple(float(s) for s in scalings)
    spec = PerRowSpec(scalings, group_rows(adapter_ids, count))
    bias = bias.contiguous() if bias is not None else None
    return _EagerPerRow.apply(x, dense, bias, a_stack.contiguous(), b_stack.contiguous(), PerRowCall(base, spec, name))


def _oracle(x, weight, bias, lora_A, lora_B, scaling, adapter_ids):
    """The row-by-row maths (`reference.lora_linear_per_row_eager`) with the op's argument forms."""
    As, Bs = adapter_lists(lora_A, lora_B)
    return lora_linear_per_row_eager(x, weight, bias, stack_adapters(As, 0), stack_adapters(Bs, 1),
                                     per_adapter("scaling", scaling, len(As)), adapter_ids)


PER_ROW = register_variant(Variant(name="per_row", apply=lora_linear_per_row, oracle=_oracle, form="per_row"))
