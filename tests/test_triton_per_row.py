# SPDX-License-Identifier: Apache-2.0
"""The triton backend's mixed-batch path (per-row adapter ids, `forward_per_row` /
`backward_per_row`, kernels in lora_kernels/backends/triton/per_row.py) against the fp64 oracle
`lora_kernels.reference.lora_linear_per_row_eager`: y, xa and every gradient (dX, dA (T, r, K),
dB (T, N, r)) for uniform tiles, adapters mixed within a tile, base rows (-1), only base rows,
M = 1, decode (M = 64, 32 adapters), ranks padded to a common r, bias or none, non-contiguous x,
M not a multiple of the block, a 4-bit base; and no host sync on the forward path.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (fp32 and fp16; shapes
small), set up as tests/test_triton.py does. The static evidence compiles both kernels for sm80
and sm90 (fp16/bf16) in a subprocess without the interpreter (this file run as a script) and
asserts no spills and shared memory within the arch's limit and the pruner's model.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from lora_kernels.base_weights import DenseWeight
from lora_kernels.contract import LoRAWeights, PerRowSpec, group_rows
from lora_kernels.reference import lora_linear_per_row_eager
from tests.helpers import assert_close, run_compiled

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter cannot do bf16 tl.dot. Tolerances: tests/helpers.TOLERANCES (fp32 2e-4, fp16
# 2e-2, atol = rtol): the kernels accumulate in fp32, the oracle runs in fp64.
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def _kernels():
    """The triton backend with per_row.py decorated for this session's mode (the interpreter
    without a GPU: tests/test_triton.py sets it up and re-decorates the other kernel modules)."""
    test_triton = pytest.importorskip("tests.test_triton", reason="triton is not installed")
    with test_triton._interpreter_env():
        from lora_kernels.backends.triton import per_row

        interpreted = type(per_row._per_row_shrink_kernel.fn).__name__ == "InterpretedFunction"
        if interpreted != test_triton.INTERPRET:  # imported earlier in the other mode
            importlib.reload(per_row)
    return test_triton.triton_backend


@pytest.fixture
def backend(_kernels, monkeypatch):
    """`lora_kernels.backends.triton`, with TRITON_INTERPRET=1 while a test runs (no GPU)."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _kernels


def _inputs(m, k, n, t, r, dtype, bias=True, ranks=None, seed=0):
    """x (M, K), W (N, K), bias (N,) or None, A (T, r, K), B (T, N, r), O(1) terms of y. `ranks`
    (T,): adapter t's rank; its A rows / B columns beyond it are zero (padding to a common r)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x, w, b = rand(m, k), rand(n, k, scale=k**-0.5), rand(n) if bias else None
    a, bb = rand(t, r, k, scale=k**-0.5), rand(t, n, r, scale=r**-0.5)
    for i, rank in enumerate(ranks or ()):
        a[i, rank:] = 0
        bb[i, :, rank:] = 0
    return x, w, b, a, bb


def _spec(ids, t, device=DEVICE):
    scalings = tuple(0.5 + 0.25 * i for i in range(t))
    ids = ids.to(device)
    return PerRowSpec(scalings, group_rows(ids, t))


def _oracle(x, w, bias, a, b, spec, dy):
    """fp64: y, xa (zero rows for base rows) and the gradients of x, A, B for upstream dy."""
    x64, a64, b64 = (v.detach().double().cpu().requires_grad_(True) for v in (x, a, b))
    ids = spec.groups.ids.cpu()
    bias64 = None if bias is None else bias.double().cpu()
    y = lora_linear_per_row_eager(x64, w.double().cpu(), bias64, a64, b64, spec.scalings, ids)
    grads = torch.autograd.grad(y, (x64, a64, b64), dy.double().cpu(), allow_unused=True, materialize_grads=True)
    used = (ids >= 0).double()[:, None]
    xa = torch.einsum("mrk,mk->mr", a64.detach()[ids.clamp(min=0)], x64.detach()) * used
    return y.detach(), xa, grads


def _run(backend, x, w, bias, a, b, ids, dtype, base=None):
    """Forward + backward through the backend's per-row functions against the oracle."""
    t = a.shape[0]
    spec = _spec(ids, t)
    x, w, a, b = (v.to(DEVICE) for v in (x, w, a, b))
    bias = None if bias is None else bias.to(DEVICE)
    weights = LoRAWeights(base or DenseWeight(w), bias, a, b)
    y, xa = backend.forward_per_row(x, weights, spec)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype).to(DEVICE)
    grads = backend.backward_per_row(dy, x, weights, xa, spec, True)
    w_ref = w if base is None else base.dense()
    y_ref, xa_ref, grads_ref = _oracle(x, w_ref, bias, a, b, spec, dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(xa, xa_ref, dtype, "xa")
    assert not xa[spec.groups.ids < 0].any(), "xa of base rows must be 0"
    for name, got, want in zip(("grad_x", "grad_A", "grad_B"), grads, grads_ref):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, name)
    assert backend.backward_per_row(dy, x, weights, xa, spec, False).x is None
    return y, grads


