# SPDX-License-Identifier: Apache-2.0
"""The one integration adapter: what patching a framework's LoRA layers means, written once.

A framework module (`peft.py`, `torchtune.py`) only says how to read its layers, as a `Framework`:
which modules are its LoRA layers, why a layer keeps the framework's forward (checked at patch
time), when a patched layer is fused only under a condition (noted in the report), and, per call,
a `LayerCall` describing the fused call (or None: the framework's own forward runs).

Everything else is here: the plan loop and `strict=`, install/uninstall of the instance forward,
and the per-call forward — the dtype policy (autocast, `cast_adapters`), several p = 0 adapters
stacked into one call, further adapters with dropout added by the framework's own eager term, the
fallback to the framework's forward and the device-mismatch error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lora_kernels.backends import resolve
from lora_kernels.base_weights import BaseWeight
from lora_kernels.integrations import _common as common
from lora_kernels.variants import VARIANTS

# Framework.name (= the framework's package) -> the module whose `FRAMEWORK` it is (a pickled
# patched layer finds it again by the name in its PatchState).
FRAMEWORK_MODULES = {"peft": "lora_kernels.integrations.peft", "torchtune": "lora_kernels.integrations.torchtune"}

# (x, result) -> (x, result + the adapter's term): the framework's own eager code for one adapter,
# with the framework's input casting (x is threaded through, as PEFT reassigns it per adapter).
EagerTerm = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


@dataclass
class AdapterCall:
    """One active adapter of a layer call.

    lora_A (r, K), lora_B (N, r), lora_B_bias (N,) or None (PEFT's `lora_bias`); scaling: float;
    dropout_p: the rate in effect (0 in eval mode or without dropout); variant: a key of
    `lora_kernels.variants.VARIANTS`; extra: the variant's own tensors by keyword (DoRA's
    magnitude (N,)); eager: the framework's own term, used when the adapter cannot join the fused
    call (a further adapter with dropout), None if it has none."""

    lora_A: Tensor
    lora_B: Tensor
    lora_B_bias: Optional[Tensor]
    scaling: float
    dropout_p: float
    variant: str = "lora"
    extra: Dict[str, Tensor] = field(default_factory=dict)
    eager: Optional[EagerTerm] = None

    def tensors(self) -> List[Tensor]:
        return [self.lora_A, self.lora_B] + [t for t in (self.lora_B_bias, *self.extra.values()) if t is not None]


@dataclass
class LayerCall:
    """One call of a LoRA layer as the fused op serves it.

    x (..., K); weight: W₀ (N, K) as a tensor, or a `BaseWeight` (a quantized base computes in its
    `dtype`); bias (N,) or None; adapters in the framework's order.
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
        framework's forward runs (None: a hook may move x)."""

    name: str
    is_layer: Callable[[nn.Module], bool]
    static_reason: Callable[[nn.Module, bool], Optional[str]]
    conditions: Callable[[nn.Module, bool], List[str]]
    describe: Callable[[nn.Module, Tensor, tuple, dict], Optional[LayerCall]]
    device_weight: Callable[[nn.Module], Optional[Tensor]]

    def plan(self, model: nn.Module, backend: str = "auto", cast_adapters: bool = False):
        """(report of the layers that keep their own forward, [(name, layer) to patch]); changes nothing."""
        _check_backend(model, backend)
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


def _check_backend(model: nn.Module, backend: str) -> None:
    param = next(model.parameters(), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    resolve(backend, device)  # ValueError now rather than at the first forward


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
    """One call of the variant's served form (plain LoRA: `lora_linear`); the one place the
    integrations enter the op (tests count calls here)."""
    return VARIANTS[variant].apply(  # by keyword: a variant's own parameters may sit anywhere in its signature
        x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=scaling, dropout_p=dropout_p,
        training=dropout_p > 0.0, backend=backend, **extra,
    )


def _split(adapters: List[AdapterCall]):
    """(fused, eager): which adapters join the fused call; None if the call cannot be served.
    Plain LoRA: all of them when none has dropout (stacked into one call), else the first with
    dropout; the others add their framework's eager term. Another variant: only as the one adapter."""
    if any(a.variant != "lora" for a in adapters):
        if len(adapters) != 1 or adapters[0].variant not in VARIANTS:
            return None
        return adapters, []
    dropped = [a for a in adapters if a.dropout_p > 0.0]
    fused = adapters if not dropped else [dropped[0]]
    eager = [a for a in adapters if all(a is not f for f in fused)]
    if any(a.eager is None for a in eager):
        return None
    return fused, eager


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
    x = call.x
    if not call.adapters or x.dim() == 0 or x.shape[-1] != call.weight.shape[1]:
        return None
    split = _split(call.adapters)
    if split is None:
        return None
    fused, eager = split
    if fused[0].variant != "lora" and _trainable(call.weight):
        return None  # a variant's served form gives W₀ no gradient; the framework's forward does
    tensors = [x, call.bias] + [t for a in call.adapters for t in a.tensors()]
    tensors += [] if isinstance(call.weight, BaseWeight) else [call.weight]
    if any(t is not None and t.device != x.device for t in tensors) or call.weight.device != x.device:
        return None
    compute = compute_dtype(call, state.cast_adapters)
    if compute is None or any(abs(a.scaling) > torch.finfo(compute).max for a in fused):
        return None  # lora_linear refuses such a scaling; the framework's forward overflows as it always did

    x_c, bias_c = common.cast_all(compute, (x, call.bias))
    weight_c = call.weight if isinstance(call.weight, BaseWeight) else common.cast_all(compute, (call.weight,))[0]
    lora_bias = [a.lora_B_bias * a.scaling for a in fused if a.lora_B_bias is not None]
    if lora_bias:  # s·(lora_B's bias) is a constant term of the output: fold it into the base bias
        lora_bias = common.cast_all(compute, lora_bias)
        bias_c = sum(lora_bias[1:], lora_bias[0]) if bias_c is None else sum(lora_bias, bias_c)
    if len(fused) == 1:
        first = fused[0]
        a_w, b_w = common.cast_all(compute, (first.lora_A, first.lora_B))
        scaling, p, variant = first.scaling, first.dropout_p, first.variant
        extra = dict(zip(first.extra, common.cast_all(compute, list(first.extra.values()))))
    else:  # plain LoRA, p = 0 for all: x·[A1;A2]ᵀ·[s1·B1, s2·B2]ᵀ = Σ sᵢ·(x·Aᵢᵀ)·Bᵢᵀ
        a_w = torch.cat(common.cast_all(compute, [a.lora_A for a in fused]), dim=0)
        b_w = torch.cat(common.cast_all(compute, [a.lora_B * a.scaling for a in fused]), dim=1)
        scaling, p, variant, extra = 1.0, 0.0, "lora", {}
    result = fused_op(variant, x_c, weight_c, bias_c, a_w, b_w, scaling, p, state.backend, extra)
    if call.out_dtype is not None:
        result = result.to(call.out_dtype)
    if eager:  # further adapters with dropout: the framework's own terms, its own masks
        result_dtype, x_eager = result.dtype, x
        for adapter in eager:
            x_eager, result = adapter.eager(x_eager, result)
        result = result.to(result_dtype)
    return result

