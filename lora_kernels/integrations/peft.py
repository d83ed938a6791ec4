# SPDX-License-Identifier: Apache-2.0
"""Route PEFT's LoRA linear layers through the fused op, in place: `lora.Linear` (plain LoRA and
DoRA) and QLoRA's `lora.bnb.Linear4bit` on a bitsandbytes NF4/FP4 base.

`patch(model)` replaces the forward of every such layer it can serve with the adapter's fused
forward (`lora_kernels.integrations.adapter`); parameters, buffers, hooks and the state_dict are
untouched, so `save_pretrained` / `from_pretrained`, `merge_and_unload`, optimizers and DDP see the
same model. `unpatch(model)` restores PEFT's forward. Per call, anything the fused path does not
reproduce exactly (disabled or merged adapters, mismatched dtypes, hooks on the base layer, …) is
delegated to PEFT's own forward.

PEFT semantics reproduced (peft 0.21, `lora.Linear.forward`, `lora.bnb.Linear4bit.forward`):

* ``result = base_layer(x)``; then for each active adapter that the layer holds, in order,
  ``result = result + lora_B(lora_A(dropout(x))) * scaling[adapter]``. `scaling` is read per
  call, so rsLoRA, `set_scale` and `scale_layer` apply.
* one active adapter: its term is fused with the base GEMM and bias (`lora_linear`); several
  active plain-LoRA adapters at any dropout: one `lora_linear_stacked` call, each adapter with its
  own independent mask (PEFT draws one per adapter too; the masks are the lora_kernels generator's
  under one seed per adapter, not torch's).
* mixed batches, ``model(..., adapter_names=[...])`` (`LoraLayer._mixed_batch_forward`: one name
  per sample of the batch dim, ``"__base__"`` or a name this layer lacks = base only): one
  `lora_linear_per_row` call, the name of sample b applied to every row (token) of x[b]. The
  layer's plain adapters are stacked once (zero-padded to the largest rank) and the stack kept
  between calls that need no gradient of them (see `_common.AdapterStackCache` for what is
  cached and when it is rebuilt). PEFT's forward runs (and raises as it does) for a wrong number
  of names, merged adapters or a DoRA adapter among the names; it also runs when a named adapter
  has dropout in effect (training mode: PEFT drops per sub-batch) or a `lora_bias` (the report's
  "fused only" lines say which layers).
* `lora_bias`: ``lora_B``'s bias times `scaling` is folded into the base bias.
* dropout: ``nn.Dropout(p)`` in training mode -> the fused op's dropout at rate p (the mask is the
  lora_kernels generator's, regenerated in backward, never stored); ``nn.Identity`` or eval -> none.
  ``lora_dropout=1.0`` is served: the LoRA term and the gradients of A and B are zero, as in PEFT.
* DoRA (`use_dora=True`, `DoraLinearVariant`): one active DoRA adapter is served by the "dora"
  variant (`lora_kernels.variants`), PEFT's maths: magnitude m, ``c = m / ‖W₀ + s·B·A‖`` (norm
  detached), ``y = x·W₀ᵀ + b + (c − 1)·(x′·W₀ᵀ) + c·s·(x′·Aᵀ)·Bᵀ``, x′ = dropout(x) in training
  with p > 0, else x. Several active adapters with DoRA among them, and DoRA under
  `torch.autocast`, run PEFT's forward (both are in the report's "fused only" lines).
* QLoRA (`lora.bnb.Linear4bit` on `bitsandbytes.nn.Linear4bit`, NF4/FP4, double quantization or
  not): the base is the packed 4-bit weight as a `BaseWeight` (built once per frozen weight and
  cached on it), dequantized tile by tile. bitsandbytes' dtype rules: its compute dtype (the
  layer's `compute_dtype`, else settled on the first call from x, as bitsandbytes does), x cast to
  it, the result cast back to x's dtype; PEFT adds the LoRA term after casting it to that dtype
  unless `torch.is_autocast_enabled()` (the CUDA autocast flag, which PEFT reads on every device).
  A bias in another dtype than the compute dtype runs PEFT's forward once (bitsandbytes converts
  the parameter in place, later calls fuse); a weight bitsandbytes repacked for its CPU inference
  kernel (`packing_format_for_cpu`, after an eval no-grad call on an AVX512-BF16 CPU) runs
  PEFT's forward.
* dtypes: the fused call needs one dtype. Under `torch.autocast` every operand is cast to the
  autocast dtype, which is what PEFT's linears compute in (a 4-bit base must compute in it
  already). Without autocast, adapters in another dtype than the base's compute dtype (PEFT's
  default fp32 adapters on a bf16/fp16 base) run PEFT's forward, whose LoRA branch computes in the
  adapter dtype (the report lists them under "fused only under torch.autocast");
  `cast_adapters=True` instead fuses them in the base dtype (like autocast: fp32 parameters and
  gradients, half-precision compute).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from lora_kernels.base_weights import FORMATS
from lora_kernels.integrations import _common as common
from lora_kernels.integrations.adapter import AdapterCall, Framework, LayerCall, register
from lora_kernels.variants import VARIANTS

try:  # kwargs PEFT pops for its LoRA variants; any of them set means "not plain LoRA"
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS as _VARIANT_KWARGS
except ImportError:  # pragma: no cover - older peft
    _VARIANT_KWARGS = ("alora_offsets",)

try:
    from peft.tuners.lora.variants import DoraLinearVariant
except ImportError:  # pragma: no cover - older peft
    DoraLinearVariant = None

try:  # QLoRA: PEFT's 4-bit LoRA layer exists only with bitsandbytes
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - no (working) bitsandbytes
    bnb = LoraLinear4bit = None

DORA_AUTOCAST_CONDITION = (
    "without torch.autocast: DoRA under autocast runs PEFT's forward (it computes the magnitude scale in fp32 and "
    "the LoRA term in the autocast dtype, which one fused call does not reproduce)"
)
_KNOWN_KWARGS = frozenset(("adapter_names", *_VARIANT_KWARGS))
_QUANT_TYPES = ("nf4", "fp4")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- which layers (patch time) --------------------------------------------------------------------


def _is_qlora(module: nn.Module) -> bool:
    return LoraLinear4bit is not None and isinstance(module, LoraLinear4bit)


def _base_reason(module: LoraLayer, fsdp2: bool) -> Optional[str]:
    """Why the base layer of a PEFT LoRA linear cannot be served, or None."""
    if not _is_qlora(module):
        return common.plain_linear_reason(module.base_layer, fsdp2)
    base = module.base_layer
    if type(base).forward is not bnb.nn.Linear4bit.forward:
        return f"base layer is {type(base).__name__}, a Linear4bit with its own forward"
    if fsdp2:
        return "4-bit base under FSDP2 (fully_shard) keeps PEFT's forward"
    quant_type = getattr(base.weight, "quant_type", None)
    if quant_type not in _QUANT_TYPES or quant_type not in FORMATS:
        have = [q for q in _QUANT_TYPES if q in FORMATS]
        return f"4-bit base in {quant_type!r} format (this lora_kernels reads {have or 'no 4-bit format'})"
    try:  # the format's own checks (blocksize, quant_storage, quantized at all, ...)
        FORMATS[quant_type].from_bnb_cached(base.weight)
    except (TypeError, ValueError) as exc:
        return f"4-bit base not servable: {exc}"
    if base.bias is not None and not common.plain_tensor(base.bias):
        return f"base bias is a {type(base.bias).__name__}, not a dense float tensor"
    return None


def _variant_reason(module: LoraLayer) -> Optional[str]:
    """Why the layer's LoRA variants (DoRA, aLoRA, ...) cannot be served, or None."""
    if not module.lora_variant:
        return None
    kinds = {type(v) for v in module.lora_variant.values()}
    if DoraLinearVariant is None or kinds != {DoraLinearVariant}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        return f"LoRA variant {names} (aLoRA, … keep PEFT's forward; DoRA is served)"
    if "dora" not in VARIANTS:
        return "DoRA (DoraLinearVariant): this lora_kernels has no 'dora' variant (lora_kernels.variants)"
    for name in module.lora_variant:
        if module.lora_B[name].bias is not None:
            return f"adapter {name!r}: DoRA with lora_bias=True keeps PEFT's forward"
        if common.has_hooks(module.lora_magnitude_vector[name]):
            return f"adapter {name!r}: forward hooks on lora_magnitude_vector"
    return None


