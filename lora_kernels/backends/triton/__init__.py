# SPDX-License-Identifier: Apache-2.0
"""The `triton` backend: fused LoRA forward/backward as Triton kernels (GPU; CPU tensors under
TRITON_INTERPRET=1). Implements the backend interface of `lora_kernels.backends`.

Kernels by direction live in `fwd.py` / `bwd.py`, the dropout generator in `dropout.py`,
autotune configs, shared-memory models and the schedule/determinism switches in `configs.py`,
the static report (compile for sm80/86/90 without a GPU) in `compile_check.py`:
  LORA_KERNELS_TRITON_SCHEDULE=auto|F1|F2   forward schedule (default auto: F1 only without
                                            dropout, small M and r <= 64)
  LORA_KERNELS_TRITON_DETERMINISTIC=1|0     backward with pinned configs and ordered partial sums
                                            (1, the same bits in every process) or autotuned dX
                                            and atomics (0)
"""

from __future__ import annotations

from lora_kernels.backends.triton.bwd import lora_backward
from lora_kernels.backends.triton.fwd import lora_forward

__all__ = ["forward", "backward"]


def forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *, schedule=None):
    """x2d (M, K) any strides; weight (N, K); bias (N,) or None; lora_A (r, K); lora_B (N, r) ->
    (y (M, N), xa (M, r)) in x's dtype. Dropout on iff `seed` (int64 (1,) on x's device) is given.
    schedule: "auto" | "F1" | "F2" | None (env LORA_KERNELS_TRITON_SCHEDULE)."""
    return lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, schedule=schedule)


def backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, *, deterministic=None):
    """dy (M, N) contiguous -> (dx (M, K) or None, dA (r, K), dB (N, r)) per docs/design.md §1.
    deterministic: True | False | None (env LORA_KERNELS_TRITON_DETERMINISTIC, default True)."""
    return lora_backward(
        dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, deterministic=deterministic
    )
