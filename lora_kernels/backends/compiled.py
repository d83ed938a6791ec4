# SPDX-License-Identifier: Apache-2.0
"""What the `cpu` and `cuda` backends share: thin calls into the C++/CUDA ops of `lora_kernels._C`
(schemas in csrc/schema.h; kernels in csrc/cpu and csrc/cuda, picked by the tensors' device).

A dense base is fused into the ops (their base GEMM reads the LoRA term in its epilogue); any other
format is given no weight, so the ops compute the LoRA terms alone, and the format's own products
(`BaseWeight.matmul_into` / `grad_input_into`) add the base terms."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lora_kernels import _extension
from lora_kernels.backends.registry import Backend
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights

# The compiled kernels: every float dtype (fp16/bf16 accumulate in fp32, fp64 in fp64).
COMPILED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def availability(device_type: str) -> Callable[[torch.device], Optional[str]]:
    """Why lora_kernels._C cannot serve `device_type` tensors here, or None."""

    def reason(device: torch.device) -> Optional[str]:
        if _extension.load_error() is not None:
            return _extension.load_error()
        if not _extension.has_kernel(device_type):
            return f"lora_kernels._C was built without {device_type} kernels"
        return None

    return reason


def backend(device_type: str) -> Backend:
    """The registry record of the `cpu` or `cuda` backend: every float dtype, every base format."""
    return Backend(
        name=device_type,
        module=__name__,
        device_types=(device_type,),
        dtypes=COMPILED_DTYPES,
        availability=availability(device_type),
    )


def forward(x2d, weights: LoRAWeights, spec: LoRASpec, seed):
    """x2d (M, K) -> (y (M, N), xa (M, r)) by the fused C++/CUDA forward."""
    dense = weights.dense_weight
    y, xa = torch.ops.lora_kernels.fused_forward(
        x2d, dense, weights.bias, weights.lora_A, weights.lora_B, spec.scaling, spec.dropout_p, seed
    )
    if dense is None:
        weights.base.matmul_into(y, x2d)
    return y, xa


def backward(dy, x2d, weights: LoRAWeights, xa, spec: LoRASpec, seed, compute_dx) -> LoRAGrads:
    """LoRAGrads(dx (M, K) or None, dA (r, K), dB (N, r)) by the fused C++/CUDA backward."""
    dense = weights.dense_weight
    grad_x, grad_a, grad_b = torch.ops.lora_kernels.fused_backward(
        dy, x2d, dense, weights.lora_A, weights.lora_B, xa, spec.scaling, spec.dropout_p, seed, compute_dx
    )
    if not compute_dx:
        return LoRAGrads(None, grad_a, grad_b)
    if dense is None:
        weights.base.grad_input_into(grad_x, dy)
    return LoRAGrads(grad_x, grad_a, grad_b)
