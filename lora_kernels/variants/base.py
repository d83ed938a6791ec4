# SPDX-License-Identifier: Apache-2.0
"""`Variant`: one LoRA variant (plain LoRA, DoRA, ...) as the library serves it — its fused or
composed form, its oracle, and the parameters it adds to the plain LoRA ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

VARIANTS: Dict[str, Variant] = {}


@dataclass(frozen=True)
class Variant:
    """A LoRA variant.

    apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend="auto",
          *, seed=None, **extra) -> y (..., N)
        the served form: differentiable, on every backend (a variant a backend does not fuse
        natively is composed on that backend's plain fused op); `weight` a tensor or BaseWeight.
    oracle(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None, **extra) -> y
        plain PyTorch autograd maths, the reference the parity tests hold `apply` to.
    init_extra(weight, lora_A, lora_B, scaling) -> {name: tensor}
        the variant's own parameters (`extra_params`) initialised as PEFT does, for tests and modules.
    form: "single" — one adapter, the signature above; "stacked" — several adapters summed
        (lora_A/lora_B/scaling/dropout_p per adapter, `variants/stacked.py`); "per_row" — a mixed
        batch (per-adapter weights and an `adapter_ids` argument, `variants/per_row.py`). The
        multi-adapter forms are backend entry points (`backends.registry.BACKEND_VARIANTS`).
    """

    name: str
    apply: Callable
    oracle: Callable
    extra_params: Tuple[str, ...] = ()
    init_extra: Callable = lambda weight, lora_A, lora_B, scaling: {}
    form: str = "single"


def register_variant(variant: Variant) -> Variant:
    """Add `variant` to `VARIANTS` under its name."""
    VARIANTS[variant.name] = variant
    return variant
