# SPDX-License-Identifier: Apache-2.0
"""The dropout rule (docs/design.md §4): one counter-based generator that every backend follows bit for
bit, and its plain-PyTorch mirror. Imported by the op (seed, threshold), the kernels' Python
sides and the oracle.

Flatten x to M rows of K. Element (m, k) has flat index ``i = m*K + k``; it belongs to group
``g = i // 8`` and lane ``j = i % 8``. Each group is one Philox4x32-10 call:

* counter ``(c0, c1, c2, c3) = (g mod 2**32, g >> 32, 0, 0)``
* key ``(k0, k1) = (seed mod 2**32, (seed >> 32) mod 2**32)``; ``seed`` is a non-negative int64
* rounds, 10 times: ``c0, c1, c2, c3 = hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)``
  with ``A = 0xD2511F53, B = 0xCD9E8D57``, then ``k0 += 0x9E3779B9, k1 += 0xBB67AE85`` (mod 2**32)
  — this is Random123's philox4x32 and exactly ``triton.language.randint4x(seed, g)``.
* the output words ``(r0, r1, r2, r3)`` give eight 16-bit lanes: lane ``j`` is
  ``(r[j // 2] >> (16 * (j % 2))) & 0xFFFF``.
* keep the element iff ``lane >= t`` with ``t = floor(p * 65536 + 0.5)``; kept elements are
  multiplied by ``1 / (1 - p)`` (inverted dropout, as ``torch.nn.Dropout``), dropped ones by 0 —
  multiplied, not replaced, so a NaN/Inf there propagates (x and g·A in backward), as torch's.

Resolution: P(keep) is 1 - t/65536, not 1 - p, while kept elements are scaled by exactly
1/(1 - p), so the expected multiplier is E[D] = (1 - t/65536) / (1 - p). Both round p to the
nearest multiple of 2^-16: E[D] is within 2^-17/(1 - p) of 1 — about 1e-5 at p = 0.1 and 8e-5 at
p = 0.9 — but drifts as p nears 1: 1.068 at p = 0.9999, 1.53 at p = 0.99999. For
p >= 1 - 2^-17 (t = 65536, ``DROP_ALL_THRESHOLD``) every element would be dropped: `lora_linear`
serves that, and p = 1, as "everything dropped" (LoRA term and A/B gradients zero, as torch's
``dropout(p=1)``) without calling a kernel's dropout; the kernels reject such p. Below
p = 2^-17 (t = 0) nothing is dropped but kept elements are still scaled by 1/(1 - p).

p = 0 or eval mode skips the generator entirely. The seed is an int64 tensor of shape (1,) drawn
from the generator of x's device (see :func:`draw_seed`), so ``torch.manual_seed`` reproduces runs.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
LANES_PER_CALL = 8
_U32 = 0xFFFFFFFF


# A threshold of 2^16 drops every element (lanes are 16-bit): lora_linear serves it as p = 1.
DROP_ALL_THRESHOLD = 65536


def dropout_threshold(p: float) -> int:
    """16-bit threshold t: an element is kept iff its lane >= t (so P(keep) = 1 - t/65536)."""
    return int(math.floor(p * 65536.0 + 0.5))


def draw_seed(device: torch.device | str, count: int = 1) -> torch.Tensor:
    """Fresh dropout seeds: an int64 tensor of shape (count,) on `device` (one per adapter when
    several adapters are summed), from that device's default generator (no host sync on GPUs)."""
    return torch.randint(0, 2**62, (count,), dtype=torch.int64, device=device)


def philox4x32(counter: torch.Tensor, seed: int) -> Tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters ``(counter lo, counter hi, 0, 0)`` under ``seed``.

    counter: int64 tensor of non-negative group indices (any shape). Returns four int64 tensors
    holding the uint32 output words r0..r3. Products of two uint32 wrap in int64 but their
    low 64 bits are exact, which is all hi/lo need.
    """
    c0 = counter & _U32
    c1 = (counter >> 32) & _U32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(PHILOX_ROUNDS):
        prod_b = c2 * PHILOX_ROUND_B
        prod_a = c0 * PHILOX_ROUND_A
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _U32) ^ c1 ^ k0,
            prod_b & _U32,
            ((prod_a >> 32) & _U32) ^ c3 ^ k1,
            prod_a & _U32,
        )
        k0 = (k0 + PHILOX_KEY_A) & _U32
        k1 = (k1 + PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device="cpu") -> torch.Tensor:
    """Boolean keep-mask (rows, cols) of the dropout rule above: the Python mirror every backend
    is tested against."""
    n = rows * cols
    if n == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=device)
    groups = torch.arange((n + LANES_PER_CALL - 1) // LANES_PER_CALL, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(groups, int(seed)), dim=1)  # (G, 4)
    lanes = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=2).reshape(-1)  # (G*8,)
    return (lanes[:n] >= dropout_threshold(p)).reshape(rows, cols)


def dropout_multiplier(seed: int, rows: int, cols: int, p: float, dtype, device) -> torch.Tensor:
    """D = keep-mask / (1 - p) as a (rows, cols) tensor of `dtype`."""
    keep = dropout_keep_mask(seed, rows, cols, p, device)
    return keep.to(dtype) * (1.0 / (1.0 - p))


