# SPDX-License-Identifier: Apache-2.0
"""4-bit base weights (bitsandbytes NF4 / FP4) read by the GEMM kernels themselves: the W₀ tile of
each main-loop step is dequantized in registers from the packed bytes, never a dequantized N x K
tensor (nor a tile of one in global memory).

Storage (bitsandbytes order, the attributes of `lora_kernels.base_weights` NF4Weight/FP4Weight):
element i = n*K + k of the row-major (N, K) weight is the high nibble of byte i // 2 when i is
even, the low nibble when odd; its value is ``code[nibble] * absmax[i // blocksize]`` (absmax
float32, double quantization already resolved). Blocks run over the flat index, so a block may
span two rows (K % blocksize != 0) and an element pair two rows (odd K): the kernels index by
flat position and serve both.

Offsets: a tile's first flat index is an int64 scalar (N*K may exceed 2**31); the per-element
offsets inside a tile are int32 (< MAX_TILE_SPAN * K), so the per-element work stays 32-bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The kernels' W_FORMAT switch (constexpr globals, as jit functions require).
W_DENSE = tl.constexpr(0)  # W₀ as a strided (N, K) tensor of the compute dtype
W_4BIT = tl.constexpr(1)  # packed 4-bit codes + float32 absmax + a 16-entry float32 code table (NF4, FP4)
FORMATS_4BIT = ("nf4", "fp4")
# Largest tile edge along N of any config (BLOCK_N forward, BLOCK_N reduction step of dX) plus
# the largest blocksize: bounds the int32 in-tile offsets (tile rows x K + columns + block offset).
MAX_TILE_SPAN = 256 + 1
MAX_BLOCKSIZE = 4096
MAX_K = (2**31 - 1 - MAX_BLOCKSIZE) // MAX_TILE_SPAN


@triton.jit
def _dequant_4bit(packed_ptr, absmax_ptr, code_ptr, flat0, row_off, row_mask, col, ncols,
                  COLS: tl.constexpr, QBLOCK: tl.constexpr, dtype: tl.constexpr):
    """A W₀ tile dequantized to `dtype`, 0 outside (row_mask, col < ncols).

    The tile holds COLS consecutive elements of each of some rows of W₀ (a k range of rows n):
    element (row, col) is flat index flat0 + row_off + col. flat0: int64 scalar, even (tiles
    start at multiples of even BLOCK sizes, so byte flat0 // 2 opens with a high nibble); row_off
    (row offsets, e.g. n*K) and col (0..COLS-1) int32, >= 0, shaped to broadcast to the tile's
    orientation ((1, BN) and (BK, 1) for Wᵀ, (BN, 1) and (1, BK) for W); row_mask like row_off;
    ncols: valid columns (<= COLS). QBLOCK: the blocksize, a power of two (// is a shift).

    Per element: one byte load and one lookup in the 16-entry code table (64 bytes, L1-resident).
    The scales are loaded per row, not per element: a row's COLS elements span at most
    NB = COLS/QBLOCK + 2 consecutive blocks (blocks run over the flat index, so they need not
    start at a row), loaded as NB row vectors and selected per element."""
    ncols = tl.minimum(ncols, COLS)  # callers pass what is left of the row; the tile holds COLS
    mask = row_mask & (col < ncols)
    local = row_off + col  # odd K: a row may start on a low nibble, so the parity is per element
    byte = tl.load(packed_ptr + (flat0 >> 1) + (local >> 1), mask=mask, other=0)
    nibble = tl.where((local & 1) == 0, byte >> 4, byte & 0xF).to(tl.int32)
    value = tl.load(code_ptr + nibble)  # masked elements read code[0], scaled by 0 below
    row_start = flat0 + row_off  # int64, the flat index of each row's first element here
    first = row_start // QBLOCK
    lead = (row_start % QBLOCK).to(tl.int32)  # elements of block `first` before the row starts
    which = (lead + col) // QBLOCK  # the element's block, relative to `first`
    NB: tl.constexpr = COLS // QBLOCK + 2
    scale = tl.load(absmax_ptr + first, mask=row_mask, other=0.0)
    for t in tl.static_range(1, NB):
        # block first + t holds an element of this row iff the row's last one reaches it
        used = row_mask & (lead + ncols - 1 >= t * QBLOCK)
        scale = tl.where(which == t, tl.load(absmax_ptr + first + t, mask=used, other=0.0), scale)
    return tl.where(mask, value * scale, 0.0).to(dtype)


class PackedWeight4bit(NamedTuple):
    """A 4-bit W₀ as the kernels take it: packed uint8 (ceil(N*K/2),), absmax float32
    (ceil(N*K/blocksize),), code float32 (16,), blocksize (power of two), shape (N, K)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple


def packed_4bit(base, device: torch.device) -> PackedWeight4bit:
    """An nf4/fp4 `BaseWeight` -> `PackedWeight4bit`, after checking what the kernels rely on;
    ValueError/TypeError naming the field otherwise."""
    n, k = (int(d) for d in base.shape)
    numel = n * k
    fmt = base.format
    packed, absmax, code, blocksize = base.packed, base.absmax, base.code, int(base.blocksize)
    if blocksize <= 0 or blocksize & (blocksize - 1) or blocksize > MAX_BLOCKSIZE:
        raise ValueError(f"triton backend: {fmt} blocksize must be a power of two <= {MAX_BLOCKSIZE}, got {blocksize}")
    if k > MAX_K:
        raise ValueError(f"triton backend: {fmt} base weights need K <= {MAX_K} (int32 in-tile offsets), got K={k}")
    checks = (
        ("packed", packed, torch.uint8, (numel + 1) // 2),
        ("absmax", absmax, torch.float32, -(-numel // blocksize)),
        ("code", code, torch.float32, 16),
    )
    for name, t, dtype, length in checks:
        if t.dtype != dtype:
            raise TypeError(f"triton backend: {fmt} {name} must be {dtype}, got {t.dtype}")
        if t.numel() < length:
            raise ValueError(f"triton backend: {fmt} {name} must hold {length} elements for shape {(n, k)}, "
                             f"got {t.numel()}")
        if t.device != device:
            raise ValueError(f"triton backend: {fmt} {name} is on {t.device}, x on {device}")
    # The kernels index the flat storage: make each contiguous (a no-op for bitsandbytes' tensors).
    return PackedWeight4bit(packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous(),
                            code.reshape(-1).contiguous(), blocksize, (n, k))


def weight_args(weight) -> tuple:
    """The kernels' W arguments for a dense (N, K) tensor or a `PackedWeight4bit`:
    ((w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr), dict(W_FORMAT=..., QBLOCK=...))."""
    if isinstance(weight, PackedWeight4bit):
        k = weight.shape[1]
        return ((weight.packed, k, 1, weight.absmax, weight.code),
                dict(W_FORMAT=W_4BIT.value, QBLOCK=weight.blocksize))
    return (weight, weight.stride(0), weight.stride(1), None, None), dict(W_FORMAT=W_DENSE.value, QBLOCK=1)