def _static_reason(module: LoraLayer, fsdp2: bool = False) -> Optional[str]:
    """Why `module` keeps PEFT's forward, or None if the fused forward can serve it. `fsdp2`: the
    layer is under fully_shard (its DTensor weights are plain tensors in forward)."""
    plain = isinstance(module, LoraLinear) and type(module).forward is LoraLinear.forward
    qlora = _is_qlora(module) and type(module).forward is LoraLinear4bit.forward
    if not (plain or qlora):
        return (
            f"{type(module).__name__} is not a lora.Linear or lora.bnb.Linear4bit (8-bit, Conv, Embedding, … "
            "LoRA layers keep PEFT's forward)"
        )
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style transposed weight, e.g. GPT-2)"
    reason = _base_reason(module, fsdp2) or _variant_reason(module)
    if reason is not None:
        return reason
    if common.foreign_forward(module):
        return "forward already replaced on the instance (accelerate / device-map hooks?)"
    if common.has_hooks(module.base_layer):
        return "forward hooks on the base layer (PEFT's forward would run them)"
    for name in module.lora_A:
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
            return f"adapter {name!r}: lora_A/lora_B are not plain nn.Linear"
        if common.dropout_p(module.lora_dropout[name]) is None:
            return f"adapter {name!r}: lora_dropout is {type(module.lora_dropout[name]).__name__}, not nn.Dropout"
        if common.has_hooks(lora_A, lora_B, module.lora_dropout[name]):
            return f"adapter {name!r}: forward hooks on lora_A / lora_B / lora_dropout"
    return None


