# SPDX-License-Identifier: Apache-2.0
"""The backends, one folder each, behind one registry (`registry.py`):

  reference/  plain PyTorch, any device and dtype: the fused op's maths written out (tests, fallback)
  cpu/        C++ kernels of lora_kernels._C (csrc/cpu)
  cuda/       CUDA kernels of lora_kernels._C (csrc/cuda)
  triton/     Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)

Each declares what it serves; importing this package registers all four (their kernels load on first use).
"""

from lora_kernels.backends import cpu, cuda, reference, triton  # noqa: F401  (each registers itself)
from lora_kernels.backends.registry import AUTO_PREFERENCE, BACKENDS, Backend, available_backends, register, resolve

__all__ = ["AUTO_PREFERENCE", "BACKENDS", "Backend", "available_backends", "register", "resolve"]
