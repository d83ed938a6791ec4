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
def _dequant_4bit(packed_ptr, absmax_ptr, code_ptr, flat0, local, mask, QBLOCK: tl.constexpr,
                  dtype: tl.constexpr):
    """The W₀ elements at flat indices flat0 + local, dequantized to `dtype` (0 where ~mask).

    flat0: int64 scalar, the tile's first flat index; local: int32 tile (>= 0) of offsets from it;
    QBLOCK: the blocksize (a power of two, so // is a shift). Loads: the byte of each element,
    its absmax, and its code entry (a 64-byte table, L1-resident)."""
    odd = (flat0 & 1).to(tl.int32)
    rel = local + odd  # offsets from the even index flat0 - odd: the byte is rel >> 1
    byte = tl.load(packed_ptr + (flat0 >> 1) + (rel >> 1), mask=mask, other=0)
    nibble = tl.where((rel & 1) == 0, byte >> 4, byte & 0xF).to(tl.int32)
    value = tl.load(code_ptr + nibble)  # masked elements read code[0], scaled by 0 below
    rem = (flat0 % QBLOCK).to(tl.int32)
    scale = tl.load(absmax_ptr + flat0 // QBLOCK + (local + rem) // QBLOCK, mask=mask, other=0.0)
    return (value * scale).to(dtype)


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
