# SPDX-License-Identifier: Apache-2.0
"""The one integration adapter: what patching a framework's LoRA layers means, written once.

A framework module (`peft.py`, `torchtune.py`) only says how to read its layers, as a `Framework`:
which modules are its LoRA layers, why a layer keeps the framework's forward (checked at patch
time), when a patched layer is fused only under a condition (noted in the report), and, per call,
a `LayerCall` describing the fused call (or None: the framework's own forward runs).

Everything else is here: the plan loop and `strict=`, install/uninstall of the instance forward,
and the per-call forward — the dtype policy (autocast, `cast_adapters`), one adapter as one
`lora_linear` (or variant) call, several active adapters (each with its own dropout) as one
`lora_linear_stacked` call, a mixed batch (per-row adapter ids) as one `lora_linear_per_row` call,
the fallback to the framework's forward and the device-mismatch error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

import lora_kernels
from lora_kernels.backends import BACKENDS, resolve
from lora_kernels.base_weights import BaseWeight
from lora_kernels.integrations import _common as common
from lora_kernels.variants import VARIANTS
from lora_kernels.variants.stacked import nn_dropout_rates

# Framework.name (= the framework's package) -> the module whose `FRAMEWORK` it is (a pickled
# patched layer finds it again by the name in its PatchState).
FRAMEWORK_MODULES = {"peft": "lora_kernels.integrations.peft", "torchtune": "lora_kernels.integrations.torchtune"}

# fused_op's names for the two multi-adapter variants (lora_kernels.variants.stacked / per_row),
# called through their own signatures (lists of adapters; per-row ids)
STACKED, PER_ROW = "stacked", "per_row"


@dataclass
class AdapterCall:
    """One active adapter of a layer call.

    lora_A (r, K), lora_B (N, r), lora_B_bias (N,) or None (PEFT's `lora_bias`); scaling: float;
    dropout_p: the rate in effect (0 in eval mode or without dropout); variant: a key of
    `lora_kernels.variants.VARIANTS`; extra: the variant's own tensors by keyword (DoRA's
    magnitude (N,))."""

    lora_A: Tensor
    lora_B: Tensor
    lora_B_bias: Optional[Tensor]
    scaling: float
    dropout_p: float
    variant: str = "lora"
    extra: Dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> List[Tensor]:
        return [self.lora_A, self.lora_B] + [t for t in (self.lora_B_bias, *self.extra.values()) if t is not None]


@dataclass
class LayerCall:
    """One call of a LoRA layer as the fused op serves it.

    x (..., K); weight: W₀ (N, K) as a tensor, or a `BaseWeight` (a quantized base computes in its
    `dtype`); bias (N,) or None; adapters in the framework's order: the active adapters (summed),
    or with `adapter_ids` the adapters a mixed batch indexes.
    adapter_ids: a mixed batch: int64 (M,) on x's device, the adapter of each of the M rows of x
        (an index into `adapters`, -1 for base-only rows), or None (every row uses all `adapters`).
    cast_x: the framework casts x to the base's compute dtype (bitsandbytes does; nn.Linear does not,
        so there x must already have it).
    adapter_cast_ok: `patch(cast_adapters=True)` may fuse adapters of another dtype in the compute
        dtype (PEFT, unless input casting is disabled); False: they keep the framework's forward.
    out_dtype: the dtype of the framework's result when it is not the compute dtype (bitsandbytes
        casts back to x's dtype), else None."""

    x: Tensor
    weight: Union[Tensor, BaseWeight]
    bias: Optional[Tensor]
    adapters: List[AdapterCall]
    cast_x: bool = False
    adapter_cast_ok: bool = False
    out_dtype: Optional[torch.dtype] = None
    adapter_ids: Optional[Tensor] = None


