# SPDX-License-Identifier: Apache-2.0
"""Route PEFT's `lora.Linear` layers through `lora_kernels.lora_linear`, in place.

`patch(model)` replaces the forward of every PEFT `lora.Linear` it can serve with a bound method
that computes PEFT's result with the fused op; parameters, buffers, hooks and the state_dict are
untouched, so `save_pretrained` / `from_pretrained`, `merge_and_unload`, optimizers and DDP see the
same model. `unpatch(model)` restores PEFT's forward. Per call, anything the fused path does not
reproduce exactly (disabled or merged adapters, `adapter_names` mixed batches, a LoRA variant,
mismatched dtypes, hooks on the base layer, …) is delegated to PEFT's own forward.

PEFT semantics reproduced (peft 0.21, `peft.tuners.lora.layer.Linear.forward`):

* ``result = base_layer(x)``; then for each active adapter that the layer holds, in order,
  ``result = result + lora_B(lora_A(dropout(x))) * scaling[adapter]``; the result keeps the base
  output's dtype. `scaling` is read per call, so rsLoRA, `set_scale` and `scale_layer` apply.
* the first adapter's term is fused with the base GEMM and bias; with several adapters and no
  dropout they all go into that one call (A's stacked, B's scaled and stacked); with dropout each
  further adapter adds PEFT's own eager term (its own independent mask, as PEFT draws one).
* `lora_bias`: ``lora_B``'s bias times `scaling` is folded into the base bias.
* dropout: ``nn.Dropout(p)`` in training mode -> the fused op's dropout at rate p (the mask is the
  lora_kernels generator's, regenerated in backward, never stored); ``nn.Identity`` or eval -> none.
  ``lora_dropout=1.0`` is served: the LoRA term and the gradients of A and B are zero, as in PEFT.
* dtypes: the fused call needs one dtype. Under `torch.autocast` every operand is cast to the
  autocast dtype, which is what PEFT's linears compute in. Without autocast, adapters in another
  dtype than the base (PEFT's default fp32 adapters on a bf16/fp16 base) run PEFT's forward,
  whose LoRA branch computes in the adapter dtype (the report lists them under "fused only under
  torch.autocast"); `cast_adapters=True` instead fuses them in the base dtype (like autocast: fp32
  parameters and gradients, half-precision compute).
"""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from lora_kernels.backends import resolve
from lora_kernels.integrations import _common as common
from lora_kernels.ops import lora_linear

try:  # kwargs PEFT pops for its LoRA variants; any of them set means "not plain LoRA"
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS as _VARIANT_KWARGS
except ImportError:  # pragma: no cover - older peft
    _VARIANT_KWARGS = ("alora_offsets",)

_KNOWN_KWARGS = frozenset(("adapter_names", *_VARIANT_KWARGS))


# --- which layers ---------------------------------------------------------------------------------


def _static_reason(module: LoraLayer, fsdp2: bool = False) -> Optional[str]:
    """Why `module` keeps PEFT's forward, or None if the fused forward can serve it. `fsdp2`: the
    layer is under fully_shard (its DTensor weights are plain tensors in forward)."""
    if not isinstance(module, LoraLinear) or type(module).forward is not LoraLinear.forward:
        return (
            f"{type(module).__name__} is not a lora.Linear (quantized, Conv, Embedding, … LoRA layers "
            "keep PEFT's forward)"
        )
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style transposed weight, e.g. GPT-2)"
    base_reason = common.plain_linear_reason(module.base_layer, fsdp2)
    if base_reason is not None:
        return base_reason
    if module.lora_variant:
        kinds = ", ".join(sorted({type(v).__name__ for v in module.lora_variant.values()}))
        return f"LoRA variant {kinds} (DoRA, aLoRA, … keep PEFT's forward)"
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


def _condition(module: LoraLinear, cast_adapters: bool) -> Optional[str]:
    """For a patchable layer whose adapters are in another dtype than its base: when it is fused."""
    if cast_adapters:
        return None
    base_dtype = module.base_layer.weight.dtype
    params = [p for name in module.lora_A for m in (module.lora_A[name], module.lora_B[name]) for p in m.parameters()]
    dtypes = {p.dtype for p in params}
    if dtypes <= {base_dtype}:
        return None
    shown = "/".join(str(d).replace("torch.", "") for d in sorted(dtypes - {base_dtype}, key=str))
    return (
        f"under torch.autocast: adapters in {shown} on a {str(base_dtype).replace('torch.', '')} base (without "
        "autocast PEFT runs that LoRA branch in the adapter dtype, so its forward does; "
        "patch(..., cast_adapters=True) fuses it in the base dtype)"
    )


def plan(model: nn.Module, backend: str = "auto", cast_adapters: bool = False):
    """(report of the layers that keep PEFT's forward, [(name, layer) to patch]); changes nothing."""
    _check_backend(model, backend)
    kept, todo = common.PatchReport(backend=backend), []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        fsdp2 = common.fsdp2_managed(model, name)
        reason = None if common.is_patched(module) else _static_reason(module, fsdp2)
        if reason is None:
            todo.append((name, module))
            condition = _condition(module, cast_adapters)
            if condition is not None:
                kept.note(name, condition)
            if fsdp2 and common.sharded(module):
                kept.note(name, common.FSDP2_CONDITION)
        else:
            kept.keep(name, reason)
    return kept, todo


def apply(todo, report: common.PatchReport, backend: str, cast_adapters: bool) -> None:
    """Patch the layers `plan` selected, recording them in `report`."""
    common.apply_plan(todo, report, _fused_forward, backend, cast_adapters)


