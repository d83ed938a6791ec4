# SPDX-License-Identifier: Apache-2.0
"""Base-weight formats: the dense weight's products, and the bitsandbytes 4-bit weight (NF4/FP4)
against bitsandbytes' own dequantization (bit-identical) and the dense products."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_kernels import _extension
from lora_kernels.base_weights import FORMATS, DenseWeight, FP4Weight, NF4Weight, as_base_weight, nf4
from tests.helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _products_match_dense(weight, dtype, m=5):
    """matmul_into / grad_input_into add x·W₀ᵀ / dY·W₀ to what y / dX held, as the dense
    products do (float64 oracle; a same-dtype dense product as the low-precision baseline).
    In 16-bit the error must also stay within twice the baseline's: a tiled product that rounds
    each tile's partial sum (instead of once) fails that."""
    n, k = weight.shape
    w = weight.dense().double()
    x, y0 = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
    dy, dx0 = torch.randn(m, n, dtype=dtype), torch.randn(m, k, dtype=dtype)
    y, dx = y0.clone(), dx0.clone()
    weight.matmul_into(y, x)
    weight.grad_input_into(dx, dy)
    dense = weight.dense()
    checks = [
        ("y", y, y0.double() + x.double() @ w.t(), y0 + x @ dense.t()),
        ("dx", dx, dx0.double() + dy.double() @ w, dx0 + dy @ dense),
    ]
    for name, actual, expected, baseline in checks:
        assert_close(actual, expected, dtype, name, baseline=baseline)
        if dtype != torch.float32:
            error = (actual.double() - expected).abs().max().item()
            baseline_error = (baseline.double() - expected).abs().max().item()
            assert error <= 2 * baseline_error, f"{name}: error {error} > 2 x the dense product's {baseline_error}"


# --- dense -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_weight_products(dtype):
    w0 = torch.randn(37, 21, dtype=dtype)
    weight = as_base_weight(w0)
    assert isinstance(weight, DenseWeight) and FORMATS["dense"] is DenseWeight
    assert weight.shape == (37, 21) and weight.dtype == dtype
    _products_match_dense(weight, dtype)
    assert torch.equal(weight.dense_rows(3, 9), w0[3:9])
    torch.testing.assert_close(weight.row_norms_sq(), w0.float().pow(2).sum(1))
    norms64 = weight.row_norms_sq(torch.float64)
    assert norms64.dtype == torch.float64 and torch.equal(norms64, w0.double().pow(2).sum(1))
    tensors, meta = weight.flatten()
    assert torch.equal(DenseWeight.unflatten(tensors, meta).dense(), w0)


# --- bitsandbytes 4-bit ----------------------------------------------------------------------

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except ImportError:  # the 4-bit tests skip; the dense ones above still run
    bnb = bnb_functional = None
requires_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

# (N, K, blocksize): K % blocksize == 0 (column slabs in backward), K % blocksize != 0 (blocks
# span rows, row tiles everywhere), and K odd (a row may start on a low nibble).
LAYOUTS = [(48, 256, 64), (24, 512, 128), (40, 96, 64), (6, 129, 32)]
LAYOUT_IDS = ["N48-K256-bs64", "N24-K512-bs128", "N40-K96-bs64", "N6-K129-bs32"]


def make_linear4bit(n, k, blocksize, quant_type="nf4", nested=False, dtype=torch.float32, **kwargs):
    """A bitsandbytes Linear4bit (K -> N) quantized on the CPU from a random (N, K) weight."""
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(n, k, dtype=dtype),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        module=layer,
        **kwargs,
    )
    return layer.to("cpu")


def bnb_dequantize(layer, blocksize):
    """bitsandbytes' dequantization of the layer's weight (N, K) in its quant_state.dtype.

    bitsandbytes 0.50's C kernel for AVX-512 CPUs (blocksize < 2048, even K) indexes absmax per
    row, n*(K // blocksize) + k // blocksize, which disagrees with its own quantizer when
    K % blocksize != 0; there the reference is bitsandbytes' pure-PyTorch kernel, which follows
    the quantizer (and matches its CUDA path)."""
    weight, state = layer.weight, layer.weight.quant_state
    n, k = state.shape
    if k % blocksize == 0 or k % 2:
        return bnb_functional.dequantize_4bit(weight, state)
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    absmax = NF4Weight._absmax_of(state)
    return compute(weight.data.reshape(-1), absmax, state.code, blocksize, (n, k), state.dtype)


