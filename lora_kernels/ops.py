# SPDX-License-Identifier: Apache-2.0
"""The `lora_linear` op: input checks, torch.library registration (custom op, fake kernel,
autograd) for torch.compile/export, the same forward and backward as a plain autograd.Function
for eager calls, and dispatch to a backend from `lora_kernels.backends`."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from lora_kernels.backends import BACKENDS, resolve
from lora_kernels.base_weights import FORMATS, BaseWeight, DenseWeight, as_base_weight
from lora_kernels.contract import LoRASpec, LoRAWeights
from lora_kernels.dropout import DROP_ALL_THRESHOLD, draw_seed, dropout_threshold

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _not_a_view(t: Tensor, shape) -> Tensor:
    """t (contiguous) reshaped to `shape` as an ordinary tensor on the same storage, not a view:
    in-place ops on a custom Function's output (`y += r`, ReLU(inplace=True)) are refused for views
    created inside the Function."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape, tuple(reversed(strides)))


def no_autocast(x: Tensor):
    """Autocast off around a backend call: the kernels pick their own compute precision, and an
    enclosing torch.autocast must not change their bits (nor those of `reference`)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(x, base: BaseWeight, bias, lora_A, lora_B, spec: LoRASpec, seed, backend) -> Tuple[Tensor, Tensor]:
    """Checked inputs, concrete backend -> (y (..., N), xa (M, r)). Dropout is on iff seed is given."""
    n = base.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], n), x.new_zeros(0, lora_A.shape[0])
    with no_autocast(x):
        y2d, xa = BACKENDS[backend].forward(x2d, LoRAWeights(base, bias, lora_A, lora_B), spec, seed)
    return _not_a_view(y2d.contiguous(), (*x.shape[:-1], n)), xa


def _backward(grad_y, x, base: BaseWeight, lora_A, lora_B, xa, spec: LoRASpec, seed, backend, compute_grad_x):
    """-> (grad_x (shape of x; empty when not compute_grad_x), grad_A (r, K), grad_B (N, r))."""
    k, n = x.shape[-1], base.shape[0]
    x2d = x.reshape(-1, k)
    if x2d.shape[0] == 0:
        grad_x = x.new_zeros(x.shape) if compute_grad_x else x.new_empty(0)
        return grad_x, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dy = grad_y.reshape(-1, n).contiguous()
    weights = LoRAWeights(base, None, lora_A, lora_B)
    with no_autocast(x):
        grads = BACKENDS[backend].backward(dy, x2d, weights, xa, spec, seed, compute_grad_x)
    grad_x = grads.x.reshape(x.shape) if compute_grad_x else x.new_empty(0)
    return grad_x, grads.lora_A, grads.lora_B


def _base_grads(grad_y, x, weight: Optional[Tensor], needs_w: bool, needs_b: bool):
    """Gradients of a trainable dense base (rare): (grad_weight or None, grad_bias or None)."""
    if not (needs_w or needs_b):
        return None, None
    dy2d = grad_y.reshape(-1, grad_y.shape[-1])
    grad_w = dy2d.t() @ x.reshape(-1, x.shape[-1]) if needs_w and weight is not None else None
    return grad_w, (dy2d.sum(0) if needs_b else None)


# The op as torch.compile and torch.export see it: a torch.library custom op with a fake kernel
# and registered autograd, whose backward is a custom op too. The schema is flat: the base weight
# travels as its format's tensors and ints (`BaseWeight.flatten`), the scalars one by one.


def _unflatten(base_tensors: List[Tensor], base_format: str, base_meta: List[int]) -> BaseWeight:
    return FORMATS[base_format].unflatten(list(base_tensors), list(base_meta))


@torch.library.custom_op("lora_kernels::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    base_tensors: List[Tensor],
    base_format: str,
    base_meta: List[int],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Checked inputs, concrete backend -> (y (..., N), xa (M, r)). Dropout is on iff seed is given."""
    base = _unflatten(base_tensors, base_format, base_meta)
    return _forward(x, base, bias, lora_A, lora_B, LoRASpec(scaling, dropout_p), seed, backend)


