# SPDX-License-Identifier: Apache-2.0
"""The `triton` backend against the oracle: forward, every gradient, both forward schedules, both
backward reduction modes, and dropout masks bit-identical to the Python mirror.

Without a CUDA GPU the kernels run on CPU tensors under the Triton interpreter: this module sets
TRITON_INTERPRET=1 itself while it imports `lora_kernels.backends.triton` (``triton.jit`` picks the
interpreter when a kernel is *decorated*, i.e. at import) and while its tests run. Shapes are small,
dtypes fp32/fp16 (the interpreter cannot do bf16 ``tl.dot``); bf16 and large shapes are
``@pytest.mark.gpu`` tests that need CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = not HAS_CUDA
DEVICE = "cuda" if HAS_CUDA else "cpu"
_SUBMODULES = ("configs", "dropout", "nf4", "fwd", "bwd", "per_row", "stacked")  # dependencies first


@contextlib.contextmanager
def _interpreter_env():
    """TRITON_INTERPRET=1 inside the block when there is no GPU; the previous value after it."""
    previous = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


with _interpreter_env():
    # Set before `import triton` where possible: triton's own jit helpers (tl.randint4x, ...) are
    # interpretable only if decorated under TRITON_INTERPRET=1. The backend calls none of them, so
    # an earlier `import triton` elsewhere in the session does not break it.
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'lora_kernels[triton]')")
    import triton.language as tl

    import lora_kernels.backends.triton.configs as _configs

    if _configs.INTERPRET != INTERPRET:  # imported earlier with the other mode: re-decorate the kernels
        for _name in _SUBMODULES:
            if f"lora_kernels.backends.triton.{_name}" in sys.modules:  # per_row is imported on first use
                importlib.reload(sys.modules[f"lora_kernels.backends.triton.{_name}"])
        importlib.reload(sys.modules["lora_kernels.backends.triton"])
    import lora_kernels.backends.triton as triton_backend
    from lora_kernels.backends.triton import bwd as _bwd  # noqa: F401  (triton_backend.bwd / .fwd below)
    from lora_kernels.backends.triton import configs
    from lora_kernels.backends.triton import fwd as _fwd  # noqa: F401
    from lora_kernels.backends.triton.dropout import _dropout_keep, _philox4x32

    @triton.jit
    def _keep_probe_kernel(seed_ptr, out_ptr, flat0, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           ALIGNED: tl.constexpr):
        """out[i, c] = keep bit of flat index flat0 + i*K + c (only the helper; no huge tensors)."""
        rows = tl.arange(0, BLOCK_M).to(tl.int64)
        keep = _dropout_keep(tl.load(seed_ptr), flat0 + rows * K, threshold, BLOCK_M, BLOCK_K, ALIGNED)
        offs = rows[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        tl.store(out_ptr + offs, keep.to(tl.int8))

    @triton.jit
    def _philox_probe_kernel(seed_ptr, group_ptr, out_ptr, USE_TRITON: tl.constexpr, BLOCK: tl.constexpr):
        """out[w, i] = word w of Philox at group[i], by the backend's helper or by tl.randint4x."""
        offs = tl.arange(0, BLOCK)
        group = tl.load(group_ptr + offs)
        seed = tl.load(seed_ptr)
        if USE_TRITON:
            r0, r1, r2, r3 = tl.randint4x(seed, group)
        else:
            r0, r1, r2, r3 = _philox4x32(seed, group)
        tl.store(out_ptr + offs, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + BLOCK + offs, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 2 * BLOCK + offs, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 3 * BLOCK + offs, r3.to(tl.int64) & 0xFFFFFFFF)


import lora_kernels  # noqa: E402
from lora_kernels import dropout as dropout_rule  # noqa: E402
from lora_kernels.backends import reference as reference_backend  # noqa: E402
from lora_kernels.backends import resolve  # noqa: E402
from tests.helpers import assert_close, flat_backward, flat_forward, make_inputs, oracle  # noqa: E402

gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bf16 tl.dot / large shapes)")


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    """The backend table reads TRITON_INTERPRET per call; the schedule/determinism env switches are
    cleared so every test states what it runs."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LORA_KERNELS_TRITON_SCHEDULE", raising=False)
    monkeypatch.delenv("LORA_KERNELS_TRITON_DETERMINISTIC", raising=False)


def test_backend_is_available():
    assert "triton" in lora_kernels.available_backends(DEVICE)


# --- forward + gradients through lora_linear against the fp64 oracle ---------------------------

# (lead dims, K, N, r, bias, p): odd K/N (not block multiples), K % 8 != 0 (dropout groups straddle
# rows and tiles) and == 0, several row blocks (partials), M = 1, r = 1/3/16/64.
CASES = [
    ((7,), 37, 45, 3, True, 0.0),
    ((7,), 37, 45, 3, True, 0.1),
    ((2, 35), 37, 45, 1, False, 0.5),
    ((1,), 64, 40, 16, True, 0.1),
    ((33,), 72, 33, 64, False, 0.1),
    ((3, 5), 24, 17, 16, True, 0.0),
]
DTYPES = [torch.float32, torch.float16]


def _case_id(case):
    lead, k, n, r, bias, p = case
    return f"M{'x'.join(map(str, lead))}-K{k}-N{n}-r{r}-{'bias' if bias else 'nobias'}-p{p}"


def _run_and_check(x, weight, bias, lora_A, lora_B, scaling, p, dtype, torch_seed=1234):
    torch.manual_seed(torch_seed)
    y = lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, backend="triton")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    grad_y = grad_y.to(x.device)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)
    torch.manual_seed(torch_seed)  # the same seed lora_linear drew
    seed = dropout_rule.draw_seed(x.device) if p > 0 else None
    y_ref, grads_ref = oracle(x, weight, bias, lora_A, lora_B, scaling, p, seed, grad_y)
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("grad_x", "grad_A", "grad_B"), grads, grads_ref):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("deterministic", ["1", "0"], ids=["det", "atomic"])
@pytest.mark.parametrize("schedule", ["F1", "F2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_oracle(case, dtype, schedule, deterministic, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_TRITON_SCHEDULE", schedule)
    monkeypatch.setenv("LORA_KERNELS_TRITON_DETERMINISTIC", deterministic)
    lead, k, n, r, bias, p = case
    x, weight, b, lora_A, lora_B = make_inputs(lead, k, n, r, dtype, DEVICE, bias=bias)
    _run_and_check(x, weight, b, lora_A, lora_B, 0.75, p, dtype)


@pytest.mark.parametrize("schedule", ["F1", "F2", "auto"])
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_lead"])
def test_noncontiguous_x(layout, schedule, monkeypatch):
    """x with any strides: a transposed view, every other column, a broadcast leading dim."""
    monkeypatch.setenv("LORA_KERNELS_TRITON_SCHEDULE", schedule)
    k, n, r, dtype = 37, 45, 3, torch.float32
    _, weight, bias, lora_A, lora_B = make_inputs((1,), k, n, r, dtype, DEVICE)
    base = torch.randn(40, 80, generator=torch.Generator().manual_seed(3), dtype=dtype).to(DEVICE)
    if layout == "transposed":
        x = base.t()[:, :k]  # (80, 37), strides (1, 80)
    elif layout == "strided":
        x = base[:9, ::2][:, :k]  # (9, 37), strides (80, 2)
    else:
        x = base[0, :k].expand(3, 5, k)  # (3, 5, 37), stride 0 rows
    assert not x.is_contiguous()
    x = x.detach().requires_grad_(True)
    _run_and_check(x, weight, bias, lora_A, lora_B, 0.5, 0.1, dtype)


def test_float64_is_refused():
    x, weight, bias, lora_A, lora_B = make_inputs((4,), 37, 45, 3, torch.float64, DEVICE)
    with pytest.raises(ValueError, match="triton.*supports float16, bfloat16, float32, got float64"):
        lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend="triton")
    # "auto" passes over triton for fp64 instead of failing
    assert resolve("auto", x.device, torch.float64) != "triton"


def test_zero_rows():
    x, weight, bias, lora_A, lora_B = make_inputs((0,), 37, 45, 3, torch.float32, DEVICE)
    y = lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.1, backend="triton")
    assert y.shape == (0, 45)
    grads = torch.autograd.grad(y.sum(), (x, lora_A, lora_B))
    assert grads[0].shape == (0, 37) and not grads[1].any() and not grads[2].any()
    # the backend itself also accepts M = 0 (ops.py does not call it then, others might)
    x2d = torch.zeros(0, 37, device=DEVICE)
    y2d, xa = flat_forward(triton_backend, x2d, weight, bias, lora_A.detach(), lora_B.detach(), 0.5, 0.0, None)
    assert y2d.shape == (0, 45) and xa.shape == (0, 3)
    dx, da, db = flat_backward(triton_backend,
        torch.zeros(0, 45, device=DEVICE), x2d, weight, lora_A.detach(), lora_B.detach(), xa, 0.5, 0.0, None, True
    )
    assert dx.shape == (0, 37) and not da.any() and not db.any()


# --- the backend interface directly --------------------------------------------------------------


def _direct_inputs(m=40, k=37, n=45, r=3, dtype=torch.float32):
    x, weight, bias, lora_A, lora_B = make_inputs((m,), k, n, r, dtype, DEVICE, requires_grad=False)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(5), dtype=dtype).to(DEVICE)
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64, device=DEVICE)
    return x, weight, bias, lora_A, lora_B, dy, seed


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_interface_matches_reference_backend(p):
    x, weight, bias, lora_A, lora_B, dy, seed = _direct_inputs()
    seed = seed if p > 0 else None
    y_ref, xa_ref = flat_forward(reference_backend, x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(),
                                      0.5, p, seed)
    ref_grads = flat_backward(reference_backend, dy.double(), x.double(), weight.double(), lora_A.double(), lora_B.double(),
                                   xa_ref, 0.5, p, seed, True)
    for schedule in ("F1", "F2"):
        y, xa = flat_forward(triton_backend, x, weight, bias, lora_A, lora_B, 0.5, p, seed, schedule=schedule)
        assert y.dtype == xa.dtype == x.dtype and xa.shape == (40, 3)
        assert_close(y, y_ref, torch.float32, f"y ({schedule})")
        assert_close(xa, xa_ref, torch.float32, f"xa ({schedule})")
    for deterministic in (True, False):
        grads = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, p, seed, True,
                                        deterministic=deterministic)
        for name, got, want in zip(("dx", "dA", "dB"), grads, ref_grads):
            assert_close(got, want, torch.float32, f"{name} (deterministic={deterministic})")
        dx, da, db = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, p, seed, False,
                                             deterministic=deterministic)
        assert dx is None
        assert_close(da, ref_grads[1], torch.float32, "dA without dx")
        assert_close(db, ref_grads[2], torch.float32, "dB without dx")


def test_deterministic_backward_is_bitwise_reproducible():
    x, weight, _, lora_A, lora_B, dy, seed = _direct_inputs(m=70)
    _, xa = flat_forward(triton_backend, x, weight, None, lora_A, lora_B, 0.5, 0.1, seed)
    first = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, 0.1, seed, True, deterministic=True)
    second = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, 0.1, seed, True, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_schedule_switches():
    assert configs.resolve_schedule("F1", 10**6) == "F1"
    assert configs.resolve_schedule("F2", 1) == "F2"
    assert configs.resolve_schedule("auto", 1) == "F1"
    assert configs.resolve_schedule("auto", configs.F1_MAX_M + 1) == "F2"
    with pytest.raises(ValueError, match="schedule"):
        configs.resolve_schedule("F3", 1)
    with pytest.raises(ValueError, match="schedule"):
        x, weight, bias, lora_A, lora_B, _, _ = _direct_inputs()
        flat_forward(triton_backend, x, weight, bias, lora_A, lora_B, 0.5, 0.0, None, schedule="fast")


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
def test_config_pruning(capability):
    """The GPU config lists and their pruning, checked on the host (pure Python)."""
    gemm = configs.gemm_configs(interpret=False, capability=capability)
    dx_cfgs = configs.dx_configs(interpret=False, capability=capability)
    fwd_tiles = [configs._tiles(c, "BLOCK_N", "BLOCK_K") for c in gemm]
    assert len(set(fwd_tiles)) == len(gemm)
    assert [configs._tiles(c, "BLOCK_K", "BLOCK_N") for c in dx_cfgs] == fwd_tiles  # same tiles, roles mapped
    w = torch.empty(0, dtype=torch.bfloat16)
    big, small = {"M_BUCKET": 8192, "w_ptr": w}, {"M_BUCKET": 16, "w_ptr": w}
    decode = configs.prune_fwd(gemm, small, R_PAD=16, FUSE_XA=True, HAS_DROPOUT=True)
    assert decode and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["GROUP_M"] == 1 for c in decode)
    large = configs.prune_fwd(gemm, big, R_PAD=16, FUSE_XA=False, HAS_DROPOUT=True)
    assert large and all(configs._tiles(c, "BLOCK_N", "BLOCK_K") not in configs._SMALL for c in large)
    masked = configs.prune_fwd(gemm, big, R_PAD=16, FUSE_XA=True, HAS_DROPOUT=True)
    assert masked and len(masked) < len(large)
    for c in masked:  # no tile sizes that spill next to the Philox state
        acc_per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        assert acc_per_thread <= configs.MASKED_ACC_PER_THREAD
    dx = configs.prune_dx(dx_cfgs, big, R_PAD=16, HAS_DROPOUT=True)
    assert dx and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) <= 64 for c in dx)
    limit = configs.smem_limit(capability)
    for c in configs.prune_dx(dx_cfgs, big, R_PAD=16, HAS_DROPOUT=False, SMEM_LIMIT=limit):
        stage = (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_N"] * 2  # dY + W tiles
        assert c.num_stages * stage <= limit
    fp32 = configs.prune_fwd(gemm, {"M_BUCKET": 8192, "w_ptr": w.float()}, R_PAD=16, FUSE_XA=False)
    assert fp32 and len(fp32) <= len(large)  # wider elements: fewer pipelines fit in shared memory
    stream = configs.xa_configs(interpret=False)
    x = torch.empty(0, dtype=torch.bfloat16)
    assert all(c.kwargs["BLOCK_M"] <= 16 for c in configs.prune_stream(stream, {"M_BUCKET": 4, "x_ptr": x}))
    assert configs.gdb_config(8192, 2, 16, limit, interpret=False).kwargs["BLOCK_M"] == 64
    assert configs.gdb_config(32, 2, 16, limit, interpret=False).kwargs["BLOCK_M"] == 32
    assert configs.m_bucket(1) == 1 and configs.m_bucket(300) == 512 and configs.m_bucket(10**7) == 16384


def test_autotune_uses_one_config_when_interpreting():
    if not INTERPRET:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    for kernel in (triton_backend.fwd._lora_fwd_kernel, triton_backend.fwd._lora_fwd_xa_kernel,
                   triton_backend.bwd._lora_bwd_dx_kernel):
        assert len(kernel.configs) == 1, kernel
    assert len(configs.gdb_configs()) == 1  # the dY pass is never autotuned


# --- dropout: bit-identical to the Python mirror --------------------------------------------------

SEEDS = [0, 1, 0xFFFF_FFFF, 2**32, 0x7FFF_FFFF_FFFF_FFFF, 0x5555_AAAA_5555_AAAA & (2**63 - 1)]


@pytest.mark.parametrize("schedule", ["F1", "F2"])
@pytest.mark.parametrize("k", [37, 64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_bit_identical(k, p, schedule):
    """weight = 0, A = B = I (r = K), s = 1: y is exactly dropout(x), and dx exactly D⊙dy."""
    m, dtype = 9, torch.float32
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    weight = torch.zeros(k, k, dtype=dtype, device=DEVICE)
    gen = torch.Generator().manual_seed(11)
    x = (1.0 + torch.rand(m, k, generator=gen, dtype=dtype)).to(DEVICE)  # never 0
    dy = (1.0 + torch.rand(m, k, generator=gen, dtype=dtype)).to(DEVICE)
    for seed_value in SEEDS:
        seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
        keep = dropout_rule.dropout_keep_mask(seed_value, m, k, p).to(DEVICE)
        scale = 1.0 / (1.0 - p)
        y, xa = flat_forward(triton_backend, x, weight, None, eye, eye, 1.0, p, seed, schedule=schedule)
        assert torch.equal(y != 0, keep), f"forward mask differs, seed={seed_value:#x}"
        assert torch.equal(y, torch.where(keep, x * scale, 0.0)), f"seed={seed_value:#x}"
        assert torch.equal(xa, y)
        dx, _, _ = flat_backward(triton_backend, dy, x, weight, eye, eye, xa, 1.0, p, seed, True)
        assert torch.equal(dx, torch.where(keep, dy * scale, 0.0)), f"backward mask differs, seed={seed_value:#x}"


def _mirror_keep(seed: int, flat: torch.Tensor, p: float) -> torch.Tensor:
    """The rule of `lora_kernels.reference` for arbitrary flat indices (the mirror itself starts at 0)."""
    words = dropout_rule.philox4x32(flat // 8, seed)
    lane_id = flat % 8
    word = torch.stack(words, dim=-1).gather(-1, (lane_id // 2).unsqueeze(-1)).squeeze(-1)
    lane = (word >> (16 * (lane_id % 2))) & 0xFFFF
    return lane >= dropout_rule.dropout_threshold(p)


def _triton_random_usable() -> bool:
    if not INTERPRET:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.randint4x, InterpretedFunction)


@pytest.mark.parametrize("seed_value", SEEDS)
def test_philox_matches_mirror_and_tl_randint4x(seed_value):
    groups = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**61 - 1, 12345, 99, 7, 2**33,
                           5, 6, 8, 2**59], dtype=torch.int64)
    seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
    want = torch.stack(dropout_rule.philox4x32(groups, seed_value))
    out = torch.empty(4, 16, dtype=torch.int64, device=DEVICE)
    _philox_probe_kernel[(1,)](seed, groups.to(DEVICE), out, USE_TRITON=False, BLOCK=16)
    assert torch.equal(out.cpu(), want)
    if not _triton_random_usable():
        pytest.skip("tl.randint4x was decorated before TRITON_INTERPRET=1 was set (triton imported earlier in "
                    "this session); the backend's Philox still matched the mirror")
    _philox_probe_kernel[(1,)](seed, groups.to(DEVICE), out, USE_TRITON=True, BLOCK=16)
    assert torch.equal(out.cpu(), want)


def test_mirror_helper_agrees_with_reference():
    keep = dropout_rule.dropout_keep_mask(42, 5, 37, 0.3)
    flat = torch.arange(5 * 37, dtype=torch.int64).reshape(5, 37)
    assert torch.equal(_mirror_keep(42, flat, 0.3), keep)


@pytest.mark.parametrize("aligned", [True, False], ids=["K%8==0", "K%8!=0"])
@pytest.mark.parametrize(
    "flat0",
    [2**31 - 64, 2**32 - 8, 8 * (2**32) - 96, 8 * (2**32 + 5) + 3, 2**62 + 2**40 + 17],
    ids=["i~2^31", "i~2^32", "group~2^32", "group>2^32", "i~2^62"],
)
def test_dropout_helper_large_offsets(flat0, aligned):
    """The jit helper at flat indices past 2**31 and groups past 2**32, without huge tensors."""
    block_m, block_k = 4, 32
    k = 64 if aligned else 37
    if aligned:
        flat0 -= flat0 % 8
    p = 0.25
    for seed_value in (SEEDS[2], SEEDS[4]):
        out = torch.zeros(block_m, block_k, dtype=torch.int8, device=DEVICE)
        seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
        _keep_probe_kernel[(1,)](seed, out, flat0, k, dropout_rule.dropout_threshold(p),
                                 BLOCK_M=block_m, BLOCK_K=block_k, ALIGNED=aligned)
        flat = flat0 + torch.arange(block_m, dtype=torch.int64)[:, None] * k + torch.arange(block_k)[None, :]
        assert torch.equal(out.bool().cpu(), _mirror_keep(seed_value, flat, p)), f"seed={seed_value:#x}"


def test_dropout_rate():
    """The empirical keep rate is 1 - t/65536 (no lane/word mixed up into a biased rule)."""
    m, k, p = 64, 64, 0.3
    x, weight = torch.ones(m, k, device=DEVICE), torch.zeros(k, k, device=DEVICE)
    eye = torch.eye(k, device=DEVICE)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    y, _ = flat_forward(triton_backend, x, weight, None, eye, eye, 1.0, p, seed)
    rate = (y != 0).double().mean().item()
    assert abs(rate - (1 - p)) < 0.03


# --- GPU lowering without a GPU: see tests/test_triton_static.py (the static report) -------------


# --- GPU only: bf16, large shapes, 64-bit offsets -------------------------------------------------


def _error_ratio_check(got, want_same_dtype, want_fp32, name, factor=2.0):
    """Kernel error vs fp32 <= factor x (same-dtype PyTorch error vs fp32) + a small floor."""
    err = (got.float() - want_fp32).abs().max().item()
    base = (want_same_dtype.float() - want_fp32).abs().max().item()
    assert err <= factor * base + 1e-2, f"{name}: max err {err:.3g} vs PyTorch {base:.3g}"


@gpu
@requires_cuda
@pytest.mark.parametrize("schedule", ["F1", "F2"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bf16_matches_oracle(case, schedule, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_TRITON_SCHEDULE", schedule)
    lead, k, n, r, bias, p = case
    x, weight, b, lora_A, lora_B = make_inputs(lead, k, n, r, torch.bfloat16, DEVICE, bias=bias)
    _run_and_check(x, weight, b, lora_A, lora_B, 0.75, p, torch.bfloat16)


@gpu
@requires_cuda
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("schedule", ["F1", "F2", "auto"])
@pytest.mark.parametrize("m,k,n", [(16384, 4096, 4096), (4096, 4096, 14336), (4096, 14336, 4096), (16, 4096, 4096)],
                         ids=["16384x4096x4096", "4096x4096x14336", "4096x14336x4096", "decode16"])
def test_large_bf16(m, k, n, schedule, p):
    torch.manual_seed(0)
    r, s = 16, 2.0
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    lora_A = torch.randn(r, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
    lora_B = torch.randn(n, r, device=DEVICE, dtype=torch.bfloat16) * r**-0.5
    dy = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    seed = dropout_rule.draw_seed(DEVICE) if p > 0 else None
    y, xa = flat_forward(triton_backend, x, weight, bias, lora_A, lora_B, s, p, seed, schedule=schedule)
    grads = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, s, p, seed, True)
    f32 = [t.float() for t in (x, weight, bias, lora_A, lora_B)]
    y32, xa32 = flat_forward(reference_backend, *f32, s, p, seed)
    y16, xa16 = flat_forward(reference_backend, x, weight, bias, lora_A, lora_B, s, p, seed)
    _error_ratio_check(y, y16, y32, "y")
    _error_ratio_check(xa, xa16, xa32, "xa")
    g32 = flat_backward(reference_backend, dy.float(), f32[0], f32[1], f32[3], f32[4], xa32, s, p, seed, True)
    g16 = flat_backward(reference_backend, dy, x, weight, lora_A, lora_B, xa16, s, p, seed, True)
    for name, got, same, want in zip(("dx", "dA", "dB"), grads, g16, g32):
        _error_ratio_check(got, same, want, name)


@gpu
@requires_cuda
@pytest.mark.parametrize("schedule", ["F1", "F2"])
def test_64bit_offsets(schedule):
    """M·K > 2**31 (x alone is 4.3 GB in bf16): rows past the int32 range are checked against the
    reference maths on those rows, with the mask at their global flat indices."""
    k, n, r, p, s = 4096, 64, 16, 0.1, 1.0
    m = 2**31 // k + 1000
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs >= 24 GiB of GPU memory for an M·K > 2**31 input")
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
    lora_A = torch.randn(r, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
    lora_B = torch.randn(n, r, device=DEVICE, dtype=torch.bfloat16) * r**-0.5
    seed = torch.tensor([0x7FFF_FFFF_0000_1234], dtype=torch.int64, device=DEVICE)
    y, xa = flat_forward(triton_backend, x, weight, None, lora_A, lora_B, s, p, seed, schedule=schedule)
    dy = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    dx, _, _ = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, s, p, seed, True)
    rows = torch.arange(m - 64, m, device=DEVICE)  # flat indices > 2**31
    flat = rows[:, None].long() * k + torch.arange(k, device=DEVICE)[None, :]
    d = _mirror_keep(int(seed.item()), flat, p).float() / (1 - p)
    xs = x[rows].float()
    xa_ref = (xs * d) @ lora_A.float().t()
    y_ref = xs @ weight.float().t() + s * xa_ref @ lora_B.float().t()
    torch.testing.assert_close(y[rows].float(), y_ref, atol=0.1, rtol=0.05)
    g = dy[rows].float() @ lora_B.float()
    dx_ref = dy[rows].float() @ weight.float() + s * d * (g @ lora_A.float())
    torch.testing.assert_close(dx[rows].float(), dx_ref, atol=0.1, rtol=0.05)


# --- issue 9 regressions (interpreter): fp32 g, NaN contract, pinned deterministic backward -------


def test_grad_a_keeps_g_in_fp32():
    """fp16 inputs whose dA cancels: two rows with x1 = -x0 and g1 = g0 + ~1e-3, so dA ~ 1e-3·x.
    Rounding g to fp16 (the old kernels) loses ~2% of dA; g kept in fp32 (hi/lo) keeps < 0.1%."""
    k, dtype = 16, torch.float16
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(k, generator=gen, dtype=torch.float64)
    x = torch.stack([x0, -x0]).to(dtype).to(DEVICE)
    weight = torch.randn(2, k, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    lora_A = torch.randn(1, k, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    lora_B = torch.tensor([[1.0], [1e-3]], dtype=dtype, device=DEVICE)
    dy = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=dtype, device=DEVICE)  # g = (1, 1 + 1e-3)
    _, xa = flat_forward(triton_backend, x, weight, None, lora_A, lora_B, 1.0, 0.0, None)
    _, da, _ = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 1.0, 0.0, None, True)
    d64 = [t.double() for t in (dy, x, weight, lora_A, lora_B, xa)]
    _, da_ref, _ = flat_backward(reference_backend, *d64, 1.0, 0.0, None, True)
    rel = ((da.double() - da_ref).abs().max() / da_ref.abs().max()).item()
    assert rel < 1e-3, f"dA relative error {rel:.2e}: g was rounded to fp16"


@pytest.mark.parametrize("schedule", ["F1", "F2"])
def test_dropout_propagates_nan_like_torch(schedule):
    """x·mask·1/(1-p) as torch: a NaN in a *dropped* element still poisons its row of xa, y, and dA
    (never where(keep, x, 0), which would hide it)."""
    m, k, n, r, p = 6, 37, 20, 3, 0.5
    x, weight, bias, lora_A, lora_B, dy, seed = _direct_inputs(m=m, k=k, n=n, r=r)
    keep = dropout_rule.dropout_keep_mask(int(seed.item()), m, k, p)
    row, col = [int(i) for i in (~keep).nonzero()[0]]
    x = x.clone()
    x[row, col] = float("nan")
    y, xa = flat_forward(triton_backend, x, weight, bias, lora_A, lora_B, 0.5, p, seed, schedule=schedule)
    y_ref, xa_ref = flat_forward(reference_backend, x, weight, bias, lora_A, lora_B, 0.5, p, seed)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y[row].isnan().all()
    assert torch.equal(xa.isnan(), xa_ref.isnan())
    x_clean = x.nan_to_num(0.0)
    _, xa_clean = flat_forward(triton_backend, x_clean, weight, bias, lora_A, lora_B, 0.5, p, seed, schedule=schedule)
    _, da, _ = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa_clean, 0.5, p, seed, True)
    assert da[:, col].isnan().all()  # dA = s·gᵀ·(D⊙x): the NaN column survives D = 0


def test_deterministic_backward_never_autotunes(monkeypatch):
    """Deterministic mode launches the pinned dX config itself: the autotuner (whose best_config is
    shared mutable state, and whose choice varies by process) is never called."""
    x, weight, _, lora_A, lora_B, dy, seed = _direct_inputs(m=70)
    _, xa = flat_forward(triton_backend, x, weight, None, lora_A, lora_B, 0.5, 0.1, seed)

    def refuse(*args, **kwargs):
        raise AssertionError("the dX autotuner ran in deterministic mode")

    monkeypatch.setattr(triton_backend.bwd._lora_bwd_dx_kernel, "run", refuse)
    first = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, 0.1, seed, True, deterministic=True)
    second = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, 0.1, seed, True, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="autotuner ran"):
        flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, 0.1, seed, True, deterministic=False)


@pytest.mark.parametrize("m", [1, 70, 300])
def test_backward_persistent_rows_and_chunks(m, monkeypatch):
    """Fewer row programs than row blocks (dA/dB partials revisit rows) and several N chunks (g
    partials summed): still the reference gradients."""
    grid = configs.gdb_grid
    monkeypatch.setattr(configs, "gdb_grid", lambda *a: (min(2, grid(*a)[0]), 2))
    monkeypatch.setattr(configs, "da_row_programs_cap", lambda k, r: 2)
    x, weight, _, lora_A, lora_B, dy, seed = _direct_inputs(m=m, k=37, n=45, r=3)
    plan = triton_backend.bwd.plan_backward(m, 45, 37, 3, x, weight, True, True, True)
    assert plan.g_chunks == 2 and plan.chunk_n == 32  # 45 columns: a 32-column chunk and a 13-column one
    if m > 64:
        assert plan.db_partials == 2 and plan.da_partials == 2
    _, xa = flat_forward(triton_backend, x, weight, None, lora_A, lora_B, 0.5, 0.1, seed)
    want = flat_backward(reference_backend, *(t.double() for t in (dy, x, weight, lora_A, lora_B, xa)), 0.5, 0.1, seed, True)
    for det in (True, False):
        got = flat_backward(triton_backend, dy, x, weight, lora_A, lora_B, xa, 0.5, 0.1, seed, True, deterministic=det)
        for name, g, w in zip(("dx", "dA", "dB"), got, want):
            assert_close(g, w, torch.float32, f"{name} det={det}")


# --- decode split-K forward (F2, M <= 64) --------------------------------------------------------
# K = 300: not a multiple of BLOCK_K, and split into K ranges whose last one is partial.
SPLITK_CASES = [(1, True, 0.0), (7, False, 0.1), (16, True, 0.1), (64, False, 0.0)]


def _splitk_plan_for(m, k, n, dtype):
    return configs.splitk_plan(m, n, k, configs.DEFAULT_SM_COUNT, dtype.itemsize, 16, 2**20)


@pytest.mark.parametrize("deterministic", ["1", "0"], ids=["det", "atomic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", SPLITK_CASES, ids=lambda c: f"M{c[0]}-{'bias' if c[1] else 'nobias'}-p{c[2]}")
def test_splitk_matches_oracle(case, dtype, deterministic, monkeypatch):
    """F2 at decode M runs split-K (the plan splits these shapes): y and every gradient vs the oracle."""
    monkeypatch.setenv("LORA_KERNELS_TRITON_SCHEDULE", "F2")
    monkeypatch.setenv("LORA_KERNELS_TRITON_DETERMINISTIC", deterministic)
    m, bias, p = case
    k, n, r = 300, 40, 3
    if INTERPRET:
        assert _splitk_plan_for(m, k, n, dtype)[1] > 1
    x, weight, b, lora_A, lora_B = make_inputs((m,), k, n, r, dtype, DEVICE, bias=bias)
    _run_and_check(x, weight, b, lora_A, lora_B, 0.75, p, dtype)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_splitk_same_xa_and_close_y_as_unsplit(p, monkeypatch):
    """Split-K changes only the main GEMM's summation: xa (dropout mask included) is bit-identical to
    the unsplit kernel's, y equal up to fp32 rounding, and deterministic mode repeats bit for bit."""
    m, k, n, r, dtype = 16, 300, 40, 3, torch.float32
    x, weight, bias, lora_A, lora_B = make_inputs((m,), k, n, r, dtype, DEVICE)
    seed = torch.tensor([0x1234], dtype=torch.int64, device=DEVICE) if p else None
    fwd = sys.modules["lora_kernels.backends.triton.fwd"]
    args = (x, weight, bias, lora_A, lora_B, 0.75, p, seed)
    y1, xa1 = fwd.lora_forward(*args, schedule="F2")
    y2, _ = fwd.lora_forward(*args, schedule="F2")
    assert torch.equal(y1, y2)
    monkeypatch.setattr(configs, "splitk_plan", lambda *a, **kw: None)
    y0, xa0 = fwd.lora_forward(*args, schedule="F2")
    assert torch.equal(xa1, xa0)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
