# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch LoRA maths and the Python mirror of the dropout generator: the test oracle.

Everything here runs on any device and dtype, is written for clarity rather than speed, and
defines the behaviour every fused backend (cpu, triton, cuda) must reproduce.

Dropout rule (docs/design.md §4) — the one contract all backends follow bit for bit
---------------------------------------------------------------------------
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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

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


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed: int64 tensor of shape (1,) on `device`, from that device's default
    generator (no host sync on GPUs)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


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


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    return int(seed.reshape(-1)[0].item())


def lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The oracle, differentiable by plain autograd: x (..., K) -> y (..., N).

    ``y = x·weightᵀ + bias + scaling·(D ⊙ x)·lora_Aᵀ·lora_Bᵀ`` with D from the dropout rule
    when ``dropout_p > 0`` (then `seed` is required).
    """
    x_lora = x
    if dropout_p > 0.0:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        d = dropout_multiplier(_seed_int(seed), m, k, dropout_p, x.dtype, x.device)
        x_lora = x * d.reshape(x.shape)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


# --- the `reference` backend: the fused op's forward/backward written as plain PyTorch ---------


def forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x2d (M, K) -> (y (M, N), xa (M, r)); xa = dropout(x)·Aᵀ is what backward needs."""
    x_lora = x2d
    if seed is not None:
        m, k = x2d.shape
        x_lora = x2d * dropout_multiplier(_seed_int(seed), m, k, dropout_p, x2d.dtype, x2d.device)
    xa = x_lora @ lora_A.t()
    y = F.linear(x2d, weight, bias) + scaling * (xa @ lora_B.t())
    return y, xa


def backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx):
    """docs/design.md §1 gradients: (dx (M, K) or None, dA (r, K), dB (N, r)); the mask is regenerated."""
    # g and the rank-r products in fp32 for fp16/bf16, as the kernels do: a g rounded to 16 bits
    # loses dA to cancellation when dropout scales x up.
    acc = torch.promote_types(dy.dtype, torch.float32)
    g = dy.to(acc) @ lora_B.to(acc)  # (M, r)
    d = None
    if seed is not None:
        m, k = x2d.shape
        d = dropout_multiplier(_seed_int(seed), m, k, dropout_p, acc, x2d.device)
    x_lora = x2d.to(acc) if d is None else x2d.to(acc) * d
    grad_a = (scaling * (g.t() @ x_lora)).to(x2d.dtype)
    grad_b = (scaling * (dy.to(acc).t() @ xa.to(acc))).to(x2d.dtype)
    grad_x = None
    if compute_dx:
        lora_term = scaling * (g @ lora_A.to(acc))
        grad_x = (dy @ weight).to(acc) + (lora_term if d is None else lora_term * d)
        grad_x = grad_x.to(x2d.dtype)
    return grad_x, grad_a, grad_b
