# SPDX-License-Identifier: Apache-2.0
"""Drop-in fused forwards for the LoRA modules people already use.

`patch(model)` serves the PEFT LoRA linears (`lora.Linear` with LoRA or DoRA, QLoRA's
`lora.bnb.Linear4bit`) and torchtune `LoRALinear` / `DoRALinear` layers in `model` by the fused
op (in place, parameters and state_dict untouched) and returns a
`PatchReport`; `unpatch(model)` restores their own forwards. Neither PEFT nor torchtune is imported
here: a model can only hold their layers once they are imported, so only those already in
`sys.modules` are consulted. The per-framework modules are `lora_kernels.integrations.peft` and
`lora_kernels.integrations.torchtune` (each only says how to read its layers; the loop, the
per-call forward and its dtype policy are `lora_kernels.integrations.adapter`);
`lora_kernels.integrations.transformers` has the `transformers.TrainerCallback`.
"""

from __future__ import annotations

import sys
import warnings
from typing import List

from torch import nn

from lora_kernels.integrations._common import PatchReport, strict_error
from lora_kernels.integrations.adapter import FRAMEWORK_MODULES, framework

__all__ = ["patch", "unpatch", "PatchReport"]

def _integrations() -> List:
    found = []
    for package in FRAMEWORK_MODULES:
        if package in sys.modules:
            try:
                found.append(framework(package))
            except ImportError as exc:  # e.g. torchtune present but its torchao import fails
                warnings.warn(f"lora_kernels: {package} integration unavailable: {exc}", RuntimeWarning, stacklevel=3)
    return found


def patch(model: nn.Module, strict: bool = False, backend: str = "auto", cast_adapters: bool = False) -> PatchReport:
    """Serve every PEFT and torchtune LoRA linear layer of `model` by the fused op.

    backend: "auto" or a name from `lora_kernels.available_backends()`.
    strict: raise ValueError (listing layers and reasons, patching nothing) if any LoRA layer
        would keep its own forward, instead of reporting it.
    cast_adapters: fuse adapters whose dtype differs from the base layer's (PEFT's default fp32
        adapters on a bf16/fp16 base) in the base dtype. Without it such layers are patched but
        fused only under `torch.autocast`; other calls run PEFT's forward, whose LoRA branch
        computes in the adapter dtype (the report lists them under "fused only").
    Returns a `PatchReport` (`print(report)` for the summary). Patching twice is harmless; layers
    already patched get the new options.
    """
    plans = [(integration, integration.plan(model, backend, cast_adapters)) for integration in _integrations()]
    report = PatchReport(backend=backend)
    for _, (kept, _todo) in plans:
        report.merge(kept)
    if strict and report.num_kept:  # every framework checked before anything is patched
        raise strict_error(report)
    for integration, (_kept, todo) in plans:
        integration.apply(todo, report, backend, cast_adapters)
    if report.num_patched == 0 and report.num_kept == 0:
        warnings.warn("lora_kernels.patch: no PEFT or torchtune LoRA layer found in the model", stacklevel=2)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the original forward of every patched layer; returns how many were restored."""
    return sum(integration.unpatch(model) for integration in _integrations())
