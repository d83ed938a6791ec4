# SPDX-License-Identifier: Apache-2.0
"""What the `cpu` and `cuda` backends share: thin calls into the C++/CUDA ops of `lora_kernels._C`
(schemas in csrc/schema.h; kernels in csrc/cpu and csrc/cuda, picked by the tensors' device).

A dense base is fused into the ops (their base GEMM reads the LoRA term in its epilogue); any other
format is given no weight, so the ops compute the LoRA terms alone, and the format's own products
(`BaseWeight.matmul_into` / `grad_input_into`) add the base terms.

Several adapters summed (`StackedSpec`): on CPU tensors the fused `*_stacked` ops; on CUDA tensors
a composition of the single-adapter ops, one call per adapter (`_compose_stacked_forward` /
`_compose_stacked_backward`: correct, not fused).

A mixed batch (`PerRowSpec`): on CPU tensors the compiled `per_row_forward` (row groups in
parallel chunks, then the base GEMM once); on CUDA tensors the grouped composition of
`backends/grouped.py`; backward grouped on both."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lora_kernels import _extension
from lora_kernels.backends import grouped
from lora_kernels.backends.grouped import backward_per_row  # noqa: F401  (this backend's per-row backward)
from lora_kernels.backends.registry import Backend
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights, PerRowSpec, StackedSpec

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
    """The registry record of the `cpu` or `cuda` backend: every float dtype, every base format,
    plain LoRA and several adapters summed (fused on cpu, composed of single-adapter calls on cuda)."""
    return Backend(
        name=device_type,
        module=__name__,
        device_types=(device_type,),
        dtypes=COMPILED_DTYPES,
        variants=("lora", "stacked", "per_row"),
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


def forward_stacked(x2d, weights: LoRAWeights, spec: StackedSpec, seeds):
    """x2d (M, K) -> (y (M, N), xa (M, R)) for several adapters summed; weights.lora_A (R, K) and
    lora_B (N, R) are their concatenations, seeds int64 (T,) or None (`StackedSpec`)."""
    dense = weights.dense_weight
    if x2d.device.type == "cpu":
        y, xa = torch.ops.lora_kernels.fused_forward_stacked(
            x2d, dense, weights.bias, weights.lora_A, weights.lora_B, list(spec.ranks), list(spec.scalings),
            list(spec.dropout_ps), seeds,
        )
    else:
        y, xa = _compose_stacked_forward(torch.ops.lora_kernels, x2d, dense, weights.bias, weights.lora_A,
                                         weights.lora_B, spec, seeds)
    if dense is None:
        weights.base.matmul_into(y, x2d)
    return y, xa


def backward_stacked(dy, x2d, weights: LoRAWeights, xa, spec: StackedSpec, seeds, compute_dx) -> LoRAGrads:
    """LoRAGrads(dx (M, K) or None, dA (R, K), dB (N, R)) for several adapters summed."""
    dense = weights.dense_weight
    if x2d.device.type == "cpu":
        grad_x, grad_a, grad_b = torch.ops.lora_kernels.fused_backward_stacked(
            dy, x2d, dense, weights.lora_A, weights.lora_B, xa, list(spec.ranks), list(spec.scalings),
            list(spec.dropout_ps), seeds, compute_dx,
        )
    else:
        grad_x, grad_a, grad_b = _compose_stacked_backward(torch.ops.lora_kernels, dy, x2d, dense, weights.lora_A,
                                                           weights.lora_B, xa, spec, seeds, compute_dx)
    if not compute_dx:
        return LoRAGrads(None, grad_a, grad_b)
    if dense is None:
        weights.base.grad_input_into(grad_x, dy)
    return LoRAGrads(grad_x, grad_a, grad_b)


def forward_per_row(x2d, weights: LoRAWeights, spec: PerRowSpec):
    """A mixed batch: x2d (M, K) -> (y (M, N), xa (M, r)); see `contract.PerRowSpec`."""
    if x2d.device.type != "cpu":
        return grouped.forward_per_row(x2d, weights, spec)
    dense = weights.dense_weight
    groups = spec.groups
    y, xa = torch.ops.lora_kernels.per_row_forward(x2d, dense, weights.bias, weights.lora_A, weights.lora_B,
                                                   list(spec.scalings), groups.order, groups.starts)
    if dense is None:
        weights.base.matmul_into(y, x2d)
    return y, xa


def _adapter_calls(spec: StackedSpec, seeds):
    """Per adapter: (rank slice, scaling, dropout_p, seed (1,) or None): the arguments of its
    single-adapter call, whose mask is then the one the stacked op draws for it."""
    for t, (offset, rank, adapter) in enumerate(zip(spec.offsets, spec.ranks, spec.adapters)):
        seed = seeds[t : t + 1] if seeds is not None and adapter.dropout_p > 0 else None
        yield slice(offset, offset + rank), adapter.scaling, adapter.dropout_p, seed


def _compose_stacked_forward(ops, x2d, weight, bias, lora_A, lora_B, spec: StackedSpec, seeds):
    """The stacked forward as one single-adapter `ops.fused_forward` per adapter (`ops`: a namespace
    with that op, e.g. torch.ops.lora_kernels): the first adds weight and bias, the others give
    their LoRA term alone. -> (y (M, N), xa (M, R))."""
    y, xas = None, []
    for cols, scaling, dropout_p, seed in _adapter_calls(spec, seeds):
        first = y is None
        y_t, xa_t = ops.fused_forward(x2d, weight if first else None, bias if first else None, lora_A[cols],
                                      lora_B[:, cols].contiguous(), scaling, dropout_p, seed)
        y = y_t if first else y.add_(y_t)
        xas.append(xa_t)
    return y, torch.cat(xas, dim=1)


def _compose_stacked_backward(ops, dy, x2d, weight, lora_A, lora_B, xa, spec: StackedSpec, seeds, compute_dx):
    """The stacked backward as one `ops.fused_backward` per adapter (the first with weight: the base
    product once): -> (grad_x (M, K), or empty without compute_dx; grad_A (R, K); grad_B (N, R))."""
    grad_x, grad_as, grad_bs = None, [], []
    for cols, scaling, dropout_p, seed in _adapter_calls(spec, seeds):
        first = grad_x is None
        gx_t, ga_t, gb_t = ops.fused_backward(dy, x2d, weight if first else None, lora_A[cols],
                                              lora_B[:, cols].contiguous(), xa[:, cols].contiguous(), scaling,
                                              dropout_p, seed, compute_dx)
        grad_x = gx_t if first or not compute_dx else grad_x.add_(gx_t)
        grad_as.append(ga_t)
        grad_bs.append(gb_t)
    return grad_x, torch.cat(grad_as, dim=0), torch.cat(grad_bs, dim=1)