# (M, K, N, T, r, bias, ids): "mixed" draws ids in [-1, T) per row (adapters and base rows
# mixed within every 32-row interpreter tile); M = 37 / 40 leave a ragged last row block.
CASES = {
    "one-adapter": (40, 40, 45, 3, 8, True, lambda m, t: torch.full((m,), 1)),
    "mixed": (37, 40, 45, 4, 8, True, lambda m, t: torch.randint(-1, t, (m,), generator=_gen())),
    "mixed-nobias": (37, 24, 33, 3, 16, False, lambda m, t: torch.randint(-1, t, (m,), generator=_gen())),
    "base-rows-and-one": (37, 40, 45, 3, 8, True, lambda m, t: torch.tensor([-1, 2] * 18 + [2])),
    "all-base": (20, 40, 45, 3, 8, True, lambda m, t: torch.full((m,), -1)),
    "M1": (1, 40, 45, 3, 8, True, lambda m, t: torch.tensor([2])),
    "M1-base": (1, 40, 45, 3, 8, False, lambda m, t: torch.tensor([-1])),
    # decode: 64 rows over 32 adapters (each used twice, interleaved), small K and N
    "decode-32": (64, 32, 48, 32, 8, True, lambda m, t: torch.arange(m) % t),
}


def _gen(seed=5):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle(backend, case, dtype):
    m, k, n, t, r, bias, make_ids = CASES[case]
    x, w, b, a, bb = _inputs(m, k, n, t, r, dtype, bias)
    _run(backend, x, w, b, a, bb, make_ids(m, t), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_ranks_padded_to_a_common_r(backend, dtype):
    """Ranks 8, 16 and 3 zero-padded to r = 16 (as the op pads them); mixed rows and base rows;
    adapter 3 has no rows (its gradients must be exactly 0)."""
    m, k, n, t = 45, 40, 36, 4
    x, w, b, a, bb = _inputs(m, k, n, t, 16, dtype, ranks=(8, 16, 3, 16))
    ids = torch.randint(-1, 3, (m,), generator=_gen(11))
    _, grads = _run(backend, x, w, b, a, bb, ids, dtype)
    assert not grads.lora_A[3].any() and not grads.lora_B[3].any()
    # the padding stays zero in the gradients of B (its columns meet only zero xa columns)
    assert not grads.lora_B[0, :, 8:].any() and not grads.lora_B[2, :, 3:].any()


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_noncontiguous_x(backend, layout):
    k, n, t, r, dtype = 37, 45, 3, 8, torch.float32
    _, w, b, a, bb = _inputs(1, k, n, t, r, dtype)
    big = torch.randn(40, 80, generator=_gen(3), dtype=dtype)
    x = big.t()[:, :k] if layout == "transposed" else big[:, ::2][:, :k]  # (80, 37) or (40, 37)
    assert not x.is_contiguous()
    ids = torch.randint(-1, t, (x.shape[0],), generator=_gen(4))
    _run(backend, x, w, b, a, bb, ids, dtype)


def test_nf4_base(backend):
    """Bonus: a 4-bit (NF4) W₀ through the same GEMM (W_FORMAT 1, dequantized in the main loop);
    the oracle uses its dequantized dense weight."""
    from tests.helpers import make_base

    m, k, n, t, r, dtype = 37, 128, 40, 3, 8, torch.float16
    x, w, b, a, bb = _inputs(m, k, n, t, r, dtype)
    base = make_base("nf4", w.to(DEVICE))
    _run(backend, x, w, b, a, bb, torch.randint(-1, t, (m,), generator=_gen(6)), dtype, base=base)


def test_forward_has_no_host_sync(backend, monkeypatch):
    """The forward path never reads a device value on the host (no .item(), .tolist(),
    bincount, nonzero): a GPU decode step does not wait on the grouping."""
    m, k, n, t, r, dtype = 33, 32, 40, 5, 8, torch.float32
    x, w, b, a, bb = _inputs(m, k, n, t, r, dtype)
    spec = _spec(torch.randint(-1, t, (m,), generator=_gen(8)), t)
    weights = LoRAWeights(DenseWeight(w.to(DEVICE)), b.to(DEVICE), a.to(DEVICE), bb.to(DEVICE))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync on the per-row forward path")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "bincount", refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    y, xa = backend.forward_per_row(x.to(DEVICE), weights, spec)
    monkeypatch.undo()
    y_ref, xa_ref, _ = _oracle(x, w, b, a, bb, spec, torch.zeros(m, n))
    assert_close(y, y_ref, dtype, "y")


def test_zero_rows(backend):
    k, n, t, r = 40, 45, 3, 8
    x, w, b, a, bb = _inputs(0, k, n, t, r, torch.float32)
    spec = _spec(torch.zeros(0, dtype=torch.int64), t)
    weights = LoRAWeights(DenseWeight(w.to(DEVICE)), b.to(DEVICE), a.to(DEVICE), bb.to(DEVICE))
    y, xa = backend.forward_per_row(x.to(DEVICE), weights, spec)
    assert y.shape == (0, n) and xa.shape == (0, r)
    dx, da, db = backend.backward_per_row(torch.zeros(0, n, device=DEVICE), x.to(DEVICE), weights, xa, spec, True)
    assert dx.shape == (0, k) and da.shape == (t, r, k) and db.shape == (t, n, r) and not da.any() and not db.any()


def test_registered_variant():
    from lora_kernels.backends import BACKENDS

    assert "per_row" in BACKENDS["triton"].variants and "lora" in BACKENDS["triton"].variants


# --- static evidence: compiled for sm80 / sm90 without a GPU -------------------------------------

ARCHS = (80, 86, 90)
STATIC_DTYPES = ("fp16", "bf16")
STATIC_R_PADS = (16, 32, 64, 128, 256)
_INT64_PTRS = {"ids_ptr", "order_ptr", "starts_ptr"}
_FP32_PTRS = {"scale_ptr", "absmax_ptr", "code_ptr"}
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_xar", "stride_yn"}


def _compile(kernel, consts, cfg, arch, dtype):
    """Compile one per-row kernel for sm`arch` as a launch on contiguous, 16-byte aligned tensors
    specialises it (unit strides constexpr 1; ids/order int64, scalings fp32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    consts = dict(consts, **cfg.kwargs, **{s: 1 for s in _UNIT_STRIDES if s in fn.arg_names})
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in _INT64_PTRS else "*fp32" if name in _FP32_PTRS else f"*{dtype}"
            if name == "w_ptr" and consts.get("W_FORMAT"):
                sig[name] = "*u8"
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and name not in ("R", "T", "M_BUCKET")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _selectable(arch, dtype, r_pad):
    """(kernel name, constexprs, configs, smem model) per kernel: every config the pruners can
    select over the M buckets (decode and large), for a dense and a 4-bit W₀."""
    from lora_kernels.backends.triton import configs, per_row

    limit = configs.SMEM_LIMIT_BY_ARCH[arch]
    elem = 2
    meta = torch.empty(0, dtype=torch.float16)
    gemm = configs.gemm_configs(interpret=False, capability=(arch // 10, arch % 10))
    buckets = (1, 16, 64, 256, 8192)

    def unique(cfgs):
        return list({repr(c): c for c in cfgs}.values())

    def fwd_model(wf):
        def model(c):
            kw = c.kwargs
            return configs.smem_fwd(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, elem, r_pad, False, wf)
        return model

    def shrink_model(c):
        return configs.smem_xa(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, r_pad)

    def fwd_cfgs(wf):
        w = torch.empty(0, dtype=torch.uint8) if wf else meta
        return unique([c for bk in buckets for c in per_row.prune_fwd(
            gemm, {"M_BUCKET": bk, "w_ptr": w, "x_ptr": meta}, R_PAD=r_pad, SMEM_LIMIT=limit, W_FORMAT=wf)])

    xa_cfgs = [c for bk in buckets for c in configs.prune_stream(configs.xa_configs(interpret=False),
                                                                   {"M_BUCKET": bk, "x_ptr": meta},
                                                                   R_PAD=r_pad, SMEM_LIMIT=limit)]
    dense = dict(HAS_BIAS=True, R_PAD=r_pad, DOT_PRECISION="ieee", W_FORMAT=0, QBLOCK=1, absmax_ptr=None,
                 code_ptr=None)
    four_bit = dict(HAS_BIAS=True, R_PAD=r_pad, DOT_PRECISION="ieee", W_FORMAT=1, QBLOCK=64)
    return limit, [
        ("fwd", per_row._per_row_fwd_kernel, dense, fwd_cfgs(0), fwd_model(0)),
        ("fwd 4bit", per_row._per_row_fwd_kernel, four_bit, fwd_cfgs(1), fwd_model(1)),
        ("shrink", per_row._per_row_shrink_kernel, dict(R_PAD=r_pad, DOT_PRECISION="ieee"), unique(xa_cfgs),
         shrink_model),
    ]


def _static_row(job):
    """One compiled (arch, dtype, R_PAD, kernel, config): a dict with the compiled shared memory,
    the model, the limit, registers and spill bytes (ptxas -v)."""
    from lora_kernels.backends.triton.compile_check import ptxas_usage

    arch, dtype, r_pad, index, c_index = job
    limit, kernels = _selectable(arch, dtype, r_pad)
    name, kernel, consts, cfgs, model = kernels[index]
    c = cfgs[c_index]
    k = _compile(kernel, consts, c, arch, dtype)
    regs, spill = ptxas_usage(k.asm["ptx"], arch)
    return dict(arch=arch, dtype=dtype, r_pad=r_pad, kernel=name, config=dict(c.kwargs), warps=c.num_warps,
                stages=c.num_stages, smem=k.metadata.shared, smem_model=model(c), smem_limit=limit, regs=regs,
                spill=spill)


def static_rows():
    """Every (arch, dtype, R_PAD, kernel, config) of `_selectable` compiled (one process per core)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(arch, dtype, r_pad, i, j) for arch in ARCHS for dtype in STATIC_DTYPES for r_pad in STATIC_R_PADS
            for i, (_, _, _, cfgs, _) in enumerate(_selectable(arch, dtype, r_pad)[1]) for j in range(len(cfgs))]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_static_row, jobs, chunksize=8))