@dataclass(frozen=True)
class Framework:
    """How the adapter reads one framework's LoRA layers.

    is_layer(module) -> bool: the framework's LoRA layer types (patched or reported).
    static_reason(module, fsdp2) -> str or None: why the layer keeps the framework's forward, checked
        at patch time; `fsdp2`: the layer sits under fully_shard (DTensor weights are plain in forward).
    conditions(module, cast_adapters) -> [str]: for a patchable layer, conditions under which alone
        it is fused (the report's "fused only" lines).
    describe(module, x, args, kwargs) -> LayerCall or None: per call, the fused call, or None where
        the framework's forward must run (disabled or merged adapters, a mixed batch, ...).
    device_weight(module) -> tensor or None: the weight x must share a device with when the
        framework's forward runs (None: a hook may move x).
    several_adapters(module) -> bool, or None: the layer holds several adapters (summed, or a mixed
        batch), which an explicit backend without the multi-adapter ops serves by the framework's forward."""

    name: str
    is_layer: Callable[[nn.Module], bool]
    static_reason: Callable[[nn.Module, bool], Optional[str]]
    conditions: Callable[[nn.Module, bool], List[str]]
    describe: Callable[[nn.Module, Tensor, tuple, dict], Optional[LayerCall]]
    device_weight: Callable[[nn.Module], Optional[Tensor]]
    several_adapters: Optional[Callable[[nn.Module], bool]] = None

    def plan(self, model: nn.Module, backend: str = "auto", cast_adapters: bool = False):
        """(report of the layers that keep their own forward, [(name, layer) to patch]); changes nothing."""
        device = _check_backend(model, backend)
        multi_condition = _multi_adapter_condition(backend, device) if self.several_adapters else None
        kept, todo = common.PatchReport(backend=backend), []
        for name, module in model.named_modules():
            if not self.is_layer(module):
                continue
            fsdp2 = common.fsdp2_managed(model, name)
            reason = None if common.is_patched(module) else self.static_reason(module, fsdp2)
            if reason is not None:
                kept.keep(name, reason)
                continue
            todo.append((name, module))
            for condition in self.conditions(module, cast_adapters):
                kept.note(name, condition)
            if multi_condition is not None and self.several_adapters(module):
                kept.note(name, multi_condition)
            if fsdp2 and common.sharded(module):
                kept.note(name, common.FSDP2_CONDITION)
        return kept, todo

    def apply(self, todo, report: common.PatchReport, backend: str, cast_adapters: bool) -> None:
        """Patch the layers `plan` selected, recording them in `report`."""
        for name, module in todo:
            report.already_patched += common.install(module, fused_forward, self.name, backend, cast_adapters)
            report.patched.append(name)

    def patch(self, model: nn.Module, strict: bool = False, backend: str = "auto", cast_adapters: bool = False):
        """Serve this framework's LoRA layers of `model` by the fused op; returns a `PatchReport`.
        Patching twice is harmless (options are updated). With `strict=True`, a ValueError lists the
        layers that cannot be served (and nothing is patched). See `lora_kernels.patch` for the options."""
        report, todo = self.plan(model, backend, cast_adapters)
        if strict and report.num_kept:
            raise common.strict_error(report)
        self.apply(todo, report, backend, cast_adapters)
        return report

    def unpatch(self, model: nn.Module) -> int:
        """Restore the framework's forward on every patched layer; returns how many were restored."""
        return sum(common.uninstall(m) for m in model.modules() if self.is_layer(m))


_REGISTERED: Dict[str, Framework] = {}


def register(fw: Framework) -> Framework:
    """Make `fw` the Framework of its name (each framework module registers its FRAMEWORK)."""
    _REGISTERED[fw.name] = fw
    return fw


def framework(name: str) -> Framework:
    """The Framework called `name`, its module imported on first use (a dict lookup afterwards,
    which torch.compile traces)."""
    if name not in _REGISTERED:
        importlib.import_module(FRAMEWORK_MODULES[name])
    return _REGISTERED[name]


