# SPDX-License-Identifier: Apache-2.0
"""The memory contract (docs/design.md §5), measured for every backend × variant × base format of
the registries that runs on CPU tensors here:

1. saved for backward (`lora_kernels.memory.SavedActivationMeter`): x by reference (the caller's
   own storage), xa (M×r) and, with dropout, the seed (8 bytes) — never a mask or a dropped copy
   of x, so p > 0 saves exactly what p = 0 saves plus the seed; nothing M×K besides x itself.
2. peak memory of the forward and of the backward, each measured apart from the CPU allocator's
   own allocation events (`torch.profiler`, profile_memory=True; one thread, so every allocation
   is on the profiled one): beyond what the pass returns (y; the gradients) and what (1) saves,
   at most ¼ byte per element of x, the base format's declared temporaries
   (`BaseWeight.max_temporary_bytes`: 0 for dense, one tile of a 4-bit base), one fp32 M×N (dY
   or y held in fp32 for 16-bit dtypes) and, for variants other than plain LoRA, two more M×N
   temporaries. A mask of x (1 byte/element) or any copy of x, or the whole dequantized W₀, does
   not fit. Separately, a 4-bit base's declared temporaries stay under 1/8 of its dequantized
   weight on a Llama-sized layer (the QLoRA budget). Two shapes make each bound bite: "tall" (M ≫ N) for M×K
   temporaries, "wide" (N ≫ M) for N×K ones. Scratch the kernels keep in C++ std::vectors (the
   CPU kernels' 32-row blocks) is not an ATen allocation and is not seen here.

The eager autograd.Function and the torch.library custom op (what torch.compile traces) save
their tensors separately: both are measured.
"""

from __future__ import annotations

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from lora_kernels.memory import SavedActivationMeter
from helpers import REGISTRY_CASES, apply_variant, make_base, make_extra, make_inputs, skip_unless_served

DTYPES = [torch.float32, torch.bfloat16]
SEED_BYTES = 8  # the int64 (1,) dropout seed
# id -> (M, K, N, r)
SHAPES = {"tall": (1024, 512, 32, 4), "wide": (32, 512, 1024, 4)}
DROPOUT = {"p0": (0.0, True), "p0.1": (0.1, True), "eval": (0.1, False)}
# M×N temporaries a variant's forward + backward may hold besides y and dY: plain LoRA none; others
# (DoRA: x′·W₀ᵀ at p > 0, the scaled sum) up to two.
MN_TEMPORARIES = {"lora": 0}
# Variants that work on row chunks of x (DoRA's p > 0 passes) use a fixed chunk of ~2^21 elements,
# larger than these test shapes: shrink it here so a temporary that grows with M stands out.
ROW_CHUNK_KNOBS = {"dora": {"CHUNK_ELEMENTS": 1 << 14, "MIN_CHUNK_ROWS": 16}}
DEFAULT_MN_TEMPORARIES = 2
# Backends the peak bound does not apply to, and why.
PEAK_EXEMPT = {
    "reference": "the reference backend is plain PyTorch written for clarity: it materializes the "
    "dropout multiplier D (M×K) and fp32 copies by design; the bound is the kernels'",
}


@pytest.fixture(autouse=True)
def _one_thread():
    # The profiler sees allocations of the thread it runs on; kernels' worker threads would escape it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_onednn():
    # oneDNN's bf16 GEMM (AMX CPUs) packs W into a workspace of ~N×K bytes whose size also depends
    # on its primitive cache: the BLAS's memory, which the base layer pays too, not the kernels'.
    # ATen's own GEMM allocates none, so the bound measures the kernels alone on every CPU.
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    yield
    torch._C._set_mkldnn_enabled(enabled)


def layer(backend, variant, base_format, dtype, shape):
    """One layer: x (M, K), its trainable leaves (x, lora_A, lora_B, the variant's extra params),
    every parameter storage (excluded from saved activations), call(p, training) -> y, and the
    base weight."""
    skip_unless_served(backend, torch.device("cpu"), dtype, base_format)
    m, k, n, r = SHAPES[shape]
    x, weight, bias, lora_A, lora_B = make_inputs((m,), k, n, r, dtype)
    base = make_base(base_format, weight)
    extra = make_extra(variant, base, lora_A, lora_B, 0.5)
    params = [weight, bias, lora_A, lora_B, *extra.values(), *base.flatten()[0]]

    def call(p, training):
        return apply_variant(variant, x, base, bias, lora_A, lora_B, 0.5, p, training, backend, extra)

    return x, (x, lora_A, lora_B, *extra.values()), params, call, base