@pytest.mark.parametrize("arch", ARCHS)
def test_selectable_gemm_tiles(_kernels, arch):
    """The forward GEMM's pruner keeps only tiles the full sweep compiled spill-free (per_row.py:
    <= 64 accumulators a thread, not the 8-warp 128x64 mask-room tile), for every M bucket and
    R_PAD up to 256 and both 16-bit dtypes, and keeps at least one; a 4-bit W₀ keeps its large tile."""
    from lora_kernels.backends.triton import configs
    from lora_kernels.backends.triton import per_row as triton_per_row  # imported by _kernels in this session's mode

    gemm = configs.gemm_configs(interpret=False, capability=(arch // 10, arch % 10))
    for dtype in (torch.float16, torch.bfloat16):
        for r_pad in (16, 32, 64, 128, 256):
            for bucket in (1, 16, 64, 256, 8192):
                kept = triton_per_row.prune_fwd(gemm, {"M_BUCKET": bucket, "w_ptr": torch.empty(0, dtype=dtype)},
                                                R_PAD=r_pad, SMEM_LIMIT=configs.SMEM_LIMIT_BY_ARCH[arch])
                assert kept
                for c in kept:
                    kw = c.kwargs
                    assert kw["BLOCK_M"] * kw["BLOCK_N"] <= 64 * 32 * c.num_warps, c
                    assert (kw["BLOCK_M"], kw["BLOCK_N"], c.num_warps) != (128, 64, 8), c
                # a 4-bit W₀ keeps its large tile (compiled spill-free for this kernel)
                named = {"M_BUCKET": bucket, "w_ptr": torch.empty(0, dtype=torch.uint8),
                         "x_ptr": torch.empty(0, dtype=dtype)}
                kept = triton_per_row.prune_fwd(gemm, named, R_PAD=r_pad, W_FORMAT=1,
                                                SMEM_LIMIT=configs.SMEM_LIMIT_BY_ARCH[arch])
                large = configs._W4_SM90 if arch >= 90 else configs._W4_SM80
                # (sm86's 99 KB of shared memory leave that tile out)
                assert arch == 86 or bucket < 256 or r_pad > 64 or any(configs._tiles(c, "BLOCK_N", "BLOCK_K") in large
                                                          for c in kept), kept


def test_static_compiled_sm80_sm86_sm90():
    """Both kernels (the GEMM with a dense and a 4-bit W₀) compile for sm80, sm86 and sm90 in fp16
    and bf16 at every R_PAD 16..256, in every config the pruners can select over the M buckets:
    no spill stores, shared memory within the arch's per-block limit and within the model the
    pruner used."""
    proc = run_compiled([os.path.abspath(__file__)], timeout=1200)  # the kernels compiled, not interpreted
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["arch"], r["dtype"], r["kernel"]) for r in rows} == {
        (a, d, k) for a in ARCHS for d in STATIC_DTYPES for k in ("fwd", "fwd 4bit", "shrink")}
    for r in rows:
        assert r["spill"] == 0 and r["regs"] > 0, r
        assert r["smem"] <= r["smem_limit"] and r["smem"] <= r["smem_model"], r


if __name__ == "__main__":  # the static rows as JSON lines (run without TRITON_INTERPRET)
    for row in static_rows():
        print(json.dumps(row), flush=True)
