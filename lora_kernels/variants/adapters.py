# SPDX-License-Identifier: Apache-2.0
"""What the multi-adapter variants (stacked.py, per_row.py) share: their per-adapter argument
normalisation and checks (every message names the argument and the adapter index), and the
shape handling around their backend calls."""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from lora_kernels.contract import LoRAGrads
from lora_kernels.ops import _base_grads, _not_a_view, check_inputs, no_autocast

AdapterTensors = Union[Tensor, Sequence[Tensor]]


def adapter_list(name: str, value: AdapterTensors, ndim_stacked: int) -> List[Tensor]:
    """`value` as a list of per-adapter tensors: a stacked tensor (T, ...) of `ndim_stacked` dims
    is unbound along dim 0 (views, so gradients reach the stack); a sequence is taken as is."""
    if isinstance(value, Tensor):
        if value.dim() != ndim_stacked:
            raise ValueError(f"{name} must be a ({'T, ' + ('r, K' if name == 'lora_A' else 'N, r')}) tensor or a "
                             f"sequence of per-adapter tensors, got shape {tuple(value.shape)}")
        out = list(value.unbind(0))
    elif isinstance(value, (list, tuple)):
        out = list(value)
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(value).__name__}")
    if not out:
        raise ValueError(f"{name} must hold at least one adapter, got none")
    return out


def adapter_lists(lora_A: AdapterTensors, lora_B: AdapterTensors):
    """(lora_As, lora_Bs): the per-adapter tensors of both arguments (`adapter_list`), as many of each."""
    As, Bs = adapter_list("lora_A", lora_A, 3), adapter_list("lora_B", lora_B, 3)
    if len(Bs) != len(As):
        raise ValueError(f"lora_B must hold one adapter per lora_A ({len(As)}), got {len(Bs)}")
    return As, Bs


def per_adapter(name: str, value, count: int) -> List[float]:
    """A scalar argument as `count` floats: one number for every adapter, or a sequence (or 1-D
    tensor) of exactly `count`."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must have one value per adapter ({count}), got {len(value)}")
        for t, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}[{t}] must be a real number, got {type(v).__name__}")
        return [float(v) for v in value]
    return [value] * count  # checked per adapter by check_adapter


def check_adapter(t: int, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend) -> None:
    """`ops.check_inputs` for adapter t, its message prefixed so it names the adapter index."""
    try:
        check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for arg in ("lora_A", "lora_B", "scaling", "dropout_p"):
            if message.startswith(arg + " "):
                message = f"{arg}[{t}]" + message[len(arg):]
                break
        raise type(exc)(f"{message} (adapter {t})") from None


def check_scalings(scalings, dtype: torch.dtype, first: int = 0) -> None:
    """Adapters first, first + 1, ...'s scalings: finite real numbers within `dtype`'s range (as
    `ops.check_inputs`); the error names the adapter index."""
    limit = torch.finfo(dtype).max
    for t, scaling in enumerate(scalings, start=first):
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"scaling[{t}] must be a real number, got {type(scaling).__name__} (adapter {t})")
        if not math.isfinite(scaling) or abs(scaling) > limit:
            raise ValueError(f"scaling[{t}] must be finite and within {dtype}'s range, got {scaling} (adapter {t})")


def forward_rows(x: Tensor, n: int, rank: int, compute: Callable[[Tensor], Tuple[Tensor, Tensor]]):
    """x (..., K) -> (y (..., N), xa (M, rank)) by compute(x2d (M, K)) -> (y2d, xa), autocast off;
    no call for 0 rows. y is an ordinary tensor (in-place ops on it work), not a view."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], n), x.new_zeros(0, rank)
    with no_autocast(x):
        y2d, xa = compute(x2d)
    return _not_a_view(y2d.contiguous(), (*x.shape[:-1], n)), xa


def backward_rows(grad_y, x, weight, n: int, needs, lora_A, lora_B, compute: Callable[[Tensor, Tensor], LoRAGrads]):
    """-> (grad_x or None, grad_weight, grad_bias, grad_A, grad_B) from compute(dy2d (M, N)
    contiguous, x2d (M, K)) -> LoRAGrads, autocast off; zeros for 0 rows. `needs`: whether x,
    weight and bias need gradients."""
    needs_x, needs_w, needs_b = needs
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        grad_x, grad_a, grad_b = torch.zeros_like(x), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    else:
        with no_autocast(x):
            grads = compute(grad_y.reshape(-1, n).contiguous(), x2d)
        grad_x = grads.x.reshape(x.shape) if needs_x else None
        grad_a, grad_b = grads.lora_A, grads.lora_B
    grad_w, grad_bias = _base_grads(grad_y, x, weight, needs_w, needs_b)
    return (grad_x if needs_x else None), grad_w, grad_bias, grad_a, grad_b
