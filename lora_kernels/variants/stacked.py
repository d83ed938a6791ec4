# SPDX-License-Identifier: Apache-2.0
"""Several adapters summed into one layer, each with its own dropout (PEFT's several active
adapters, training): ``y = x·W₀ᵀ + b + Σₜ sₜ·(Dₜ(x)·Aₜᵀ)·Bₜᵀ`` in one fused call.

The adapters travel concatenated along the rank (ranks may differ; nothing is padded): the
backends see lora_A (R, K), lora_B (N, R) and a `contract.StackedSpec`. Dropout: one int64 seed
per adapter, `seed` (T,); adapter t's mask is the single-adapter rule of `lora_kernels.dropout`
under seed[t] — so it is bit-identical across backends and to a one-adapter `lora_linear` call
with ``seed=seed[t:t+1]``. Saved for backward: x and the adapters (by reference), xa (M, R) and
the seeds; never an M x K mask or dropped copy, whatever the rates.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from lora_kernels.backends import BACKENDS, resolve
from lora_kernels.base_weights import BaseWeight, DenseWeight, as_base_weight
from lora_kernels.contract import LoRAWeights, StackedSpec
from lora_kernels.ops import call_seed, effective_dropout, guarded_backward
from lora_kernels.reference import lora_linear_stacked_eager
from lora_kernels.variants.adapters import (
    AdapterTensors,
    adapter_lists,
    backward_rows,
    check_adapter,
    forward_rows,
    per_adapter,
)
from lora_kernels.variants.base import Variant, register_variant


class StackedCall(NamedTuple):
    """An eager call's non-differentiable part: base weight, spec, seeds (T,) or None, backend."""

    base: BaseWeight
    spec: StackedSpec
    seeds: Optional[Tensor]
    backend: str


def _concatenated(adapters, count: int):
    """(lora_A (R, K), lora_B (N, R)) from the per-adapter tensors (As then Bs): the operands the
    backends take. Built in forward and again in backward (a small copy) so that autograd saves the
    adapters themselves, not a second copy of them."""
    if count == 1:
        return adapters[0].contiguous(), adapters[1].contiguous()
    return torch.cat(adapters[:count]), torch.cat(adapters[count:], dim=1)


