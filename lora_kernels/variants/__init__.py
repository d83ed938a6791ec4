# SPDX-License-Identifier: Apache-2.0
"""LoRA variants, one module each, in the `VARIANTS` registry (see `variants.base.Variant`):

  lora.py  plain LoRA: the fused op
  dora.py     DoRA (weight-decomposed LoRA, PEFT's `use_dora=True`)
  stacked.py  several adapters summed, each with its own dropout (PEFT's several active adapters)
  per_row.py  a mixed batch: each row its own adapter (PEFT's `adapter_names`, multi-tenant serving)
"""

from lora_kernels.variants import dora, lora, per_row, stacked  # noqa: F401  (each registers itself)
from lora_kernels.variants.base import VARIANTS, Variant, register_variant

__all__ = ["VARIANTS", "Variant", "register_variant"]