def patch(model: nn.Module, strict: bool = False, backend: str = "auto", cast_adapters: bool = False):
    """Serve every PEFT `lora.Linear` in `model` by `lora_kernels.lora_linear`; returns a
    `PatchReport`. Patching twice is harmless (options are updated). With `strict=True`, a
    ValueError lists the layers that cannot be served (and nothing is patched). See
    `lora_kernels.integrations.patch` for the options."""
    return common.patch_with(plan, apply, model, strict, backend, cast_adapters)


def unpatch(model: nn.Module) -> int:
    """Restore PEFT's forward on every patched layer; returns how many were restored."""
    return sum(common.uninstall(m) for m in model.modules() if isinstance(m, LoraLayer))


def _check_backend(model: nn.Module, backend: str) -> None:
    param = next(model.parameters(), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    resolve(backend, device)  # ValueError now rather than at the first forward


# --- the fused forward ----------------------------------------------------------------------------


def _fused_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's `lora.Linear.forward` computed with `lora_kernels.lora_linear` (the instance's forward)."""
    state = common.patch_state(self)
    out = None
    if not args and all(k in _KNOWN_KWARGS and v is None for k, v in kwargs.items()):
        out = _fused(self, x, state)
    if out is None:  # not something the fused op reproduces exactly: PEFT's own forward
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if (  # PEFT would fail too; name the likely cause (no hook here moves x, e.g. accelerate's)
            isinstance(x, torch.Tensor)
            and isinstance(weight, torch.Tensor)
            and weight.device.type != "meta"
            and x.device != weight.device
            and not common.has_hooks(self.base_layer, base)
        ):
            raise common.device_mismatch_error(self, x, weight)
        return state.original(self, x, *args, **kwargs)
    return out


def _fused(self: LoraLinear, x: torch.Tensor, state: common.PatchState) -> Optional[torch.Tensor]:
    """The fused result, or None where PEFT's forward must run instead."""
    if self.disable_adapters or self.merged:  # PEFT: (unmerge and) base layer only
        return None
    base = self.base_layer
    if common.plain_linear_reason(base) is not None or common.has_hooks(base):
        return None
    weight, bias = base.weight, base.bias
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return None
    names = [n for n in self.active_adapters if n in self.lora_A]
    if not names:
        return None
    adapters = []  # (lora_A, lora_B, dropout p, scaling, name)
    for name in names:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        p = common.dropout_p(self.lora_dropout[name])
        scaling = self.scaling[name]
        if (
            name in self.lora_variant
            or p is None
            or type(lora_A) is not nn.Linear
            or type(lora_B) is not nn.Linear
            or lora_A.bias is not None
            or isinstance(scaling, bool)
            or not isinstance(scaling, (int, float))
            or not all(common.plain_tensor(t) for t in (lora_A.weight, lora_B.weight, lora_B.bias))
            or common.has_hooks(lora_A, lora_B, self.lora_dropout[name])
        ):
            return None
        adapters.append((lora_A, lora_B, p, float(scaling), name))

    # One compute dtype for the fused call (see the module docstring).
    tensors = [x, weight, bias] + [t for a in adapters for t in (a[0].weight, a[1].weight, a[1].bias)]
    if any(t is not None and t.device != x.device for t in tensors):
        return None
    compute = common.autocast_dtype(x)
    if compute is not None:
        if any(t is not None and t.dtype not in common.AUTOCAST_DTYPES for t in tensors):
            return None
    else:
        compute = x.dtype
        if weight.dtype != compute or (bias is not None and bias.dtype != compute):
            return None  # PEFT's base layer raises; let it
        adapter_dtypes = {t.dtype for t in tensors[3:] if t is not None}
        if adapter_dtypes - {compute} and not (state.cast_adapters and self.cast_input_dtype_enabled):
            return None
    if compute not in common.FUSABLE_DTYPES:
        return None
    if any(abs(a[3]) > torch.finfo(compute).max for a in adapters):
        return None  # lora_linear refuses it; PEFT's forward overflows to inf as it always did

    # The fused call: base + every adapter when none has dropout, else base + the first with dropout.
    dropped = [a for a in adapters if a[2] > 0.0]
    fused = adapters if not dropped else [dropped[0]]
    eager = [a for a in adapters if not any(a is f for f in fused)]
    x_c, weight_c, bias_c = common.cast_all(compute, (x, weight, bias))
    lora_bias = [a[1].bias * a[3] for a in fused if a[1].bias is not None]
    if lora_bias:
        lora_bias = common.cast_all(compute, lora_bias)
        bias_c = sum(lora_bias[1:], lora_bias[0]) if bias_c is None else sum(lora_bias, bias_c)
    if len(fused) == 1:
        lora_A, lora_B, p, scaling, _ = fused[0]
        a_w, b_w = common.cast_all(compute, (lora_A.weight, lora_B.weight))
    else:  # p = 0 for all: x·[A1;A2]ᵀ·[s1·B1, s2·B2]ᵀ = Σ sᵢ·(x·Aᵢᵀ)·Bᵢᵀ
        a_w = torch.cat(common.cast_all(compute, [a[0].weight for a in fused]), dim=0)
        b_w = torch.cat(common.cast_all(compute, [a[1].weight * a[3] for a in fused]), dim=1)
        p, scaling = 0.0, 1.0
    result = lora_linear(x_c, weight_c, bias_c, a_w, b_w, scaling, p, training=p > 0.0, backend=state.backend)

    # Further adapters with dropout: PEFT's own term (its input casting and its dropout module).
    if eager:
        result_dtype = result.dtype
        x_lora = x
        for lora_A, lora_B, _, scaling, name in eager:
            x_lora = self._cast_input_dtype(x_lora, lora_A.weight.dtype)
            result = result + lora_B(lora_A(self.lora_dropout[name](x_lora))) * scaling
        result = result.to(result_dtype)
    return result
