# SPDX-License-Identifier: Apache-2.0
"""Plain LoRA: ``y = x·W₀ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` — the fused op itself."""

from lora_kernels.ops import lora_linear
from lora_kernels.reference import lora_linear_eager
from lora_kernels.variants.base import Variant, register_variant

LORA = register_variant(Variant(name="lora", apply=lora_linear, oracle=lora_linear_eager))