def _check_backend(model: nn.Module, backend: str) -> torch.device:
    """The model's device, once `backend` is known to serve it (ValueError now rather than at the
    first forward)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    resolve(backend, device)
    return device


def _multi_adapter_condition(backend: str, device: torch.device) -> Optional[str]:
    """The report's line for an explicitly chosen backend that lacks the multi-adapter ops, or None."""
    if backend == "auto":  # picks, per op, a backend that implements it
        return None
    missing = [v for v in (STACKED, PER_ROW) if BACKENDS[backend].unavailable_reason(device, variant=v)]
    if not missing:
        return None
    return (
        f"with one active adapter and without adapter_names: backend {backend!r} does not implement "
        f"{' / '.join(missing)} (several active adapters / mixed batches), so the framework's forward runs those "
        "calls of these layers, which hold several adapters"
    )


# --- the per-call forward -----------------------------------------------------------------------


def fused_forward(module: nn.Module, x, *args, **kwargs):
    """The patched layer's forward: the fused op where it reproduces the framework's result, else
    the framework's own forward (raising a clear error for x on another device than the weights)."""
    state = common.patch_state(module)
    fw = framework(state.framework)
    call = fw.describe(module, x, args, kwargs)
    out = None if call is None else run(call, state)
    if out is None:
        weight = fw.device_weight(module)
        if (  # the framework would fail too; name the likely cause
            isinstance(x, Tensor)
            and isinstance(weight, Tensor)
            and weight.device.type != "meta"
            and x.device != weight.device
        ):
            raise common.device_mismatch_error(module, x, weight)
        return state.original(module, x, *args, **kwargs)
    return out


def fused_op(variant: str, x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend, extra):
    """One fused call: the variant's served form (plain LoRA: `lora_linear`), or with `STACKED`
    `lora_linear_stacked` (lists of A/B, scalings and rates) or with `PER_ROW` `lora_linear_per_row`
    (`extra["adapter_ids"]`); the one place the integrations enter the op (tests count calls here)."""
    if variant == STACKED:
        training = any(p > 0.0 for p in dropout_p)
        return lora_kernels.lora_linear_stacked(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=training, backend=backend
        )
    if variant == PER_ROW:
        return lora_kernels.lora_linear_per_row(
            x, weight, bias, lora_A, lora_B, scaling, extra["adapter_ids"], backend=backend
        )
    return VARIANTS[variant].apply(  # by keyword: a variant's own parameters may sit anywhere in its signature
        x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=scaling, dropout_p=dropout_p,
        training=dropout_p > 0.0, backend=backend, **extra,
    )


def _servable(call: LayerCall) -> bool:
    """Whether the adapters of `call` fit one fused call: another variant (DoRA) only as the one
    active adapter; a mixed batch only of plain LoRA adapters without a bias on lora_B (the per-row
    op has none, nor dropout: the framework must leave out adapters whose dropout is in effect)."""
    if call.adapter_ids is not None:
        return all(a.variant == "lora" and a.lora_B_bias is None for a in call.adapters)
    if any(a.variant != "lora" for a in call.adapters):
        return len(call.adapters) == 1 and call.adapters[0].variant in VARIANTS
    return True


def _serves(backend: str, x: Tensor, compute: torch.dtype, weight, variant: str) -> bool:
    """Whether `backend` implements the multi-adapter `variant` here (an explicitly chosen backend
    may serve one adapter only: its calls with several then run the framework's forward)."""
    base_format = weight.format if isinstance(weight, BaseWeight) else "dense"
    try:
        resolve(backend, x.device, compute, base_format, variant=variant)
    except ValueError:
        return False
    return True


def _trainable(weight) -> bool:
    return isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled()


