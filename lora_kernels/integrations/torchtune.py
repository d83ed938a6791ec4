# SPDX-License-Identifier: Apache-2.0
"""Route torchtune's `LoRALinear` layers through `lora_kernels.lora_linear`, in place.

torchtune is optional: importing this module raises ImportError when it (or the torchao it needs)
is missing; `lora_kernels.integrations.patch` only consults it once torchtune is imported.

torchtune semantics reproduced (torchtune 0.6, `torchtune.modules.peft.LoRALinear.forward`):
``out = F.linear(x, weight, bias)``; unless ``disabled``, ``out + (alpha / rank) * lora_b(lora_a(dropout(x)))``
(alpha and rank read per call; ``merged`` does not change torchtune's forward, so it does not change ours).
No input casting: without autocast all operands must share x's dtype (else torchtune's own forward
runs, and raises as it would); under `torch.autocast` every operand is cast to the autocast dtype.
Kept on their own forward: NF4-quantized bases (`quantize_base=True`), subclasses such as
`QATLoRALinear` (fake quantization), `DoRALinear`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchtune.modules.peft import LoRALinear

try:
    from torchtune.modules.peft import DoRALinear
except ImportError:  # pragma: no cover - older torchtune
    DoRALinear = ()

from lora_kernels.backends import resolve
from lora_kernels.integrations import _common as common
from lora_kernels.ops import lora_linear


def _is_lora_linear(module: nn.Module) -> bool:
    return isinstance(module, LoRALinear)


def _static_reason(module: nn.Module) -> Optional[str]:
    if isinstance(module, DoRALinear):
        return "DoRALinear (DoRA keeps torchtune's forward)"
    if type(module) is not LoRALinear:
        return f"{type(module).__name__} (a LoRALinear subclass, e.g. QAT fake quantization) keeps its forward"
    if getattr(module, "_quantize_base", False):
        return "quantize_base=True (NF4 base weight)"
    if not common.plain_tensor(module.weight) or not common.plain_tensor(module.bias):
        return f"base weight is a {type(module.weight).__name__}, not a dense float tensor (quantized or sharded)"
    if type(module.lora_a) is not nn.Linear or type(module.lora_b) is not nn.Linear:
        return "lora_a/lora_b are not plain nn.Linear"
    if module.lora_a.bias is not None or module.lora_b.bias is not None:
        return "lora_a/lora_b have a bias"
    if common.dropout_p(module.dropout) is None:
        return f"dropout is {type(module.dropout).__name__}, not nn.Dropout/nn.Identity"
    if common.foreign_forward(module):
        return "forward already replaced on the instance"
    if common.has_hooks(module.lora_a, module.lora_b, module.dropout):
        return "forward hooks on lora_a / lora_b / dropout"
    return None


def plan(model: nn.Module, backend: str = "auto", cast_adapters: bool = False):
    """(report of the layers that keep torchtune's forward, [(name, layer) to patch]); changes nothing.
    `cast_adapters` is accepted for symmetry with PEFT; torchtune never mixes dtypes."""
    param = next(model.parameters(), None)
    resolve(backend, param.device if param is not None and param.device.type != "meta" else torch.device("cpu"))
    kept, todo = common.PatchReport(backend=backend), []
    for name, module in model.named_modules():
        if not (_is_lora_linear(module) or isinstance(module, DoRALinear)):
            continue
        reason = None if common.is_patched(module) else _static_reason(module)
        if reason is None:
            todo.append((name, module))
        else:
            kept.keep(name, reason)
    return kept, todo


def apply(todo, report: common.PatchReport, backend: str, cast_adapters: bool) -> None:
    """Patch the layers `plan` selected, recording them in `report`."""
    common.apply_plan(todo, report, _fused_forward, backend, cast_adapters)


def patch(model: nn.Module, strict: bool = False, backend: str = "auto", cast_adapters: bool = False):
    """Serve every torchtune `LoRALinear` in `model` by `lora_kernels.lora_linear`; returns a `PatchReport`."""
    return common.patch_with(plan, apply, model, strict, backend, cast_adapters)


def unpatch(model: nn.Module) -> int:
    """Restore torchtune's forward on every patched layer; returns how many were restored."""
    return sum(common.uninstall(m) for m in model.modules() if _is_lora_linear(m))


def _fused_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """torchtune's `LoRALinear.forward` computed with `lora_kernels.lora_linear` (the instance's forward)."""
    state = common.patch_state(self)
    out = _fused(self, x, state)
    if out is None:
        weight = self.weight
        if isinstance(x, torch.Tensor) and weight.device.type != "meta" and x.device != weight.device:
            raise common.device_mismatch_error(self, x, weight)
        return state.original(self, x)
    return out


def _fused(self: LoRALinear, x: torch.Tensor, state: common.PatchState) -> Optional[torch.Tensor]:
    if self.disabled or self._quantize_base:
        return None
    p = common.dropout_p(self.dropout)
    weight, bias = self.weight, self.bias
    lora_A, lora_B = self.lora_a.weight, self.lora_b.weight
    tensors = (x, weight, bias, lora_A, lora_B)
    if (
        p is None
        or not isinstance(x, torch.Tensor)
        or x.dim() == 0
        or x.shape[-1] != weight.shape[1]
        or not all(common.plain_tensor(t) for t in tensors[1:])
        or self.lora_a.bias is not None
        or self.lora_b.bias is not None
        or common.has_hooks(self.lora_a, self.lora_b, self.dropout)
        or any(t is not None and t.device != x.device for t in tensors)
    ):
        return None
    compute = common.autocast_dtype(x)
    if compute is not None:
        if any(t is not None and t.dtype not in common.AUTOCAST_DTYPES for t in tensors):
            return None
    else:
        compute = x.dtype
        if any(t is not None and t.dtype != compute for t in tensors) or compute not in common.FUSABLE_DTYPES:
            return None
    x, weight, bias, lora_A, lora_B = common.cast_all(compute, tensors)
    scaling = float(self.alpha) / float(self.rank)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, training=p > 0.0, backend=state.backend)