def _base_dtype(module: LoraLayer) -> torch.dtype:
    """The dtype the base layer computes in (a 4-bit base: its compute dtype, else the dtype it was
    quantized from; bitsandbytes may settle it from x on the first call)."""
    base = module.base_layer
    if _is_qlora(module):
        return base.compute_dtype or base.weight.quant_state.dtype
    return base.weight.dtype


MIXED_DROPOUT_CONDITION = (
    "for mixed batches (adapter_names), in eval mode: in training a mixed batch naming an adapter with "
    "lora_dropout > 0 runs PEFT's forward (PEFT drops each sub-batch with torch's dropout)"
)
MIXED_BIAS_CONDITION = (
    "for mixed batches (adapter_names), unless they name a lora_bias adapter: those run PEFT's forward "
    "(the per-row op has no per-adapter bias)"
)


def _conditions(module: LoraLayer, cast_adapters: bool) -> List[str]:
    """When a patchable layer is fused only under a condition (the report's "fused only" lines)."""
    conditions = []
    if any(type(d) is nn.Dropout and d.p > 0.0 for d in module.lora_dropout.values()):
        conditions.append(MIXED_DROPOUT_CONDITION)
    if any(module.lora_B[name].bias is not None for name in module.lora_B):
        conditions.append(MIXED_BIAS_CONDITION)
    if module.lora_variant:
        conditions.append(DORA_AUTOCAST_CONDITION)
        if len(module.lora_A) > 1:
            conditions.append(
                "while one adapter is active (several active adapters with DoRA among them run PEFT's forward)"
            )
    base_dtype = _base_dtype(module)
    params = [p for name in module.lora_A for m in (module.lora_A[name], module.lora_B[name]) for p in m.parameters()]
    params += [module.lora_magnitude_vector[name].weight for name in module.lora_variant]
    dtypes = {p.dtype for p in params}
    if not cast_adapters and not dtypes <= {base_dtype}:
        shown = "/".join(_dtype_name(d) for d in sorted(dtypes - {base_dtype}, key=str))
        conditions.append(
            f"under torch.autocast: adapters in {shown} on a {_dtype_name(base_dtype)} base (without "
            "autocast PEFT runs that LoRA branch in the adapter dtype, so its forward does; "
            "patch(..., cast_adapters=True) fuses it in the base dtype)"
        )
    return conditions