@lora_linear_op.register_fake
def _lora_linear_fake(x, base_tensors, base_format, base_meta, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    n, k = _unflatten(base_tensors, base_format, base_meta).shape
    torch._check(x.shape[-1] == k, lambda: "x and weight disagree on K")
    torch._check(lora_A.shape[1] == k, lambda: "lora_A and weight disagree on K")
    return x.new_empty(*x.shape[:-1], n), x.new_empty(_rows(x), lora_A.shape[0])


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    base_tensors: List[Tensor],
    base_format: str,
    base_meta: List[int],
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
    compute_grad_x: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (grad_x (shape of x; empty when not compute_grad_x), grad_A (r, K), grad_B (N, r))."""
    base = _unflatten(base_tensors, base_format, base_meta)
    spec = LoRASpec(scaling, dropout_p)
    return _backward(grad_y, x, base, lora_A, lora_B, xa, spec, seed, backend, compute_grad_x)


@lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(grad_y, x, base_tensors, base_format, base_meta, lora_A, lora_B, xa, scaling, dropout_p,
                               seed, backend, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, base_tensors, base_format, base_meta, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    # x is saved by reference (the caller's storage); never a dropped copy or a mask (docs/design.md §5).
    ctx.save_for_backward(x, lora_A, lora_B, output[1], seed, *base_tensors)
    ctx.base_format, ctx.base_meta, ctx.scaling, ctx.dropout_p, ctx.backend = (
        base_format, base_meta, scaling, dropout_p, backend)


def _op_backward(ctx, grad_y, grad_xa):
    x, lora_A, lora_B, xa, seed, *base_tensors = ctx.saved_tensors
    needs_x, needs_w, _, _, needs_b = ctx.needs_input_grad[:5]
    grad_x, grad_a, grad_b = lora_linear_backward_op(
        grad_y, x, base_tensors, ctx.base_format, ctx.base_meta, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p,
        seed, ctx.backend, needs_x,
    )
    dense = base_tensors[0] if ctx.base_format == "dense" else None
    grad_w, grad_bias = _base_grads(grad_y, x, dense, needs_w, needs_b)
    # list inputs take lists of gradients, one entry per element
    grad_base = [grad_w] + [None] * (len(base_tensors) - 1)
    grad_meta = [None] * len(ctx.base_meta)
    return (grad_x if needs_x else None), grad_base, None, grad_meta, grad_bias, grad_a, grad_b, None, None, None, None


lora_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


class EagerCall(NamedTuple):
    """What an eager call carries besides the differentiable tensors: the base weight in its format
    (for a dense base the same tensor as `weight`), the scalars, the dropout seed and the backend."""

    base: BaseWeight
    spec: LoRASpec
    seed: Optional[Tensor]
    backend: str


class _EagerLoRALinear(torch.autograd.Function):
    """The same forward, saved tensors and backward in eager mode, without the custom ops'
    dispatcher and schema round trips (measured forward+backward of a 64 x 64 layer: lora_linear
    took 0.17 ms through the custom op, 0.10 ms through this; F.linear 0.02 ms).

    `weight` is the dense W₀ tensor (so a trainable base gets its gradient) or None for other
    formats, whose base (frozen, no gradient) stays on ctx like a parameter, not saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, call: EagerCall):
        y, xa = _forward(x, call.base, bias, lora_A, lora_B, call.spec, call.seed, call.backend)
        # x is saved by reference (the caller's storage); never a dropped copy or a mask (docs/design.md §5).
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, call.seed)
        ctx.call = call._replace(base=None, seed=None) if weight is not None else call._replace(seed=None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return guarded_backward(ctx, grad_y, _eager_input_grads)


def _eager_input_grads(ctx, grad_y) -> tuple:
    """Gradients for _EagerLoRALinear's inputs (x, weight, bias, lora_A, lora_B, call)."""
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    call = ctx.call
    base = DenseWeight(weight) if weight is not None else call.base
    grad_x, grad_a, grad_b = _backward(grad_y, x, base, lora_A, lora_B, xa, call.spec, seed, call.backend, needs_x)
    grad_w, grad_bias = _base_grads(grad_y, x, weight, needs_w, needs_b)
    return (grad_x if needs_x else None), grad_w, grad_bias, grad_a, grad_b, None


DOUBLE_BACKWARD_ERROR = (
    "lora_kernels.lora_linear does not support double backward (nor do lora_linear_stacked and "
    "lora_linear_per_row): its gradients were computed with create_graph=True and are now "
    "being differentiated again. Use PEFT's unpatched layer (lora_kernels.unpatch(model)) or "
    "lora_kernels.reference.lora_linear_eager for higher-order gradients."
)


class _EagerBackward(torch.autograd.Function):
    """An eager backward as a node of its own under create_graph=True: the gradients depend on
    grad_y and the saved tensors, and differentiating them raises DOUBLE_BACKWARD_ERROR instead
    of silently dropping the terms the kernels do not record."""

    @staticmethod
    def forward(ctx, input_grads, outer_ctx, grad_y, *saved):
        return input_grads(outer_ctx, grad_y)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def guarded_backward(ctx, grad_y, input_grads: Callable):
    """The backward of an eager autograd.Function: input_grads(ctx, grad_y) -> its gradients, run
    through `_EagerBackward` when grad mode is on (create_graph=True), so a second differentiation
    raises instead of returning gradients without the second-order terms."""
    if torch.is_grad_enabled():
        return _EagerBackward.apply(input_grads, ctx, grad_y, *ctx.saved_tensors)
    return input_grads(ctx, grad_y)


def _double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


# The custom op path: differentiating lora_linear_backward raises the same error.
lora_linear_backward_op.register_autograd(_double_backward)


# --- input checks -------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


class _WeightView:
    """A BaseWeight's shape, dtype and device under the names the checks use for tensors."""

    def __init__(self, base: BaseWeight):
        self.shape, self.dtype, self.device = base.shape, base.dtype, base.device


def check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend) -> None:
    """Raise TypeError/ValueError naming the argument for anything `lora_linear` cannot serve.
    `weight` is a tensor (N, K) or a `BaseWeight` (its compute dtype counts as its dtype)."""
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have shape (..., K) with at least 1 dim, got a 0-dim tensor")
    if isinstance(weight, BaseWeight):
        if weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"weight ({weight.format}) must compute in float16, bfloat16, float32 or float64, "
                            f"got {weight.dtype}")
        weight = _WeightView(weight)
    else:
        _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    n, k = weight.shape
    r = lora_A.shape[0]
    if k == 0 or n == 0:
        raise ValueError(f"weight must be (N, K) with N, K >= 1, got {tuple(weight.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dim K={k} (weight is {tuple(weight.shape)}), got shape {tuple(x.shape)}")
    if r == 0:
        raise ValueError("lora_A must be (r, K) with rank r >= 1, got r = 0")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be (r, K) = (r, {k}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be (N, r) = ({n}, {r}), got {tuple(lora_B.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must be (N,) = ({n},) or None, got {tuple(bias.shape)}")
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if abs(scaling) > torch.finfo(x.dtype).max:  # the kernels scale in x's dtype (fp16/bf16 epilogues)
        raise ValueError(
            f"scaling = {scaling} is outside the range of x's dtype {x.dtype} (|scaling| <= "
            f"{torch.finfo(x.dtype).max:g}); compute in a wider dtype or fold part of it into lora_B"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")


def check_seed(seed, x: Tensor, count: int = 1) -> None:
    """A caller's dropout seed(s) must be an int64 tensor of shape (count,) on x's device (one per
    adapter when several adapters are summed)."""
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or tuple(seed.shape) != (count,):
        shown = f"{seed.dtype} {tuple(seed.shape)}" if isinstance(seed, Tensor) else type(seed).__name__
        each = ", one per adapter" if count > 1 else ""
        raise TypeError(f"seed must be an int64 tensor of shape ({count},){each} (see lora_kernels.dropout.draw_seed), "
                        f"got {shown}")
    if seed.device != x.device:
        raise ValueError(f"seed must be on x's device {x.device}, got {seed.device}")


def effective_dropout(dropout_p: float, scaling: float, training: bool) -> LoRASpec:
    """The LoRASpec a call runs with: p = 0 outside training; every element dropped (p = 1, or p
    so close to it that the 16-bit threshold rounds to 2^16) is served as p = 0 with scaling 0 —
    the LoRA term and the gradients of A and B are zero, as torch's dropout(p=1) gives — so no
    kernel divides by 1 - p = 0."""
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and dropout_threshold(p) >= DROP_ALL_THRESHOLD:
        return LoRASpec(0.0, 0.0)
    return LoRASpec(float(scaling), p)


def call_seed(seed: Optional[Tensor], specs: Union[LoRASpec, Tuple[LoRASpec, ...]], x: Tensor) -> Optional[Tensor]:
    """The seed(s) a call runs with, one per spec (several adapters summed: a tuple of specs): None
    when none drops; else the caller's (checked) or fresh ones from the generator of x's device."""
    specs = specs if isinstance(specs, tuple) else (specs,)
    if all(spec.dropout_p == 0.0 for spec in specs):
        return None
    if seed is None:
        return draw_seed(x.device, len(specs))
    check_seed(seed, x, len(specs))
    return seed


def lora_linear(
    x: Tensor,
    weight: Union[Tensor, BaseWeight],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    *,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """A LoRA linear layer in one fused op: ``x·W₀ᵀ + bias + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ``.

    x: (..., K), any leading dims (0 rows too) and strides; weight: W₀ as a (N, K) tensor or a
    `lora_kernels.base_weights.BaseWeight` (e.g. an NF4-quantized base); bias: (N,) or None;
    lora_A: (r, K); lora_B: (N, r); all one dtype (fp16/bf16/fp32/fp64; a BaseWeight's compute
    dtype) on one device. Returns y: (..., N). Dropout (inverted, rate `dropout_p` in [0, 1])
    applies to the LoRA branch only and only when `training`; its mask is regenerated in backward
    from `seed` (int64 (1,) on x's device; default: drawn from the generator of x's device) — see
    `lora_kernels.dropout` for the exact rule, its 1/65536 resolution, and p >= 1 - 2^-17, which
    is served as p = 1: LoRA term and A/B gradients zero.
    `backend`: "auto" or one of `available_backends()`; "auto" picks the fastest for the device.
    Gradients flow to x, lora_A, lora_B, and to a dense weight / bias when they require grad.
    """
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    dense = weight.contiguous() if isinstance(weight, Tensor) else None
    base = as_base_weight(dense if dense is not None else weight)
    name = resolve(backend, x.device, x.dtype, base.format)
    spec = effective_dropout(dropout_p, scaling, training)
    seed = call_seed(seed, spec, x)
    bias = bias.contiguous() if bias is not None else None
    lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    if torch.compiler.is_compiling():  # torch.compile / torch.export trace the custom op
        base_tensors, base_meta = base.flatten()
        return lora_linear_op(x, base_tensors, base.format, base_meta, bias, lora_A, lora_B, spec.scaling,
                              spec.dropout_p, seed, name)[0]
    return _EagerLoRALinear.apply(x, dense, bias, lora_A, lora_B, EagerCall(base, spec, seed, name))