def saved_storages(call, params, p, training):
    """{storage: bytes} autograd saves in one forward, parameters excluded."""
    with SavedActivationMeter(exclude=params) as meter:
        call(p, training)
    return meter


@pytest.mark.parametrize("dropout", DROPOUT)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,variant,base_format", REGISTRY_CASES)
def test_saved_activations(backend, variant, base_format, dtype, dropout, path):
    x, _, params, call, _ = layer(backend, variant, base_format, dtype, "tall")
    m, k, n, r = SHAPES["tall"]
    p, training = DROPOUT[dropout]
    meter = saved_storages(call, params, p, training)
    beyond_x = meter.bytes_excluding(x)
    x_saved = meter.bytes - beyond_x
    assert x_saved == x.untyped_storage().nbytes(), "x's own storage is not saved (a copy of x is, or nothing)"
    seed = SEED_BYTES if (p > 0 and training) else 0
    if variant == "lora":
        assert beyond_x == m * r * dtype.itemsize + seed, f"saved beyond x: {beyond_x} B, expected xa (M×r) + seed"
    else:
        plain = saved_storages(call, params, 0.0, True).bytes_excluding(x)
        assert beyond_x == plain + seed, f"p={p} training={training} saves {beyond_x} B, p=0 saves {plain} B"
    x_key = (x.device.type, x.device.index, x.untyped_storage().data_ptr())
    largest = max((nbytes for key, nbytes in meter.storages.items() if key != x_key), default=0)
    assert largest < m * k, f"a saved tensor of {largest} B is as large as a 1-byte mask of x (M×K = {m * k})"


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_bytes(fn):
    """Peak of the bytes allocated (and not yet freed) while fn runs, from the CPU allocator's
    allocation events; blocks allocated before fn are not counted, freed or not."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [n for n in _walk(prof.profiler.kineto_results.experimental_event_tree()) if n.tag == _EventType.Allocation]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_time_ns):
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,variant,base_format", REGISTRY_CASES)
def test_peak_memory_of_forward_and_backward(backend, variant, base_format, dtype, p, shape, monkeypatch):
    """Forward and backward measured apart (a forward temporary would hide under backward's dX)."""
    if backend in PEAK_EXEMPT:
        pytest.skip(PEAK_EXEMPT[backend])
    for name, value in ROW_CHUNK_KNOBS.get(variant, {}).items():
        monkeypatch.setattr(f"lora_kernels.variants.{variant}.{name}", value)
    x, leaves, _, call, base = layer(backend, variant, base_format, dtype, shape)
    m, k, n, r = SHAPES[shape]
    grad_y = torch.randn(m, n, dtype=dtype)
    mn_temporaries = MN_TEMPORARIES.get(variant, DEFAULT_MN_TEMPORARIES) * m * n * dtype.itemsize
    allowance = m * k // 4 + base.max_temporary_bytes() + m * n * 4 + mn_temporaries
    kept = {}

    def forward():
        kept["y"] = call(p, True)

    def backward():
        kept["grads"] = torch.autograd.grad(kept["y"], leaves, grad_y)

    for name, fn, returned in [
        ("forward", forward, lambda: [kept["y"]]),
        ("backward", backward, lambda: kept["grads"]),
    ]:
        peak = peak_bytes(fn)
        kept_bytes = sum(t.untyped_storage().nbytes() for t in returned())
        if name == "forward":
            kept_bytes += m * r * dtype.itemsize + (SEED_BYTES if p > 0 else 0)  # xa and the seed, saved
        extra_bytes = peak - kept_bytes
        assert extra_bytes <= allowance, (
            f"{name} peak {peak} B: {extra_bytes} B beyond what it returns and saves ({kept_bytes} B), allowed "
            f"{allowance} B (¼ B per element of x, the base's {base.max_temporary_bytes()} B, an fp32 M×N, "
            f"{mn_temporaries} B of M×N temporaries)"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base_format", ["nf4", "fp4"])
def test_4bit_temporaries_fit_the_qlora_budget(base_format, dtype):
    """QLoRA's budget (issue 10): one product of a 4096 x 4096 4-bit base allocates under 1/8 of
    the weight dequantized to the compute dtype (the peak test above holds the kernels to it)."""
    n = k = 4096
    weight = torch.zeros(n, k, dtype=dtype)
    base = make_base(base_format, weight)
    assert base.max_temporary_bytes() < n * k * dtype.itemsize // 8
