# SPDX-License-Identifier: Apache-2.0
"""The `triton` backend: fused LoRA forward/backward as Triton kernels (GPU; CPU tensors under
TRITON_INTERPRET=1). Implements the backend contract of `lora_kernels.contract`; the kernels
(and triton itself) are imported on first use.

Kernels by direction live in `fwd.py` / `bwd.py`, the dropout generator in `dropout.py`,
autotune configs, shared-memory models and the schedule/determinism switches in `configs.py`,
4-bit (NF4/FP4) base weights, dequantized tile by tile inside the GEMM main loops, in `nf4.py`,
the static report (compile for sm80/86/90 without a GPU) in `compile_check.py`:
  LORA_KERNELS_TRITON_SCHEDULE=auto|F1|F2   forward schedule (default auto: F1 only without
                                            dropout, small M and r <= 64)
  LORA_KERNELS_TRITON_DETERMINISTIC=1|0     backward with pinned configs and ordered partial sums
                                            (1, the same bits in every process) or autotuned dX
                                            and atomics (0)
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from lora_kernels.backends.registry import Backend, register
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights

__all__ = ["forward", "backward", "BACKEND"]

# The kernels accumulate in fp32 and use tensor-core dots: fp64 is left to the others.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _availability(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "it runs on cuda tensors (cpu tensors only under TRITON_INTERPRET=1), got cpu"
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    return None


BACKEND = register(
    Backend(
        name="triton",
        module=__name__,
        device_types=("cuda", "cpu"),
        dtypes=TRITON_DTYPES,
        base_formats=("dense", "nf4", "fp4"),  # W₀ is read (and 4-bit dequantized) inside the GEMM main loop
        availability=_availability,
    )
)


def _kernel_weight(weights: LoRAWeights, device: torch.device):
    """W₀ as the kernels take it: the dense (N, K) tensor, or the packed 4-bit tensors of an
    nf4/fp4 base (`nf4.PackedWeight4bit`, never dequantized here)."""
    if weights.dense_weight is not None:
        return weights.dense_weight
    from lora_kernels.backends.triton.nf4 import FORMATS_4BIT, packed_4bit

    fmt = weights.base.format
    if fmt not in FORMATS_4BIT:
        raise ValueError(f"the triton backend reads base weights in dense, nf4 or fp4 format, got {fmt!r}")
    return packed_4bit(weights.base, device)


def forward(x2d, weights: LoRAWeights, spec: LoRASpec, seed, *, schedule=None):
    """x2d (M, K) any strides -> (y (M, N), xa (M, r)) in x's dtype; see `lora_kernels.contract`.
    schedule: "auto" | "F1" | "F2" | None (env LORA_KERNELS_TRITON_SCHEDULE)."""
    from lora_kernels.backends.triton.fwd import lora_forward

    return lora_forward(x2d, _kernel_weight(weights, x2d.device), weights.bias, weights.lora_A, weights.lora_B,
                        spec.scaling, spec.dropout_p, seed, schedule=schedule)


def backward(dy, x2d, weights: LoRAWeights, xa, spec: LoRASpec, seed, compute_dx, *, deterministic=None) -> LoRAGrads:
    """dy (M, N) contiguous -> LoRAGrads(dx (M, K) or None, dA (r, K), dB (N, r)) per docs/design.md §1.
    deterministic: True | False | None (env LORA_KERNELS_TRITON_DETERMINISTIC, default True)."""
    from lora_kernels.backends.triton.bwd import lora_backward

    return LoRAGrads(*lora_backward(dy, x2d, _kernel_weight(weights, x2d.device), weights.lora_A, weights.lora_B, xa, spec.scaling,
                                    spec.dropout_p, seed, compute_dx, deterministic=deterministic))
