# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) kernels of the compiled ops, so torch.compile and opcheck can trace them by shape
alone. Imported by `lora_kernels._extension` right after it loads `_C` (registering a fake needs the op).
"""

import torch


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


@torch.library.register_fake("lora_kernels::fused_forward_stacked")
def _fused_forward_stacked_fake(x, weight, bias, lora_A, lora_B, ranks, scalings, dropout_ps, seeds):
    torch._check(sum(ranks) == lora_A.shape[0], lambda: "sum(ranks) must equal lora_A's rows R")
    return _fused_forward_fake(x, weight, bias, lora_A, lora_B, 1.0, 0.0, None)


@torch.library.register_fake("lora_kernels::fused_backward_stacked")
def _fused_backward_stacked_fake(grad_y, x, weight, lora_A, lora_B, xa, ranks, scalings, dropout_ps, seeds,
                                 compute_grad_x):
    return _fused_backward_fake(grad_y, x, weight, lora_A, lora_B, xa, 1.0, 0.0, None, compute_grad_x)


@torch.library.register_fake("lora_kernels::dropout_keep_mask")
def _dropout_keep_mask_fake(seed, rows, cols, dropout_p):
    return seed.new_empty(rows, cols, dtype=torch.bool)


@torch.library.register_fake("lora_kernels::dropout_keep_bits")
def _dropout_keep_bits_fake(seed, first_group, count, dropout_p):
    return seed.new_empty(count, dtype=torch.uint8)


@torch.library.register_fake("lora_kernels::decode_4bit")
def _decode_4bit_fake(packed, absmax, code, first, row_stride, blocksize, out):
    return None


@torch.library.register_fake("lora_kernels::per_row_forward")
def _per_row_forward_fake(x, weight, bias, lora_A, lora_B, scalings, order, starts):
    return x.new_empty(x.shape[0], lora_B.shape[1]), x.new_empty(x.shape[0], lora_A.shape[1])


@torch.library.register_fake("lora_kernels::group_rows")
def _group_rows_fake(ids, count):
    return ids.new_empty(ids.numel(), dtype=torch.int64), ids.new_empty(count + 2, dtype=torch.int64)