@pytest.fixture(params=["tiles", "one-tile", "small-chunks", "torch-decoder"])
def tiling(request, monkeypatch):
    """The default tiling (small test weights give several tiles, each decoded in one chunk), the
    whole weight as one tile, or chunks of 100 elements (chunks start mid-block and mid-byte).
    All three decode with lora_kernels._C's CPU decoder where it is built; "torch-decoder" takes
    the pure-PyTorch decoder (other devices) with the chunks of "small-chunks"."""
    if request.param == "one-tile":
        monkeypatch.setattr(NF4Weight, "_tile_rows", lambda self: self.shape[0])
        monkeypatch.setattr(NF4Weight, "_slab_blocks", lambda self: self.shape[1] // self.blocksize)
    elif request.param in ("small-chunks", "torch-decoder"):
        monkeypatch.setattr(nf4, "CHUNK", 100)
    if request.param == "torch-decoder":
        monkeypatch.setattr(NF4Weight, "_decode_compiled", lambda self, first, row_stride, out: False)
    return request.param


@requires_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k,blocksize", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_dense_is_bnb_dequantize(quant_type, nested, n, k, blocksize, dtype, tiling):
    layer = make_linear4bit(n, k, blocksize, quant_type, nested, dtype)
    weight = NF4Weight.from_bnb(layer)
    assert type(weight) is FORMATS[quant_type] and weight.format == quant_type
    assert weight.shape == (n, k) and weight.dtype == dtype and weight.blocksize == blocksize
    expected = bnb_dequantize(layer, blocksize)
    dense = weight.dense()
    assert dense.dtype == expected.dtype and torch.equal(dense, expected)
    for n0, n1 in [(0, 1), (1, n), (n // 2, n), (n - 1, n), (2, 2)]:
        assert torch.equal(weight.dense_rows(n0, n1), expected[n0:n1]), (n0, n1)
    # the products' tiles are the same values (row norms read the row tiles)
    torch.testing.assert_close(weight.row_norms_sq(), expected.float().pow(2).sum(1), rtol=1e-5, atol=1e-5)


@requires_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k,blocksize", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_products_match_dense(quant_type, n, k, blocksize, dtype, tiling):
    weight = NF4Weight.from_bnb(make_linear4bit(n, k, blocksize, quant_type, True, dtype))
    _products_match_dense(weight, dtype)


@requires_bnb
def test_4bit_layout_contract():
    """The attributes other code (Triton kernels) reads: dtypes, shapes, nibble order, de-nested absmax."""
    n, k, bs = 8, 64, 32
    layer = make_linear4bit(n, k, bs, "nf4", nested=True)
    weight = NF4Weight.from_bnb(layer)
    assert weight.packed.dtype == torch.uint8 and weight.packed.shape == (n * k // 2,) and weight.packed.is_contiguous()
    assert weight.absmax.dtype == torch.float32 and weight.absmax.shape == (n * k // bs,)
    assert weight.code.dtype == torch.float32 and weight.code.shape == (16,)
    # element i: byte i // 2, high nibble for even i, times absmax[i // blocksize]
    flat = torch.arange(n * k)
    byte = weight.packed.long()[flat // 2]
    nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 15)
    by_contract = (weight.code[nibble] * weight.absmax[flat // bs]).view(n, k)
    assert torch.equal(by_contract, bnb_functional.dequantize_4bit(layer.weight, layer.weight.quant_state))


@requires_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_4bit_flatten_round_trip(quant_type, dtype):
    weight = NF4Weight.from_bnb(make_linear4bit(16, 64, 64, quant_type, True, dtype))
    tensors, meta = weight.flatten()
    assert [t is s for t, s in zip(tensors, [weight.packed, weight.absmax, weight.code])] == [True] * 3
    assert all(type(v) is int for v in meta)
    rebuilt = FORMATS[quant_type].unflatten(tensors, meta)
    assert type(rebuilt) is type(weight) and rebuilt.shape == weight.shape and rebuilt.dtype == dtype
    assert rebuilt.blocksize == weight.blocksize and torch.equal(rebuilt.dense(), weight.dense())


@requires_bnb
def test_4bit_compute_dtype_default_and_override():
    layer = make_linear4bit(8, 64, 64, dtype=torch.float32)
    layer.compute_dtype = torch.bfloat16
    assert NF4Weight.from_bnb(layer).dtype == torch.bfloat16  # the layer's compute_dtype
    assert NF4Weight.from_bnb(layer, torch.float16).dtype == torch.float16
    layer.compute_dtype = None
    assert NF4Weight.from_bnb(layer.weight).dtype == torch.float32  # the quantized weight's dtype


@requires_bnb
def test_4bit_row_norms_cached():
    weight = NF4Weight.from_bnb(make_linear4bit(8, 64, 64))
    assert weight.row_norms_sq() is weight.row_norms_sq()


@requires_bnb
def test_4bit_from_bnb_cached():
    layer = make_linear4bit(8, 64, 64, nested=True)
    first = NF4Weight.from_bnb_cached(layer)
    assert NF4Weight.from_bnb_cached(layer.weight) is first
    layer.weight.data = layer.weight.data.clone()  # e.g. a reload: same version, the bytes moved
    moved = NF4Weight.from_bnb_cached(layer)
    assert moved is not first and moved.packed.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(moved.dense(), first.dense())
    with torch.no_grad():
        layer.weight.zero_()  # an in-place write bumps the version
    zeroed = NF4Weight.from_bnb_cached(layer)
    assert zeroed is not moved  # (a cached row_norms_sq would be stale)
    layer.weight.quant_state = bnb_functional.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")[1]
    requantized = NF4Weight.from_bnb_cached(layer)
    assert requantized is not zeroed
    layer.weight.quant_state = copy.copy(layer.weight.quant_state)  # same absmax, another state
    assert NF4Weight.from_bnb_cached(layer) is not requantized
    assert NF4Weight.from_bnb_cached(layer, torch.bfloat16).dtype == torch.bfloat16


def _bad_state(field, value):
    def mutate(layer):
        setattr(layer.weight.quant_state, field, value)
        return layer

    return mutate


def _short_absmax(layer):
    state = layer.weight.quant_state
    state.absmax = state.absmax[:-1]
    return layer


def _unquantized(layer):
    return bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4")


@requires_bnb
@pytest.mark.parametrize(
    "make_bad,kwargs,error,words",
    [
        (_bad_state("quant_type", "int4"), {}, ValueError, ["quant_type", "'nf4' or 'fp4'", "int4"]),
        (_bad_state("blocksize", 48), {}, ValueError, ["blocksize", "(32, 64, 128", "48"]),
        (_bad_state("packing_format_for_cpu", True), {}, ValueError, ["packing_format_for_cpu"]),
        (_bad_state("shape", torch.Size([8, 8, 8])), {}, ValueError, ["quant_state.shape", "2-D"]),
        (_bad_state("shape", torch.Size([16, 64])), {}, ValueError, ["packed weight", "N*K/2 = 512"]),
        (_bad_state("code", torch.zeros(8)), {}, ValueError, ["quant_state.code", "16 values"]),
        (_short_absmax, {}, ValueError, ["quant_state.absmax", "has 7 values", "expected", "= 8"]),
        (_unquantized, {}, ValueError, ["quant_state", "missing"]),
        (lambda layer: layer, {"compute_dtype": torch.float64}, ValueError, ["compute_dtype", "torch.float64"]),
        (lambda layer: layer.weight.data.float(), {}, ValueError, ["quant_state", "missing"]),
        (lambda layer: "weight", {}, TypeError, ["weight must be", "str"]),
    ],
    ids=[
        "quant_type",
        "blocksize",
        "cpu-packing",
        "shape-3d",
        "shape-vs-bytes",
        "code",
        "absmax-length",
        "not-quantized",
        "compute_dtype",
        "plain-tensor",
        "not-a-tensor",
    ],
)
def test_4bit_from_bnb_errors_name_the_field(make_bad, kwargs, error, words):
    bad = make_bad(make_linear4bit(8, 64, 64))
    with pytest.raises(error) as info:
        NF4Weight.from_bnb(bad, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@requires_bnb
def test_4bit_from_bnb_rejects_other_quant_storage():
    layer = make_linear4bit(8, 64, 64, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match=r"quant_storage .* must be torch.uint8, got torch.bfloat16"):
        NF4Weight.from_bnb(layer)


@requires_bnb
def test_4bit_from_bnb_rejects_odd_element_count():
    layer = make_linear4bit(3, 5, 64)
    with pytest.raises(ValueError, match=r"N\*K must be even.*got 15"):
        NF4Weight.from_bnb(layer)


@requires_bnb
def test_4bit_dense_rows_range_checked():
    weight = NF4Weight.from_bnb(make_linear4bit(8, 64, 64))
    with pytest.raises(ValueError, match=r"0 <= n0 <= n1 <= N=8, got n0=3, n1=9"):
        weight.dense_rows(3, 9)


@requires_bnb
@pytest.mark.skipif(not _extension.has_op("decode_4bit", "cpu"), reason="lora_kernels._C (cpu kernels) is not built")
def test_compiled_decoder_refuses_out_of_range_reads():
    """decode_4bit checks the last flat index it would read against packed and absmax (no
    out-of-bounds read from a bad `first`, `row_stride` or `out` shape)."""
    weight = NF4Weight.from_bnb(make_linear4bit(8, 64, 64))
    args = (weight.packed, weight.absmax, weight.code)
    out = torch.empty(2, 64)
    torch.ops.lora_kernels.decode_4bit(*args, 6 * 64, 64, 64, out)  # the last two rows: in range
    assert torch.equal(out, weight.dense_rows(6, 8))
    with pytest.raises(RuntimeError, match="outside packed"):
        torch.ops.lora_kernels.decode_4bit(*args, 7 * 64, 64, 64, out)
    with pytest.raises(RuntimeError, match="row_stride >= C"):
        torch.ops.lora_kernels.decode_4bit(*args, 0, 32, 64, out)
    with pytest.raises(RuntimeError, match="absmax must be contiguous float32"):
        torch.ops.lora_kernels.decode_4bit(weight.packed, weight.absmax.double(), weight.code, 0, 64, 64, out)


@requires_bnb
def test_4bit_class_follows_quant_type():
    assert type(FP4Weight.from_bnb(make_linear4bit(8, 64, 64, "nf4"))) is NF4Weight
    assert type(NF4Weight.from_bnb(make_linear4bit(8, 64, 64, "fp4"))) is FP4Weight
    assert FORMATS["nf4"] is NF4Weight and FORMATS["fp4"] is FP4Weight