class _EagerStacked(torch.autograd.Function):
    """Forward and backward of several summed adapters through the backend's stacked entry
    points; inputs (x, weight, bias, call, *lora_As, *lora_Bs), one gradient per adapter tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, call: StackedCall, *adapters):
        count = len(adapters) // 2
        lora_A, lora_B = _concatenated(adapters, count)
        weights = LoRAWeights(call.base, bias, lora_A, lora_B)
        y, xa = forward_rows(x, call.base.shape[0], lora_A.shape[0],
                             lambda x2d: BACKENDS[call.backend].forward_stacked(x2d, weights, call.spec, call.seeds))
        # x and the adapters by reference, xa (M, R), the seeds: never a mask (docs/design.md §10).
        ctx.save_for_backward(x, weight, xa, call.seeds, *adapters)
        ctx.call = call._replace(base=None, seeds=None) if weight is not None else call._replace(seeds=None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return guarded_backward(ctx, grad_y, _stacked_input_grads)


def _stacked_input_grads(ctx, grad_y) -> tuple:
    """Gradients for _EagerStacked's inputs (x, weight, bias, call, *lora_As, *lora_Bs)."""
    x, weight, xa, seeds, *adapters = ctx.saved_tensors
    call = ctx.call
    base = DenseWeight(weight) if weight is not None else call.base
    lora_A, lora_B = _concatenated(adapters, len(adapters) // 2)
    weights = LoRAWeights(base, None, lora_A, lora_B)
    needs_x = ctx.needs_input_grad[0]
    grad_x, grad_w, grad_bias, grad_a, grad_b = backward_rows(
        grad_y, x, weight, base.shape[0], ctx.needs_input_grad[:3], lora_A, lora_B,
        lambda dy, x2d: BACKENDS[call.backend].backward_stacked(dy, x2d, weights, xa, call.spec, seeds, needs_x))
    ranks = list(call.spec.ranks)
    return (grad_x, grad_w, grad_bias, None, *grad_a.split(ranks), *grad_b.split(ranks, dim=1))


def lora_linear_stacked(
    x: Tensor,
    weight: Union[Tensor, BaseWeight],
    bias: Optional[Tensor],
    lora_A: AdapterTensors,
    lora_B: AdapterTensors,
    scaling,
    dropout_p=0.0,
    training: bool = True,
    backend: str = "auto",
    *,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """T LoRA adapters summed on one base layer, in one fused call:
    ``y = x·W₀ᵀ + bias + Σₜ scaling[t]·(Dₜ(x)·lora_A[t]ᵀ)·lora_B[t]ᵀ``.

    x: (..., K); weight: (N, K) tensor or `BaseWeight`; bias: (N,) or None; lora_A: a (T, r, K)
    tensor or a sequence of T tensors (r_t, K) (ranks may differ); lora_B: (T, N, r) or a
    sequence of (N, r_t); scaling, dropout_p: one number for all adapters or T numbers (each p in
    [0, 1)); seed: int64 (T,) on x's device, one per adapter (default: drawn from x's device's
    generator) — adapter t's mask is `lora_linear`'s rule under seed[t]. Dropout applies only
    when `training`. Returns y: (..., N); gradients reach x, every lora_A/lora_B (and a dense
    weight/bias that require grad). Raises ValueError/TypeError naming the argument and adapter.
    """
    As, Bs = adapter_lists(lora_A, lora_B)
    count = len(As)
    scalings = per_adapter("scaling", scaling, count)
    rates = per_adapter("dropout_p", dropout_p, count)
    for t in range(count):
        if isinstance(rates[t], numbers.Real) and not 0.0 <= rates[t] < 1.0:
            raise ValueError(f"dropout_p[{t}] must be in [0, 1), got {rates[t]} (adapter {t})")
        check_adapter(t, x, weight, bias, As[t], Bs[t], scalings[t], rates[t], training, backend)
    dense = weight.contiguous() if isinstance(weight, Tensor) else None
    base = as_base_weight(dense if dense is not None else weight)
    name = resolve(backend, x.device, x.dtype, base.format, variant="stacked")
    spec = StackedSpec(tuple(effective_dropout(p, s, training) for p, s in zip(rates, scalings)),
                       tuple(a.shape[0] for a in As))
    seeds = call_seed(seed, spec.adapters, x)
    bias = bias.contiguous() if bias is not None else None
    return _EagerStacked.apply(x, dense, bias, StackedCall(base, spec, seeds, name), *As, *Bs)


def nn_dropout_rates(scalings, dropout_ps, training: bool):
    """(scalings, dropout_ps) for `lora_linear_stacked` from adapters configured like nn.Dropout,
    which allows p = 1: in training, an adapter with p >= 1 contributes a zero term and zero A/B
    gradients (torch's dropout(p=1), as `lora_linear` serves it), given as scaling 0, p 0 since
    this op takes p < 1 only; outside training the rates do not apply and are given as 0."""
    if not training:
        return list(scalings), [0.0] * len(scalings)
    return [0.0 if p >= 1.0 else s for s, p in zip(scalings, dropout_ps)], [0.0 if p >= 1.0 else p for p in dropout_ps]


def _oracle(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    """The plain-autograd maths (`reference.lora_linear_stacked_eager`) with the op's argument forms."""
    As, Bs = adapter_lists(lora_A, lora_B)
    return lora_linear_stacked_eager(x, weight, bias, As, Bs, per_adapter("scaling", scaling, len(As)),
                                     per_adapter("dropout_p", dropout_p, len(As)), seed)


STACKED = register_variant(Variant(name="stacked", apply=lora_linear_stacked, oracle=_oracle, form="stacked"))
