# SPDX-License-Identifier: Apache-2.0
"""lora_kernels: a fused LoRA linear layer (dropout included) for PyTorch.

Public API: `lora_linear` (the op), `lora_linear_stacked` (several adapters summed),
`lora_linear_per_row` (a mixed batch: per-row adapter ids), `LoRALinear` (the module), `available_backends`.
"""

# The one place the version is written: pyproject.toml reads it (statically) from here.
__version__ = "0.1.0"

from lora_kernels import _extension
from lora_kernels.backends import available_backends
from lora_kernels.integrations import patch, unpatch
from lora_kernels.modules import LoRALinear
from lora_kernels.ops import lora_linear
from lora_kernels.variants.per_row import lora_linear_per_row
from lora_kernels.variants.stacked import lora_linear_stacked

__all__ = ["lora_linear", "lora_linear_stacked", "lora_linear_per_row", "LoRALinear", "available_backends", "patch",
           "unpatch"]

# Load the compiled ops now if they were built (a warning, not an error, if they fail to load).
HAS_EXTENSION = _extension.load_error() is None
