# SPDX-License-Identifier: Apache-2.0
"""Route torchtune's `LoRALinear` and `DoRALinear` layers through the fused op, in place.

torchtune is optional: importing this module raises ImportError when it (or the torchao it needs)
is missing; `lora_kernels.integrations.patch` only consults it once torchtune is imported.

torchtune semantics reproduced (torchtune 0.6):

* `LoRALinear.forward`: ``out = F.linear(x, weight, bias)``; unless ``disabled``,
  ``out + (alpha / rank) * lora_b(lora_a(dropout(x)))`` (alpha and rank read per call; ``merged``
  does not change torchtune's forward, so it does not change ours).
* `DoRALinear.forward` (unless ``disabled``): ``c = magnitude / ‖W₀ + s·B·A‖`` (norm detached),
  ``out = c·(x·W₀ᵀ + b) + c·s·(dropout(x)·Aᵀ)·Bᵀ``. Without a bias and without dropout this is
  PEFT's DoRA, which the "dora" variant serves; torchtune scales the bias by c and keeps x
  undropped in its base term, so a `DoRALinear` with a bias keeps torchtune's forward and one
  with dropout is fused in eval mode only (in training its calls run torchtune's forward).
* No input casting: without autocast all operands must share x's dtype (else torchtune's own
  forward runs, and raises as it would); under `torch.autocast` every operand is cast to the
  autocast dtype.

Kept on their own forward: NF4-quantized bases (`quantize_base=True`: torchao's NF4Tensor, another
layout than bitsandbytes' that lora_kernels reads) and subclasses such as `QATLoRALinear` (fake
quantization).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torchtune.modules.peft import LoRALinear

try:
    from torchtune.modules.peft import DoRALinear
except ImportError:  # pragma: no cover - older torchtune
    DoRALinear = ()

from lora_kernels.integrations import _common as common
from lora_kernels.integrations.adapter import AdapterCall, Framework, LayerCall, register
from lora_kernels.variants import VARIANTS

DORA_DROPOUT_CONDITION = (
    "in eval mode: torchtune's DoRA with dropout keeps x undropped in its (m/‖W‖ − 1)·x·W₀ᵀ term "
    "(PEFT's DoRA, which the fused op serves, drops it), so training calls run torchtune's forward"
)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (LoRALinear, DoRALinear))


def _static_reason(module: nn.Module, fsdp2: bool = False) -> Optional[str]:
    """Why `module` keeps torchtune's forward, or None (`fsdp2` is not used: torchtune's FSDP2
    shards are DTensors, kept as not dense)."""
    if type(module) not in (LoRALinear, DoRALinear):
        return f"{type(module).__name__} (a LoRALinear subclass, e.g. QAT fake quantization) keeps its forward"
    if getattr(module, "_quantize_base", False):
        return "quantize_base=True (torchao NF4Tensor base: not the bitsandbytes layout lora_kernels reads)"
    if not common.plain_tensor(module.weight) or not common.plain_tensor(module.bias):
        return f"base weight is a {type(module.weight).__name__}, not a dense float tensor (quantized or sharded)"
    if type(module.lora_a) is not nn.Linear or type(module.lora_b) is not nn.Linear:
        return "lora_a/lora_b are not plain nn.Linear"
    if module.lora_a.bias is not None or module.lora_b.bias is not None:
        return "lora_a/lora_b have a bias"
    if common.dropout_p(module.dropout) is None:
        return f"dropout is {type(module.dropout).__name__}, not nn.Dropout/nn.Identity"
    if type(module) is DoRALinear:
        if module.bias is not None:
            return "DoRALinear with a bias (torchtune scales the bias by m/‖W‖, PEFT's DoRA does not)"
        if "dora" not in VARIANTS:
            return "DoRALinear: this lora_kernels has no 'dora' variant (lora_kernels.variants)"
    if common.foreign_forward(module):
        return "forward already replaced on the instance"
    if common.has_hooks(module.lora_a, module.lora_b, module.dropout):
        return "forward hooks on lora_a / lora_b / dropout"
    return None


def _conditions(module: nn.Module, cast_adapters: bool) -> List[str]:
    if type(module) is not DoRALinear:
        return []
    conditions = ["without torch.autocast: torchtune's DoRA under autocast mixes fp32 and the autocast dtype"]
    if type(module.dropout) is nn.Dropout and module.dropout.p > 0.0:
        conditions.append(DORA_DROPOUT_CONDITION)
    return conditions


def _describe(self: nn.Module, x, args, kwargs) -> Optional[LayerCall]:
    """This call as a fused call, or None where torchtune's forward must run."""
    if args or kwargs or self.disabled or self._quantize_base or not isinstance(x, torch.Tensor):
        return None
    p = common.dropout_p(self.dropout)
    if p is None or self.lora_a.bias is not None or self.lora_b.bias is not None:
        return None
    if common.has_hooks(self.lora_a, self.lora_b, self.dropout):
        return None
    if type(self) is DoRALinear:
        if p > 0.0 or self.bias is not None or "dora" not in VARIANTS:
            return None  # torchtune's DoRA differs from PEFT's there (see the module docstring)
        variant, extra, scaling = "dora", {"magnitude": self.magnitude}, self.scaling
    else:
        variant, extra, scaling = "lora", {}, float(self.alpha) / float(self.rank)
    tensors = (self.weight, self.bias, self.lora_a.weight, self.lora_b.weight, *extra.values())
    if not all(common.plain_tensor(t) for t in tensors):
        return None
    adapter = AdapterCall(self.lora_a.weight, self.lora_b.weight, None, float(scaling), p, variant, extra)
    return LayerCall(x, self.weight, self.bias, [adapter])


def _device_weight(self: nn.Module) -> Optional[torch.Tensor]:
    return self.weight


FRAMEWORK = register(Framework("torchtune", _is_layer, _static_reason, _conditions, _describe, _device_weight))

plan, apply, patch, unpatch = FRAMEWORK.plan, FRAMEWORK.apply, FRAMEWORK.patch, FRAMEWORK.unpatch
