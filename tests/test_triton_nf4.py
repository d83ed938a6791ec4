# SPDX-License-Identifier: Apache-2.0
"""The triton backend on a 4-bit (bitsandbytes NF4 / FP4) base weight: forward y/xa and backward
dX/dA/dB against the oracle run on the dequantized dense weight, both forward schedules, with and
without dropout, ragged shapes, blocksizes 64 and 128, blocks that span two rows (K % blocksize
!= 0) and element pairs that do (odd K), double-quantized absmax. The kernels read the packed
codes themselves (`lora_kernels.backends.triton.nf4`); the interpreter runs them on CPU (fp32 and
fp16, as in tests/test_triton.py, whose interpreter setup and fixture this module reuses).

The weights are `lora_kernels.base_weights` NF4Weight/FP4Weight built from bitsandbytes'
quantizer (tests/test_base_weights.py holds them to bitsandbytes' dequantization)."""

from __future__ import annotations

import pytest
import torch

from tests.test_triton import DEVICE, _triton_env, triton_backend  # noqa: F401  (autouse fixture)

bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
bnb_functional = bitsandbytes.functional

from lora_kernels.backends import reference as reference_backend  # noqa: E402
from lora_kernels.base_weights import FORMATS  # noqa: E402
from tests.helpers import assert_close, flat_backward, flat_forward, make_inputs  # noqa: E402


def quantize_4bit(weight: torch.Tensor, fmt: str, blocksize: int, double_quant: bool, dtype: torch.dtype):
    """A float (N, K) weight quantized by bitsandbytes, as `lora_kernels.base_weights` serves it
    (NF4Weight / FP4Weight, absmax de-nested); `dense_calls` counts its `dense()` calls, which the
    kernels must never make (they read the packed codes)."""
    options = dict(blocksize=blocksize, quant_type=fmt, compress_statistics=double_quant)
    packed, state = bnb_functional.quantize_4bit(weight.float(), **options)
    param = bitsandbytes.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True, **options)
    base = FORMATS[fmt].from_bnb(param, compute_dtype=dtype)
    base.dense_calls = 0
    dense = base.dense

    def counted_dense():
        base.dense_calls += 1
        return dense()

    base.dense = counted_dense
    return base


def _weight(n, k, fmt, blocksize, dtype, double_quant=False, seed=3):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * k**-0.5
    return quantize_4bit(w.float(), fmt, blocksize, double_quant, dtype)


# (M, K, N, r, blocksize, bias): K % 64 == 0; a ragged tile edge everywhere (M, N, K) with a block
# spanning two rows (200 % 64); odd K (element pairs span rows, 37 < 64: blocks span rows); a
# blocksize of 128 at K = 96 (every block spans rows) and M <= 64 with K >= 4 * 32 (split-K F2).
SHAPES = [
    (40, 128, 96, 8, 64, True),
    (37, 200, 45, 3, 64, False),
    (33, 37, 46, 4, 64, True),  # N*K even: NF4Weight stores whole bytes
    (20, 96, 70, 16, 128, True),
    (9, 256, 40, 4, 128, False),
]
DTYPES = [torch.float32, torch.float16]


def _shape_id(s):
    return f"M{s[0]}-K{s[1]}-N{s[2]}-r{s[3]}-bs{s[4]}"


def _check(base, m, r, bias, dtype, p, schedule, deterministic=True, seed_value=0x5EED_1234_0BAD_CAFE):
    """Triton on the 4-bit base vs the reference backend on its dequantized weight (float64)."""
    n, k = base.shape
    x, _, b, lora_A, lora_B = make_inputs((m,), k, n, r, dtype, DEVICE, bias=bias, requires_grad=False)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype).to(DEVICE)
    seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE) if p > 0 else None
    dense = base.dense().double()
    dbl = [None if t is None else t.double() for t in (x, b, lora_A, lora_B)]
    y_ref, xa_ref = flat_forward(reference_backend, dbl[0], dense, dbl[1], dbl[2], dbl[3], 0.5, p, seed)
    grads_ref = flat_backward(reference_backend, dy.double(), dbl[0], dense, dbl[2], dbl[3], xa_ref, 0.5, p, seed, True)
    calls = base.dense_calls
    y, xa = flat_forward(triton_backend, x, base, b, lora_A, lora_B, 0.5, p, seed, schedule=schedule)
    grads = flat_backward(triton_backend, dy, x, base, lora_A, lora_B, xa, 0.5, p, seed, True,
                          deterministic=deterministic)
    assert base.dense_calls == calls, "the triton backend must not dequantize the whole weight"
    assert y.dtype == xa.dtype == grads.x.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(xa, xa_ref, dtype, "xa")
    for name, got, want in zip(("dx", "dA", "dB"), grads, grads_ref):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("schedule", ["F1", "F2"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_matches_oracle(fmt, dtype, p, schedule):
    m, k, n, r, bs, bias = SHAPES[0]
    _check(_weight(n, k, fmt, bs, dtype), m, r, bias, dtype, p, schedule)


@pytest.mark.parametrize("schedule", ["F1", "F2"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=_shape_id)
def test_4bit_ragged_and_row_spanning_blocks(shape, schedule):
    m, k, n, r, bs, bias = shape
    fmt = "nf4" if k % 2 else "fp4"
    _check(_weight(n, k, fmt, bs, torch.float32), m, r, bias, torch.float32, 0.1, schedule)


def test_4bit_split_k_is_taken():
    """SHAPES[-1] runs the split-K F2 forward (M <= 64, long K) in the interpreter."""
    from lora_kernels.backends.triton import configs

    m, k, n, r, _, _ = SHAPES[-1]
    assert configs.splitk_plan(m, n, k, configs.DEFAULT_SM_COUNT, 4, 16, configs.SMEM_LIMIT_BY_ARCH[90],
                               w_format=1) is not None


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_4bit_double_quant_fp16(deterministic):
    m, k, n, r, bs, bias = SHAPES[1]
    _check(_weight(n, k, "nf4", bs, torch.float16, double_quant=True), m, r, bias, torch.float16, 0.1, "F2",
           deterministic=deterministic)


def test_4bit_errors_name_the_field():
    from lora_kernels.backends.triton.nf4 import packed_4bit

    base = _weight(8, 64, "nf4", 64, torch.float32)
    base.blocksize = 48
    with pytest.raises(ValueError, match="nf4 blocksize must be a power of two"):
        packed_4bit(base, torch.device(DEVICE))
    base = _weight(8, 64, "nf4", 64, torch.float32)
    base.absmax = base.absmax.half()
    with pytest.raises(TypeError, match="nf4 absmax must be torch.float32"):
        packed_4bit(base, torch.device(DEVICE))
    base = _weight(8, 64, "fp4", 64, torch.float32)
    base.packed = base.packed[:-1]
    with pytest.raises(ValueError, match=r"fp4 packed must hold 256 elements for shape \(8, 64\)"):
        packed_4bit(base, torch.device(DEVICE))


def test_backend_declares_4bit_formats():
    from lora_kernels.backends.registry import BACKENDS

    backend = BACKENDS["triton"]
    for fmt in ("dense", "nf4", "fp4"):
        assert fmt not in (backend.unavailable_reason(torch.device(DEVICE), torch.float32, fmt) or ""), fmt
    assert "got 'int8'" in backend.unavailable_reason(torch.device(DEVICE), torch.float32, "int8")
