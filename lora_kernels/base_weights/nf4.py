# SPDX-License-Identifier: Apache-2.0
"""The bitsandbytes 4-bit base weight (NF4 and FP4, QLoRA's `Linear4bit`), in pure PyTorch.

Layout (the contract the Triton kernels read; it is bitsandbytes' own layout):

- `packed`  uint8, contiguous, 1-D (N*K // 2,): `Params4bit.data` ((N*K/2, 1) uint8) viewed flat.
  Element W₀[n, k] has the row-major flat index i = n*K + k; its 4-bit code sits in byte i // 2,
  in the HIGH nibble (``byte >> 4``) when i is even and in the LOW nibble (``byte & 0xF``) when
  i is odd (as bitsandbytes' quantize_4bit packs it and its dequantize_4bit reads it).
- `absmax`  float32, contiguous, 1-D (ceil(N*K / blocksize),): the scale of each run of
  `blocksize` consecutive flat elements: W₀.flat[i] = code[q(i)] * absmax[i // blocksize], the
  product taken in float32 and rounded once to `dtype` (bitsandbytes' rounding). Blocks follow
  the flat index, so when K % blocksize != 0 a block spans two rows. Double quantization
  (`compress_statistics=True`: uint8 absmax + nested state + offset) is undone once in `from_bnb`.
- `code`    float32 (16,): the value of each 4-bit code (NF4 quantiles, or the FP4 table
  normalised to [-1, 1], exactly bitsandbytes' `quant_state.code`).
- `blocksize` int (bitsandbytes accepts 32, 64, ..., 4096); `shape` (N, K); `dtype` the compute
  dtype (x's dtype; y and dX come out in it): float32, float16 or bfloat16.

`flatten()` gives ``[packed, absmax, code]`` and ``[N, K, blocksize, dtype_index]`` where
dtype_index indexes `COMPUTE_DTYPES` = (float32, float16, bfloat16).

Products work tile by tile and never hold the dequantized N x K weight: row tiles for
``y += x·W₀ᵀ``, `row_norms_sq` and `dense_rows`; for ``dX += dY·W₀`` column slabs (each dX
column written once, one rounding in 16-bit) when K % blocksize == 0, else row tiles (16-bit then
accumulates in a float32 (M, K) buffer so dX is still rounded once). A tile holds at most
`TILE_BYTES` (4 MiB) of `dtype` and at most N/16 rows (K/16 columns for a slab), but at least
one row (one block-wide slab); it is filled `CHUNK` (2^15) elements at a time through 192 KiB of
scratch. Peak extra memory of one product is one tile + the scratch: 4.2 MiB for a 4096 x 4096
weight in fp32 (1/15 of its 64 MiB dequantized) and 2.2 MiB in 16-bit (1/15 of 32 MiB).

Note (bitsandbytes 0.50 on CPUs with AVX-512, blocksize < 2048): its C dequantization indexes
absmax per row as ``n*(K // blocksize) + k // blocksize``, which disagrees with its own quantizer
when K % blocksize != 0; this module follows the quantizer (flat blocks, as bitsandbytes' CUDA
and pure-PyTorch paths do).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from lora_kernels import _extension
from lora_kernels.base_weights.base import BaseWeight, register_format

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the blocksizes bitsandbytes' quantize_4bit / dequantize_4bit accept (0.48 - 0.50)
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Bytes of one tile of W₀ in the compute dtype (also at most N/16 rows): large tiles keep the
# GEMMs efficient; see the module docstring for the memory bound.
TILE_BYTES = 4 << 20
# Elements decoded per step into float32 scratch (an int32 index and an int64 value buffer,
# 192 KiB) before they are scaled into the tile. At or below torch's intra-op grain size (32768)
# each decode op runs on the calling thread: a parallel region per small op cost more than it
# saved with 2 threads, and 5-20x more on a loaded machine (measured), while the GEMMs stay parallel.
CHUNK = 1 << 15
# attribute of a Params4bit that holds its cached 4-bit base weight (see `from_bnb_cached`)
_CACHE_ATTR = "_lora_kernels_base_weight"


def _scale_into(dst: Tensor, src: Tensor, e0: int, absmax: Tensor, blocksize: int) -> None:
    """dst[i] = src[i] * absmax[(e0 + i) // blocksize] for flat float32 `src` (L,); `dst` (L,) in
    any float dtype (may be `src`): the float32 product rounded once, as bitsandbytes does."""
    length = src.numel()
    head = min(-e0 % blocksize, length)  # elements before the first block boundary
    if head:
        torch.mul(src[:head], absmax[e0 // blocksize], out=dst[:head])
    nfull = (length - head) // blocksize
    b = (e0 + head) // blocksize
    end = head + nfull * blocksize
    if nfull:
        torch.mul(
            src[head:end].view(nfull, blocksize),
            absmax[b : b + nfull, None],
            out=dst[head:end].view(nfull, blocksize),
        )
    if end < length:
        torch.mul(src[end:], absmax[b + nfull], out=dst[end:])


@register_format
class NF4Weight(BaseWeight):
    """W₀ (N, K) stored in bitsandbytes' NF4 layout (see the module docstring for each field)."""

    format = "nf4"
    quant_type = "nf4"

    def __init__(self, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape, dtype: torch.dtype):
        # Only stores: torch.compile rebuilds this from fake tensors in `unflatten`.
        self.packed = packed
        self.absmax = absmax
        self.code = code
        self.blocksize = blocksize
        self._shape = (shape[0], shape[1])  # no int(): under torch.compile these may be SymInts
        self._dtype = dtype
        self._pair_table: Optional[Tensor] = None
        self._row_norms: Optional[Tensor] = None

    # --- BaseWeight -----------------------------------------------------------------------------

    @property
    def shape(self) -> Tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def flatten(self) -> Tuple[List[Tensor], List[int]]:
        n, k = self._shape
        return [self.packed, self.absmax, self.code], [n, k, self.blocksize, COMPUTE_DTYPES.index(self._dtype)]

    @classmethod
    def unflatten(cls, tensors: List[Tensor], meta: List[int]) -> NF4Weight:
        n, k, blocksize, dtype_index = meta
        packed, absmax, code = tensors
        return cls(packed, absmax, code, blocksize, (n, k), COMPUTE_DTYPES[dtype_index])

    def matmul_into(self, y: Tensor, x2d: Tensor) -> None:
        """y (M, N) += x2d (M, K) · W₀ᵀ, one row tile of W₀ at a time."""
        for n0, n1, tile in self._row_tiles():
            y[:, n0:n1].addmm_(x2d, tile.t())

    def grad_input_into(self, dx: Tensor, dy: Tensor) -> None:
        """dx (M, K) += dy (M, N) · W₀: column slabs of W₀ when K % blocksize == 0, else row tiles."""
        n, k = self._shape
        if k % self.blocksize == 0:
            for k0, k1, slab in self._col_slabs():
                dx[:, k0:k1].addmm_(dy, slab)
            return
        # Row tiles add a partial product per tile; in 16-bit keep the sum in float32 so dx is
        # rounded once, as a dense product would.
        acc = dx if dx.dtype == torch.float32 else torch.zeros(dx.shape, dtype=torch.float32, device=dx.device)
        for n0, n1, tile in self._row_tiles():
            if acc is dx:
                dx.addmm_(dy[:, n0:n1], tile)
            else:
                acc.addmm_(dy[:, n0:n1].float(), tile.float())
        if acc is not dx:
            dx.add_(acc)

    def dense(self) -> Tensor:
        """W₀ (N, K) in `dtype`, bit-identical to bitsandbytes' dequantize_4bit (materializes N x K)."""
        return self.dense_rows(0, self._shape[0])

    def dense_rows(self, n0: int, n1: int) -> Tensor:
        """Rows n0:n1 of W₀ (n1 - n0, K) in `dtype`, bit-identical to bitsandbytes' dequantization."""
        n, k = self._shape
        if not 0 <= n0 <= n1 <= n:
            raise ValueError(f"dense_rows: need 0 <= n0 <= n1 <= N={n}, got n0={n0}, n1={n1}")
        out = torch.empty(n1 - n0, k, dtype=self._dtype, device=self.device)
        if not self._decode_compiled(n0 * k, k, out):
            self._decode_flat(n0 * k, n1 * k, out.view(-1), self._scratch())
        return out

    def row_norms_sq(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """‖W₀ₙ‖² per row (N,) of the `dtype` values, summed in float32 (a 4-bit base computes in
        at most float32), returned in `dtype`; computed once (W₀ is frozen) and cached."""
        if self._row_norms is None:
            norms = torch.empty(self._shape[0], dtype=torch.float32, device=self.device)
            for n0, n1, tile in self._row_tiles():
                norms[n0:n1] = tile.float().pow(2).sum(1)
            self._row_norms = norms
        return self._row_norms.to(dtype)

    # --- bitsandbytes -------------------------------------------------------------------------

    @classmethod
    def from_bnb(cls, weight, compute_dtype: Optional[torch.dtype] = None) -> NF4Weight:
        """A `bitsandbytes.nn.Params4bit` (or a `Linear4bit` module, whose `.weight` is taken) ->
        NF4Weight or FP4Weight, chosen by its quant_type whichever class this is called on.

        compute_dtype: float32, float16 or bfloat16; default the layer's `compute_dtype` when set,
        else the dtype the weight was quantized from (quant_state.dtype). Copies nothing but the
        de-nested absmax; raises TypeError/ValueError naming the offending field."""
        module = None
        if isinstance(weight, torch.nn.Module):
            module, weight = weight, getattr(weight, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a bitsandbytes Params4bit or Linear4bit, got {type(weight).__name__}")
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError(
                "weight.quant_state is missing: expected a quantized bitsandbytes Params4bit "
                "(move the Linear4bit to a device, e.g. .to('cpu'), to quantize it)"
            )
        quant_type = getattr(state, "quant_type", None)
        if quant_type not in _CLASSES:
            raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "quant_state.packing_format_for_cpu is True: bitsandbytes repacked this weight for its "
                "CPU inference kernel (an eval, no-grad forward on an AVX512-BF16 CPU); expected the "
                "standard 4-bit layout (reload or re-quantize the layer)"
            )
        blocksize = state.blocksize
        if blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"quant_state.blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
        if weight.dtype != torch.uint8:
            raise ValueError(f"quant_storage (the packed weight's dtype) must be torch.uint8, got {weight.dtype}")
        shape = tuple(state.shape) if state.shape is not None else ()
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape must be 2-D (N, K), got {shape}")
        n, k = int(shape[0]), int(shape[1])
        if (n * k) % 2:
            raise ValueError(f"quant_state.shape {shape}: N*K must be even (two 4-bit values per byte), got {n * k}")
        packed = weight.data.reshape(-1)
        if packed.numel() != n * k // 2:
            raise ValueError(
                f"packed weight has {packed.numel()} bytes, expected N*K/2 = {n * k // 2} for quant_state.shape {shape}"
            )
        code = state.code
        if not isinstance(code, Tensor) or code.shape != (16,) or not code.is_floating_point():
            raise ValueError(f"quant_state.code must be a float tensor of 16 values, got {code!r}")
        if compute_dtype is None:
            layer = module if module is not None else getattr(weight, "module", None)
            compute_dtype = getattr(layer, "compute_dtype", None) or state.dtype
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.float32, float16 or bfloat16, got {compute_dtype}")
        absmax = cls._absmax_of(state)
        nblocks = -(-n * k // blocksize)
        if absmax.dim() != 1 or absmax.numel() != nblocks:
            raise ValueError(
                f"quant_state.absmax has {absmax.numel()} values, expected ceil(N*K / blocksize) = {nblocks} "
                f"for shape {shape} and blocksize {blocksize}"
            )
        return _CLASSES[quant_type](
            packed.contiguous(), absmax, code.float().contiguous(), blocksize, (n, k), compute_dtype
        )

    @classmethod
    def from_bnb_cached(cls, weight, compute_dtype: Optional[torch.dtype] = None) -> NF4Weight:
        """`from_bnb`, reusing the result stored on the Params4bit while it still describes it.

        Cache rule: the result is kept on the Params4bit (attribute `_lora_kernels_base_weight`)
        with the key (packed data_ptr, the Params4bit's `_version`, id of its quant_state, absmax
        data_ptr and `_version`, compute_dtype); any change of these (re-quantization, `.to()`,
        an in-place write to the parameter, another compute dtype) rebuilds it. An in-place write
        through `weight.data` bumps no version the cache sees: call `from_bnb` after one."""
        param = weight.weight if isinstance(weight, torch.nn.Module) else weight
        state = getattr(param, "quant_state", None)
        absmax = getattr(state, "absmax", None)
        key = (
            param.data_ptr(),
            param._version,
            id(state),
            absmax.data_ptr() if isinstance(absmax, Tensor) else None,
            absmax._version if isinstance(absmax, Tensor) else None,
            compute_dtype,
        )
        cached = getattr(param, _CACHE_ATTR, None)
        if cached is not None and cached[0] == key:
            return cached[1]
        built = cls.from_bnb(weight, compute_dtype)
        setattr(param, _CACHE_ATTR, (key, built))
        return built

    @staticmethod
    def _absmax_of(state) -> Tensor:
        """The per-block float32 scales of a QuantState, double quantization undone as bitsandbytes does."""
        absmax = state.absmax
        if getattr(state, "nested", False):
            from bitsandbytes.functional import dequantize_blockwise

            absmax = dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        return absmax.float().reshape(-1).contiguous()

    # --- tiles ----------------------------------------------------------------------------------

    def max_temporary_bytes(self) -> int:
        """One row tile or one column slab of `dtype` (whichever is larger) plus the pure-PyTorch
        decoder's scratch (12 bytes per pair of a chunk; unused where the compiled decoder runs)."""
        n, k = self._shape
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        tile = self._tile_rows() * k
        slab = n * self._slab_blocks() * self.blocksize if k % self.blocksize == 0 else 0
        return max(tile, slab) * itemsize + 12 * (max(CHUNK, self.blocksize) // 2 + 1)

    def _tile_rows(self) -> int:
        """Rows per row tile: at most TILE_BYTES of `dtype` and at most N/16 rows (but one row)."""
        n, k = self._shape
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return max(1, min(TILE_BYTES // (k * itemsize), n // 16))

    def _slab_blocks(self) -> int:
        """Blocks (of `blocksize` columns) per column slab: the same bound as `_tile_rows`."""
        n, k = self._shape
        blocks_per_row = k // self.blocksize
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        width = min(TILE_BYTES // (n * self.blocksize * itemsize), blocks_per_row // 16, CHUNK // self.blocksize)
        return max(1, width)

    def _scratch(self) -> Tuple[Tensor, Tensor]:
        """Index (int32, one per byte) and value (int64 = a float32 pair) buffers for one chunk
        (a slab's chunk is at least one block wide)."""
        pairs = max(CHUNK, self.blocksize) // 2 + 1
        return (
            torch.empty(pairs, dtype=torch.int32, device=self.device),
            torch.empty(pairs, dtype=torch.int64, device=self.device),
        )

    def _pairs(self) -> Tensor:
        """(256,) int64: for each byte, its two float32 code values (high nibble first) in one
        8-byte word, so one gather decodes two elements."""
        if self._pair_table is None:
            byte = torch.arange(256, device=self.device)
            table = torch.stack([self.code[byte >> 4], self.code[byte & 15]], 1).float().contiguous()
            self._pair_table = table.view(torch.int64).reshape(256)
        return self._pair_table

    def _gather(self, packed: Tensor, scratch: Tuple[Tensor, Tensor]) -> Tensor:
        """The unscaled float32 code values of the bytes `packed` (any shape, B bytes): (2B,)."""
        idx, vals = scratch
        nbytes = packed.numel()
        idx[:nbytes].view(packed.shape).copy_(packed)
        torch.index_select(self._pairs(), 0, idx[:nbytes], out=vals[:nbytes])
        return vals[:nbytes].view(torch.float32)

    def _decode_compiled(self, first: int, row_stride: int, out: Tensor) -> bool:
        """out (R, C) = W₀.flat[first + r*row_stride + c] by lora_kernels._C's CPU decoder (rows
        in parallel, one pass), if it serves these tensors; False (nothing written) otherwise."""
        if self.device.type != "cpu" or not _extension.has_op("decode_4bit", "cpu"):
            return False
        torch.ops.lora_kernels.decode_4bit(self.packed, self.absmax, self.code, first, row_stride, self.blocksize, out)
        return True

    def _decode_flat(self, e0: int, e1: int, out: Tensor, scratch: Tuple[Tensor, Tensor]) -> None:
        """out (e1 - e0,) in `dtype` = W₀.flat[e0:e1], CHUNK elements at a time."""
        for c0 in range(e0, e1, CHUNK):
            c1 = min(c0 + CHUNK, e1)
            b0 = c0 // 2
            start = c0 - 2 * b0  # 1 when the chunk starts on a low nibble
            src = self._gather(self.packed[b0 : (c1 + 1) // 2], scratch)[start : start + c1 - c0]
            _scale_into(out[c0 - e0 : c1 - e0], src, c0, self.absmax, self.blocksize)

    def _row_tiles(self) -> Iterator[Tuple[int, int, Tensor]]:
        """(n0, n1, rows n0:n1 of W₀ in `dtype`), the tile buffer reused from one step to the next."""
        n, k = self._shape
        rows = self._tile_rows()
        tile, scratch = torch.empty(rows * k, dtype=self._dtype, device=self.device), self._scratch()
        for n0 in range(0, n, rows):
            n1 = min(n0 + rows, n)
            out = tile[: (n1 - n0) * k]
            if not self._decode_compiled(n0 * k, k, out.view(n1 - n0, k)):
                self._decode_flat(n0 * k, n1 * k, out, scratch)
            yield n0, n1, out.view(n1 - n0, k)

    def _col_slabs(self) -> Iterator[Tuple[int, int, Tensor]]:
        """(k0, k1, columns k0:k1 of W₀ (N, k1 - k0) in `dtype`), for K % blocksize == 0: a row's
        blocks then start at its first element, so a slab of whole blocks is a 2-D view of
        packed (N, K/2) and absmax (N, K/blocksize)."""
        n, k = self._shape
        bs = self.blocksize
        blocks_per_row = k // bs
        width = self._slab_blocks()
        tile, scratch = torch.empty(n * width * bs, dtype=self._dtype, device=self.device), self._scratch()
        packed2d = self.packed.view(n, k // 2)
        absmax2d = self.absmax.view(n, blocks_per_row)
        for j0 in range(0, blocks_per_row, width):
            j1 = min(j0 + width, blocks_per_row)
            k0, k1 = j0 * bs, j1 * bs
            slab = tile[: n * (k1 - k0)].view(n, j1 - j0, bs)
            if self._decode_compiled(k0, k, slab.view(n, k1 - k0)):
                yield k0, k1, slab.view(n, k1 - k0)
                continue
            rows = max(1, CHUNK // (k1 - k0))
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                src = self._gather(packed2d[r0:r1, k0 // 2 : k1 // 2], scratch).view(r1 - r0, j1 - j0, bs)
                torch.mul(src, absmax2d[r0:r1, j0:j1, None], out=slab[r0:r1])
            yield k0, k1, slab.view(n, k1 - k0)


@register_format
class FP4Weight(NF4Weight):
    """W₀ in bitsandbytes' FP4 layout: the same storage as NF4Weight, with the FP4 code table."""

    format = "fp4"
    quant_type = "fp4"


_CLASSES = {"nf4": NF4Weight, "fp4": FP4Weight}
