# SPDX-License-Identifier: Apache-2.0
"""The `cuda` backend: the CUDA kernels of lora_kernels._C (csrc/cuda), called through
`lora_kernels.backends.compiled`. Serves every base-weight format: a dense base inside the
kernels, any other through the format's own products."""

from lora_kernels.backends import compiled
from lora_kernels.backends.registry import register

BACKEND = register(compiled.backend("cuda"))
