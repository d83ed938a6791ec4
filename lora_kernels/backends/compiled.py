# SPDX-License-Identifier: Apache-2.0
"""The `cpu` and `cuda` backends: thin calls into the C++/CUDA ops of `lora_kernels._C`
(schemas in csrc/schema.h; kernels in csrc/cpu and csrc/cuda, picked by the tensors' device).

`weight` is optional: with one, the base product (x·Wᵀ, dY·W) is fused into the ops as a GEMM
accumulating onto the LoRA terms; with None the ops compute the LoRA terms (+ bias) only and the
caller adds its own base product (lora_kernels.base_weights)."""

from __future__ import annotations

from typing import Optional

import torch


def forward(x2d, weight: Optional[torch.Tensor], bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x2d (M, K) -> (y (M, N), xa (M, r)) by the fused C++/CUDA forward; weight (N, K) or None
    (then y = bias + s·dropout(x)·Aᵀ·Bᵀ, N taken from lora_B (N, r))."""
    return torch.ops.lora_kernels.fused_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def backward(dy, x2d, weight: Optional[torch.Tensor], lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx):
    """(dx (M, K) or None, dA (r, K), dB (N, r)) by the fused C++/CUDA backward; weight (N, K) or
    None (then dx is the LoRA term s·D⊙(dY·B·A) alone)."""
    grad_x, grad_a, grad_b = torch.ops.lora_kernels.fused_backward(
        dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx
    )
    return (grad_x if compute_dx else None), grad_a, grad_b


# Fake (meta) kernels, so torch.compile and opcheck can trace the compiled ops by shape alone.
# Registered on import, which `lora_kernels._extension` does right after loading `_C`.


@torch.library.register_fake("lora_kernels::fused_forward")
def _fused_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    # N from lora_B, which is there with or without a weight; a weight must have as many rows.
    if weight is not None:
        torch._check(weight.shape[0] == lora_B.shape[0], lambda: "weight and lora_B must have the same N")
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.register_fake("lora_kernels::fused_backward")
def _fused_backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.register_fake("lora_kernels::dropout_keep_mask")
def _dropout_keep_mask_fake(seed, rows, cols, dropout_p):
    return seed.new_empty(rows, cols, dtype=torch.bool)


@torch.library.register_fake("lora_kernels::dropout_keep_bits")
def _dropout_keep_bits_fake(seed, first_group, count, dropout_p):
    return seed.new_empty(count, dtype=torch.uint8)