# --- the fused call (per call) ----------------------------------------------------------------------


def _adapter(layer: LoraLayer, name: str) -> Optional[AdapterCall]:
    """Adapter `name` of `layer` as the fused call takes it, or None if this call cannot serve it."""
    lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    p = common.dropout_p(dropout)
    scaling = layer.scaling[name]
    if (
        p is None
        or type(lora_A) is not nn.Linear
        or type(lora_B) is not nn.Linear
        or lora_A.bias is not None
        or isinstance(scaling, bool)
        or not isinstance(scaling, (int, float))
        or not all(common.plain_tensor(t) for t in (lora_A.weight, lora_B.weight, lora_B.bias))
        or common.has_hooks(lora_A, lora_B, dropout)
    ):
        return None
    variant, extra = "lora", {}
    if name in layer.lora_variant:
        if type(layer.lora_variant[name]) is not DoraLinearVariant or lora_B.bias is not None:
            return None
        magnitude = layer.lora_magnitude_vector[name]
        if common.has_hooks(magnitude) or not common.plain_tensor(magnitude.weight):
            return None
        # PEFT uses x itself (no second base product) when dropout is nn.Identity or in eval mode
        variant, extra = "dora", {"magnitude": magnitude.weight}
        p = 0.0 if isinstance(dropout, nn.Identity) or not layer.training else p
    return AdapterCall(lora_A.weight, lora_B.weight, lora_B.bias, float(scaling), p, variant, extra)


def _qlora_base(layer: LoraLayer, x: torch.Tensor):
    """(4-bit BaseWeight in bitsandbytes' compute dtype, bias) for this call, or None."""
    base = layer.base_layer
    fix_4bit_weight_quant_state_from_module(base)
    state = base.weight.quant_state
    if state is None or getattr(state, "packing_format_for_cpu", False) or state.quant_type not in FORMATS:
        return None
    if not base.compute_type_is_set:  # bitsandbytes settles its compute dtype from the first x
        base.set_compute_type(x)
        base.compute_type_is_set = True
    compute = base.compute_dtype or x.dtype
    if layer.lora_variant and state.dtype not in (compute, torch.float32):
        return None  # PEFT's DoRA norm dequantizes to state.dtype, then casts: a double rounding
    try:
        weight = FORMATS[state.quant_type].from_bnb_cached(base.weight, compute)
    except (TypeError, ValueError):
        return None
    return weight, base.bias


