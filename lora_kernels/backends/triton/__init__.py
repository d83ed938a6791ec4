# SPDX-License-Identifier: Apache-2.0
"""The `triton` backend: fused LoRA forward/backward as Triton kernels (GPU; CPU tensors under
TRITON_INTERPRET=1). Implements the backend contract of `lora_kernels.contract`; the kernels
(and triton itself) are imported on first use.

Kernels by direction live in `fwd.py` / `bwd.py`, the dropout generator in `dropout.py`,
autotune configs, shared-memory models and the schedule/determinism switches in `configs.py`,
4-bit (NF4/FP4) base weights, dequantized tile by tile inside the GEMM main loops, in `nf4.py`,
several adapters summed in one call (`forward_stacked` / `backward_stacked`, the "stacked"
variant) in `stacked.py`, a mixed batch by per-row adapter ids (`forward_per_row` /
`backward_per_row`, the "per_row" variant) in `per_row.py`, the static report (compile for sm80/86/90 without a GPU) in
`compile_check.py`:
  LORA_KERNELS_TRITON_SCHEDULE=auto|F1|F2   forward schedule (default auto: F1 only without
                                            dropout, small M and r <= 64)
  LORA_KERNELS_TRITON_DETERMINISTIC=1|0     backward with pinned configs and ordered partial sums
                                            (1, the same bits in every process) or autotuned dX
                                            and atomics (0)
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Tuple

import torch

from lora_kernels.backends.grouped import backward_per_row  # noqa: F401  (composed per adapter group)
from lora_kernels.backends.registry import Backend, register
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights, PerRowSpec, StackedSpec

__all__ = ["forward", "backward", "forward_stacked", "backward_stacked", "forward_per_row", "backward_per_row",
           "BACKEND"]

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
        # stacked: several adapters summed, fused (stacked.py); per_row: a mixed batch, the expand
        # fused into the base GEMM (per_row.py)
        variants=("lora", "stacked", "per_row"),
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


def forward_per_row(x2d, weights: LoRAWeights, spec: PerRowSpec):
    """Mixed batch: x2d (M, K) any strides, weights.lora_A (T, r, K), lora_B (T, N, r) ->
    (y (M, N), xa (M, r)) with per-row adapter ids `spec.groups.ids` (-1: base only, xa row 0).
    Two launches (shrink, then the base GEMM with the expand in its epilogue), no host sync."""
    from lora_kernels.backends.triton.per_row import per_row_forward

    return per_row_forward(x2d, _kernel_weight(weights, x2d.device), weights.bias, weights.lora_A, weights.lora_B,
                           _scaling_table(spec.scalings, x2d.device), spec.groups)


@functools.lru_cache(maxsize=64)
def _scaling_table(scalings: Tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The (T,) fp32 scalings the per-row epilogue reads, made once per set of scalings and device:
    a tensor built from a list each call would be a blocking host-to-device copy per layer."""
    return torch.tensor(scalings, dtype=torch.float32, device=device)


def forward_stacked(x2d, weights: LoRAWeights, spec: StackedSpec, seeds):
    """Several adapters summed (`contract.StackedSpec`): x2d (M, K) any strides, weights.lora_A
    (R, K) / lora_B (N, R) concatenated along the rank, seeds int64 (T,) or None ->
    (y (M, N), xa (M, R)) in x's dtype (stacked.py)."""
    from lora_kernels.backends.triton.stacked import stacked_forward

    return stacked_forward(x2d, _kernel_weight(weights, x2d.device), weights.bias, weights.lora_A, weights.lora_B,
                           spec, seeds)


def backward_stacked(dy, x2d, weights: LoRAWeights, xa, spec: StackedSpec, seeds, compute_dx, *,
                     deterministic=None) -> LoRAGrads:
    """dy (M, N) contiguous, xa (M, R) from `forward_stacked` -> LoRAGrads(dx (M, K) or None,
    dA (R, K), dB (N, R)); `deterministic` as in `backward`."""
    from lora_kernels.backends.triton.stacked import stacked_backward

    return LoRAGrads(*stacked_backward(dy, x2d, _kernel_weight(weights, x2d.device), weights.lora_A, weights.lora_B,
                                       xa, spec, seeds, compute_dx, deterministic=deterministic))