def compute_dtype(call: LayerCall, cast_adapters: bool) -> Optional[torch.dtype]:
    """The one dtype of the fused call, or None where the framework's dtype rules cannot be met.

    Under `torch.autocast`: the autocast dtype (what the framework's linears compute in), all
    operands castable; a quantized base must compute in it already; plain LoRA only (PEFT's and
    torchtune's DoRA mix fp32 and the autocast dtype). Otherwise the base's dtype;
    x must have it unless the framework casts x; adapters of another dtype only with
    `cast_adapters` (and the framework allowing it)."""
    x, weight, bias = call.x, call.weight, call.bias
    quantized = isinstance(weight, BaseWeight)
    adapter_tensors = [t for a in call.adapters for t in a.tensors()]
    operands = [x, bias] + ([] if quantized else [weight]) + adapter_tensors
    autocast = common.autocast_dtype(x)
    if autocast is not None:
        if any(a.variant != "lora" for a in call.adapters):
            return None  # the frameworks compute a variant's own maths (DoRA's norm, m) outside autocast's dtype
        if any(t is not None and t.dtype not in common.AUTOCAST_DTYPES for t in operands):
            return None
        if quantized and (weight.dtype != autocast or (bias is not None and bias.dtype != autocast)):
            return None
        return autocast
    compute = weight.dtype
    if compute not in common.FUSABLE_DTYPES or (bias is not None and bias.dtype != compute):
        return None
    if x.dtype != compute and not call.cast_x:
        return None  # nn.Linear raises on mixed dtypes; let it
    if {t.dtype for t in adapter_tensors} - {compute} and not (cast_adapters and call.adapter_cast_ok):
        return None
    return compute


def run(call: LayerCall, state: common.PatchState) -> Optional[Tensor]:
    """The fused result of `call`, or None where the framework's forward must run instead."""
    x, adapters = call.x, call.adapters
    if not adapters or x.dim() == 0 or x.shape[-1] != call.weight.shape[1] or not _servable(call):
        return None
    if adapters[0].variant != "lora" and _trainable(call.weight):
        return None  # a variant's served form gives W₀ no gradient; the framework's forward does
    tensors = [x, call.bias] + [t for a in adapters for t in a.tensors()]
    tensors += [] if isinstance(call.weight, BaseWeight) else [call.weight]
    if any(t is not None and t.device != x.device for t in tensors) or call.weight.device != x.device:
        return None
    compute = compute_dtype(call, state.cast_adapters)
    if compute is None or any(abs(a.scaling) > torch.finfo(compute).max for a in adapters):
        return None  # the ops refuse such a scaling; the framework's forward overflows as it always did

    x_c, bias_c = common.cast_all(compute, (x, call.bias))
    weight_c = call.weight if isinstance(call.weight, BaseWeight) else common.cast_all(compute, (call.weight,))[0]
    lora_bias = [a.lora_B_bias * a.scaling for a in adapters if a.lora_B_bias is not None]
    if lora_bias:  # s·(lora_B's bias) is a constant term of the output: fold it into the base bias
        lora_bias = common.cast_all(compute, lora_bias)
        bias_c = sum(lora_bias[1:], lora_bias[0]) if bias_c is None else sum(lora_bias, bias_c)
    scalings = [a.scaling for a in adapters]
    if call.adapter_ids is not None:
        a_w, b_w = state.stacks.get([a.lora_A for a in adapters], [a.lora_B for a in adapters], compute)
        variant, p, extra = PER_ROW, 0.0, {"adapter_ids": call.adapter_ids}
    elif len(adapters) == 1:
        first = adapters[0]
        a_w, b_w = common.cast_all(compute, (first.lora_A, first.lora_B))
        variant, scalings, p = first.variant, first.scaling, first.dropout_p
        extra = dict(zip(first.extra, common.cast_all(compute, list(first.extra.values()))))
    else:  # several active adapters summed, each with its own dropout mask
        a_w = list(common.cast_all(compute, [a.lora_A for a in adapters]))
        b_w = list(common.cast_all(compute, [a.lora_B for a in adapters]))
        variant, extra = STACKED, {}
        scalings, p = nn_dropout_rates(scalings, [a.dropout_p for a in adapters], training=True)
    if variant in (STACKED, PER_ROW) and not _serves(state.backend, x, compute, weight_c, variant):
        return None
    result = fused_op(variant, x_c, weight_c, bias_c, a_w, b_w, scalings, p, state.backend, extra)
    if call.out_dtype is not None:
        result = result.to(call.out_dtype)
    return result