def _mixed_batch(layer: LoraLayer, x: torch.Tensor, names) -> Optional[tuple]:
    """(adapters, adapter_ids) of a mixed-batch call: this layer's plain LoRA adapters in its lora_A
    order (all of them, so the cached stack serves any batch; only the named ones when the call
    needs their gradients) and the int64 (M,) index of each of x's M rows into them (-1: base
    only), or None where PEFT's forward must run."""
    if not isinstance(names, (list, tuple)) or x.dim() < 2 or len(names) != x.shape[0]:
        return None  # PEFT raises on a wrong number of names
    # with gradients (any adapter of the layer trainable), only the named adapters: PEFT leaves the
    # others' .grad None, not zero — optimizers tell them apart; without, all of them, so the cached
    # stack serves every batch
    named = set(names)
    grads = torch.is_grad_enabled() and any(p.requires_grad for n in layer.lora_A
                                            for p in (layer.lora_A[n].weight, layer.lora_B[n].weight))
    adapters, index = [], {}
    for name in layer.lora_A:
        if grads and name not in named:
            continue
        adapter = None if name in layer.lora_variant else _adapter(layer, name)
        if adapter is not None and adapter.lora_B_bias is None:
            index[name] = len(adapters)
            adapters.append(adapter)
    for name in named:
        if name == "__base__" or name not in layer.lora_A:
            continue
        if name not in index or adapters[index[name]].dropout_p > 0.0:
            return None  # DoRA (PEFT raises), lora_bias, dropout in effect, hooks, …
    # "__base__" and names this layer lacks: base only, as PEFT skips them
    per_sample = torch.tensor([index.get(name, -1) for name in names], dtype=torch.int64)
    rows = math.prod(x.shape[1:-1])  # rows (tokens) of x per sample
    adapter_ids = per_sample.to(x.device, non_blocking=True).repeat_interleave(rows)
    return adapters, adapter_ids


def _describe(layer: LoraLayer, x, args, kwargs) -> Optional[LayerCall]:
    """This call of `layer` as a fused call, or None where PEFT's forward must run."""
    names = kwargs.get("adapter_names")
    if args or not all(k in _KNOWN_KWARGS and (v is None or k == "adapter_names") for k, v in kwargs.items()):
        return None  # variant kwargs (aLoRA offsets) or extra arguments
    if layer.disable_adapters or layer.merged or not isinstance(x, torch.Tensor):
        return None  # PEFT: (unmerge and) base layer only, or its checks raise
    base = layer.base_layer
    if common.has_hooks(base):
        return None
    qlora = _is_qlora(layer)
    if qlora:
        served = _qlora_base(layer, x)
        if served is None:
            return None
        weight, bias = served
    else:
        if common.plain_linear_reason(base) is not None:
            return None
        weight, bias = base.weight, base.bias
    adapter_ids = None
    if names is not None:
        mixed = _mixed_batch(layer, x, names)
        if mixed is None:
            return None
        adapters, adapter_ids = mixed
    else:
        adapters = [_adapter(layer, name) for name in layer.active_adapters if name in layer.lora_A]
        if any(a is None for a in adapters):
            return None
    out_dtype = None
    if qlora:  # bitsandbytes returns x's dtype; PEFT's addition may promote it
        # PEFT's 4-bit layer casts each LoRA term to the result's dtype unless (CUDA) autocast is on;
        # its mixed batch adds the terms in place, into x's dtype
        convert = adapter_ids is not None or not torch.is_autocast_enabled()
        autocast = common.autocast_dtype(x)
        lora_dtype = autocast or (adapters[0].lora_A.dtype if adapters else x.dtype)
        out_dtype = x.dtype if convert else torch.promote_types(x.dtype, lora_dtype)
    cast_ok = getattr(layer, "cast_input_dtype_enabled", True)
    return LayerCall(
        x, weight, bias, adapters, cast_x=qlora, adapter_cast_ok=cast_ok, out_dtype=out_dtype, adapter_ids=adapter_ids
    )


def _device_weight(layer: LoraLayer) -> Optional[torch.Tensor]:
    """The base weight x must share a device with (None when a hook on the base may move x)."""
    base = layer.get_base_layer()
    if common.has_hooks(layer.base_layer, base):
        return None
    return getattr(base, "weight", None)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer)


def _several_adapters(module: LoraLayer) -> bool:
    return len(module.lora_A) > 1


FRAMEWORK = register(
    Framework("peft", _is_layer, _static_reason, _conditions, _describe, _device_weight, _several_adapters)
)

plan, apply, patch, unpatch = FRAMEWORK.plan, FRAMEWORK.apply, FRAMEWORK.patch, FRAMEWORK.unpatch
