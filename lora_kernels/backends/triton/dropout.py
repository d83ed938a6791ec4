# SPDX-License-Identifier: Apache-2.0
"""The dropout generator of docs/design.md §4 as a Triton helper: bit-identical to
`lora_kernels.dropout.dropout_keep_mask` (the Python mirror documents the rule).

One Philox4x32-10 call yields 128 bits = eight 16-bit lanes, one per element of a group of eight
consecutive flat indices ``i = m*K + k``; the helper calls Philox once per group, never once per
element, and spreads the lanes over the tile.

`_philox4x32` is ``tl.randint4x(seed, group)`` op for op (Random123 constants, key = seed lo/hi,
counter = group lo/hi, 0, 0); tests check it against both `tl.randint4x` and the Python mirror.
It is written out here rather than called from triton.language because the interpreter can only
run jit functions decorated while TRITON_INTERPRET=1 was set, and triton's own are decorated at
``import triton``, which a test session may have done before it set the variable.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.dropout import dropout_threshold


def dropout_params(dropout_p: float):
    """(threshold t, 1/(1-p)) for the kernels: keep iff lane >= t (t computed once, on the host)."""
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


PHILOX_ROUNDS = tl.constexpr(10)



@triton.jit
def _philox4x32(seed, group):
    """Philox4x32-10 of counter (group lo, group hi, 0, 0) under key (seed lo, seed hi).
    seed: int64 scalar; group: int64 tensor -> four uint32 tensors of group's shape."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = group.to(tl.uint32)  # low word (truncation)
    c1 = (group >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(PHILOX_ROUNDS):
        a0, a2 = c0, c2
        c0 = tl.math.umulhi(0xCD9E8D57, a2) ^ c1 ^ k0
        c2 = tl.math.umulhi(0xD2511F53, a0) ^ c3 ^ k1
        c1 = tl.mul(0xCD9E8D57, a2, sanitize_overflow=False)
        c3 = tl.mul(0xD2511F53, a0, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _halves(r):
    return (r & 0xFFFF).to(tl.int32), (r >> 16).to(tl.int32)


@triton.jit
def _group_lanes(r0, r1, r2, r3):
    """Words (BM, G) of G Philox calls -> lanes (BM, G*8) int32 in flat order: lane j of a group is
    ``(r[j // 2] >> (16 * (j % 2))) & 0xFFFF``.

    Built with tl.join, whose new dimension stays inside one thread, so the eight lanes of a
    group live in the thread that ran its Philox call. (Broadcasting the words against an
    arange(8) let Triton spread the 8 lanes over threads and each of them re-ran the call: ~5x.)
    join(a, b) appends a last dim [a, b]; nested three deep, the innermost join selects lane bit 2,
    the outermost bit 0, so the flattened index is the lane number."""
    BM: tl.constexpr = r0.shape[0]
    G: tl.constexpr = r0.shape[1]
    h0, h1 = _halves(r0)
    h2, h3 = _halves(r1)
    h4, h5 = _halves(r2)
    h6, h7 = _halves(r3)
    even = tl.join(tl.join(h0, h4), tl.join(h2, h6))
    odd = tl.join(tl.join(h1, h5), tl.join(h3, h7))
    return tl.reshape(tl.join(even, odd), (BM, G * 8))


@triton.jit
def _dropout_keep(seed, flat_start, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_K) bool of the tile whose row i starts at flat index flat_start[i].

    seed: int64 scalar (loaded from the seed pointer); flat_start: (BLOCK_M,) int64 = m*K + k0;
    threshold: int t. ALIGNED (constexpr) promises flat_start % 8 == 0 for every row (K % 8 == 0
    and k0 a multiple of 8): then the tile is BLOCK_K/8 whole groups per row. Otherwise each row is
    shifted by s = flat_start % 8 inside its groups; it spans BLOCK_K/8 groups plus one spill
    group, and the lanes are gathered at column s + c (still one Philox call per 8 elements).
    """
    tl.static_assert(BLOCK_K % 8 == 0, "tiles hold whole 8-lane groups")
    G: tl.constexpr = BLOCK_K // 8
    group0 = flat_start // 8  # (BM,) int64: groups past 2**32 keep their high word (counter c1)
    groups = group0[:, None] + tl.arange(0, G)[None, :].to(tl.int64)
    r0, r1, r2, r3 = _philox4x32(seed, groups)
    lanes = _group_lanes(r0, r1, r2, r3)  # (BM, BLOCK_K): flat indices 8*group0 + [0, BLOCK_K)
    if not ALIGNED:
        shift = (flat_start % 8).to(tl.int32)
        d = shift[:, None] + tl.arange(0, BLOCK_K)[None, :]  # column of each element in the lanes
        main = tl.gather(lanes, tl.minimum(d, BLOCK_K - 1), 1)
        s0, s1, s2, s3 = _philox4x32(seed, group0 + G)  # the spill group, (BM,)
        j = d - BLOCK_K  # lane inside the spill group where d >= BLOCK_K
        word = tl.where(j < 2, s0[:, None], tl.where(j < 4, s1[:, None], tl.where(j < 6, s2[:, None], s3[:, None])))
        spill = ((word >> ((j % 2) * 16).to(tl.uint32)) & 0xFFFF).to(tl.int32)
        lanes = tl.where(d < BLOCK_K, main, spill)
    return lanes >= threshold
