# SPDX-License-Identifier: Apache-2.0
"""The `cuda` backend (csrc/cuda): build/registration checks, the kernels run on the CPU through the
emulation (csrc/cuda/emulation), and — on a GPU — the real thing.

Three layers, so that something meaningful runs everywhere:
* registration and argument checks that need no GPU;
* the emulated backend: the same kernel sources, launch plans and op layer compiled for the CPU
  (`lora_kernels_emu::*`), checked against the oracle on small shapes whose plans exercise every
  code path (split-K, several spans, partial-sum reductions, rank chunks, the GEMM fallback);
* `@pytest.mark.gpu` tests of the compiled CUDA kernels (skipped, with the reason, without a GPU).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

import lora_kernels
from lora_kernels import _extension
from lora_kernels import dropout as dropout_rule
from lora_kernels.backends import reference as reference_backend
from helpers import assert_close, eager_same_dtype, flat_backward, flat_forward, make_inputs, oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SEEDS = [0, 1, 2**31 - 1, 2**32 + 5, 0x0123456789ABCDEF, 2**62 - 1]


def _has_cuda_kernels() -> bool:
    return _extension.load_error() is None and _extension.has_kernel("cuda")


requires_gpu_backend = pytest.mark.skipif(
    not (torch.cuda.is_available() and _has_cuda_kernels()),
    reason="needs a CUDA GPU and lora_kernels._C built with the cuda kernels",
)


# --- registration and checks (no GPU) -------------------------------------------------------------


@pytest.mark.skipif(_extension.load_error() is not None, reason="lora_kernels._C is not built")
@pytest.mark.skipif(
    not _extension.cuda_build_expected(),
    reason="this build has no CUDA kernels by design (setup.py's rule: no GPU visible, no CUDA torch/nvcc, "
    "or LORA_KERNELS_CUDA=0; LORA_KERNELS_CUDA=1 forces them)",
)
@pytest.mark.parametrize("op", ["fused_forward", "fused_backward", "dropout_keep_mask"])
def test_cuda_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{op}", "CUDA"), (
        f"setup.py's rule says this build has CUDA kernels, but lora_kernels._C has no CUDA kernel for {op}: rebuild "
        "(pip install --no-build-isolation -e .), or set LORA_KERNELS_CUDA=0 if the build is CPU-only on purpose"
    )


def test_cuda_backend_rejects_cpu_tensors():
    x, w, b, A, B = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="backend 'cuda'.*cuda"):
        lora_kernels.lora_linear(x, w, b, A, B, 1.0, backend="cuda")


@pytest.mark.skipif(
    _extension.load_error() is not None
    or not torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::dropout_keep_mask", "CPU"),
    reason="lora_kernels._C with the CPU dropout_keep_mask is not built",
)
@pytest.mark.parametrize("seed", SEEDS, ids=hex)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 37), (9, 13), (4, 64), (2, 1001)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_generator_matches_mirror(seed, rows, cols, p):
    # The shared header's host path (what the CUDA kernels run on the device) against the Python mirror.
    got = torch.ops.lora_kernels.dropout_keep_mask(torch.tensor([seed]), rows, cols, p)
    assert torch.equal(got, dropout_rule.dropout_keep_mask(seed, rows, cols, p))


# --- the emulated backend -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emu():
    """torch.ops.lora_kernels_emu: the cuda backend compiled for the CPU (built once per source state)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulation uses ucontext fibers (Linux)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the emulated cuda backend")
    from cuda_static_report import load_emulation

    return load_emulation()


def _run_pair(ops, x, w, b, A, B, scaling, p, seed, grad_y, compute_dx=True):
    y, xa = ops.fused_forward(x, w, b, A, B, scaling, p, seed)
    gx, gA, gB = ops.fused_backward(grad_y, x, w, A, B, xa, scaling, p, seed, compute_dx)
    return y, xa, gx, gA, gB


def check_ops_against_oracle(
    ops, M, K, N, r, dtype, p, bias=True, layout="contiguous", compute_dx=True, seed=1234, with_weight=True
):
    """ops.fused_forward + ops.fused_backward (the compiled ops, or the emulated ones, on CPU tensors)
    against the fp64 oracle, x laid out as `layout` says. with_weight=False calls them with weight
    None: the expected values are then the full op's minus the base product (x·Wᵀ, dY·W), and the
    same-dtype baseline the eager maths on a zero weight."""
    x, w, b, A, B = make_inputs((M,), K, N, r, dtype, bias=bias, requires_grad=False)
    if layout == "strided":  # every other column of a wider tensor: row stride 2K, column stride 2
        wide = torch.zeros(M, 2 * K, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif layout == "transposed":  # column-major
        x = x.t().contiguous().t()
    elif layout == "row_slice":  # unit column stride, row stride K + 8
        wide = torch.zeros(M, K + 8, dtype=dtype)
        wide[:, :K] = x
        x = wide[:, :K]
    seed_t = torch.tensor([seed]) if p > 0 else None
    grad_y = torch.randn(M, N, dtype=torch.float64).to(dtype)
    scaling = 0.75
    y, xa, gx, gA, gB = _run_pair(ops, x, w if with_weight else None, b, A, B, scaling, p, seed_t, grad_y, compute_dx)
    y_ref, (gx_ref, gA_ref, gB_ref) = oracle(x, w, b, A, B, scaling, p, seed_t, grad_y)
    y_e, (gx_e, gA_e, gB_e) = eager_same_dtype(
        x, w if with_weight else torch.zeros_like(w), b, A, B, scaling, p, seed_t, grad_y
    )
    if not with_weight:
        y_ref = y_ref - x.double() @ w.double().t()
        gx_ref = gx_ref - grad_y.double() @ w.double()
    _, xa_ref = flat_forward(reference_backend, x.double(), w.double(), None, A.double(), B.double(), scaling, p, seed_t)
    _, xa_e = flat_forward(reference_backend, x, w, None, A, B, scaling, p, seed_t)
    for t in (y, xa, gA, gB):
        assert t.dtype == dtype
    assert_close(y, y_ref, dtype, "y", y_e)
    assert_close(xa, xa_ref, dtype, "xa", xa_e)
    if compute_dx:
        assert_close(gx, gx_ref, dtype, "grad_x", gx_e)
    else:
        assert gx.numel() == 0
    assert_close(gA, gA_ref, dtype, "grad_A", gA_e)
    assert_close(gB, gB_ref, dtype, "grad_B", gB_e)


# (M, K, N, r, dtype, p, bias, layout, env): small shapes whose plans, on the emulated 2-SM device,
# cover split-K, several row/column spans, partial reductions, rank chunks and the dY GEMM route.
EMU_CASES = [
    (5, 16, 24, 4, torch.float32, 0.0, True, "contiguous", {}),
    (37, 37, 45, 3, torch.float32, 0.1, True, "contiguous", {}),
    (37, 37, 45, 16, torch.float16, 0.1, False, "contiguous", {}),
    (37, 37, 45, 1, torch.bfloat16, 0.5, True, "strided", {}),
    (1, 64, 40, 3, torch.float16, 0.1, True, "contiguous", {}),
    (1, 1030, 70, 8, torch.bfloat16, 0.1, True, "contiguous", {}),  # split-K, unaligned groups
    (130, 40, 70, 64, torch.float16, 0.1, True, "contiguous", {}),
    (130, 40, 70, 64, torch.float32, 0.1, False, "transposed", {}),  # two rank chunks in fp32
    (130, 40, 70, 80, torch.float16, 0.2, True, "contiguous", {}),  # rank chunks: unfused dX prefill
    (300, 200, 333, 16, torch.float16, 0.1, True, "row_slice", {"LORA_KERNELS_CUDA_DY_PASS": "fused"}),
    (300, 200, 333, 5, torch.bfloat16, 0.3, True, "contiguous",
     {"LORA_KERNELS_EMU_ACC_BUDGET": "1", "LORA_KERNELS_EMU_SMS": "4", "LORA_KERNELS_CUDA_DY_PASS": "fused"}),
    (260, 96, 200, 40, torch.float32, 0.1, True, "contiguous",
     {"LORA_KERNELS_EMU_ACC_BUDGET": "1", "LORA_KERNELS_EMU_SMS": "6", "LORA_KERNELS_CUDA_DY_PASS": "fused"}),
    (200, 96, 72, 16, torch.float16, 0.1, True, "contiguous", {"LORA_KERNELS_CUDA_DY_PASS": "gemm"}),
    (37, 37, 45, 3, torch.float64, 0.1, True, "contiguous", {}),
    (130, 64, 50, 20, torch.float64, 0.5, True, "strided", {"LORA_KERNELS_EMU_ACC_BUDGET": "1"}),
]


def _case_id(case):
    M, K, N, r, dtype, p, bias, layout, env = case
    knobs = "-".join(f"{k.split('_')[-1].lower()}{v}" for k, v in env.items())
    return f"M{M}-K{K}-N{N}-r{r}-{str(dtype).split('.')[-1]}-p{p}-{'bias' if bias else 'nobias'}-{layout}" + (
        f"-{knobs}" if knobs else ""
    )


@pytest.mark.parametrize("case", EMU_CASES, ids=[_case_id(c) for c in EMU_CASES])
def test_emulated_matches_oracle(emu, monkeypatch, case):
    M, K, N, r, dtype, p, bias, layout, env = case
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    check_ops_against_oracle(emu, M, K, N, r, dtype, p, bias=bias, layout=layout)


def test_emulated_cases_cover_every_path(emu, monkeypatch):
    hit = {}
    for M, K, N, r, dtype, _, _, _, env in EMU_CASES:
        with monkeypatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            splits, proj_rc, dy_m, dy_c, dy_rc, dy_gemm, x_m, x_c, x_rc = emu.plan_info(M, K, N, r, dtype)
        for name, used in {
            "split-K projection": splits > 1,
            "projection rank chunks": proj_rc > 1,
            "fused dY pass": not dy_gemm,
            "dY row spans": dy_m > 1 and not dy_gemm,
            "dY column spans": dy_c > 1 and not dy_gemm,
            "dY rank chunks": dy_rc > 1 and not dy_gemm,
            "dY via two GEMMs": bool(dy_gemm),
            "x row spans": x_m > 1,
            "x column spans": x_c > 1,
            "x rank chunks (unfused dX prefill)": x_rc > 1,
            "fused dX prefill": x_rc == 1,
        }.items():
            hit[name] = hit.get(name, False) or used
    missing = sorted(name for name, used in hit.items() if not used)
    assert not missing, f"no emulated case exercises: {missing}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_without_grad_x(emu, dtype):
    check_ops_against_oracle(emu, 70, 48, 40, 8, dtype, 0.1, compute_dx=False)


def check_base_is_a_separate_step(ops, M, K, N, r, dtype, p):
    """The ops with a weight equal, bit for bit, the ops without one followed by the base product
    as its own step, the in-place beta = 1 GEMM the kernels run (what a base_weights format adds):
    y = y_lora.addmm_(x, Wᵀ), dX = dX_lora.addmm_(dY, W); xa, dA, dB do not depend on W."""
    x, w, b, A, B = make_inputs((M,), K, N, r, dtype, requires_grad=False)
    seed = torch.tensor([77]) if p > 0 else None
    grad_y = torch.randn(M, N, dtype=torch.float64).to(dtype)
    y, xa, gx, gA, gB = _run_pair(ops, x, w, b, A, B, 0.75, p, seed, grad_y)
    y0, xa0, gx0, gA0, gB0 = _run_pair(ops, x, None, b, A, B, 0.75, p, seed, grad_y)
    assert torch.equal(y, y0.clone().addmm_(x, w.t()))
    assert torch.equal(gx, gx0.clone().addmm_(grad_y, w))
    for name, got, want in (("xa", xa0, xa), ("grad_A", gA0, gA), ("grad_B", gB0, gB)):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_emulated_without_weight(emu, dtype, p):
    check_ops_against_oracle(emu, 37, 37, 45, 3, dtype, p, with_weight=False)


@pytest.mark.parametrize(
    "M,K,N,r,dtype,p,bias,compute_dx",
    [
        (130, 40, 70, 80, torch.float16, 0.2, True, True),  # rank chunks: the unfused dX prefill
        (70, 48, 40, 8, torch.float32, 0.1, False, False),  # no bias, no grad_x
        (1, 1030, 70, 8, torch.bfloat16, 0.1, True, True),  # split-K projection
    ],
    ids=["r80-unfused-prefill", "nobias-nodx", "split-K"],
)
def test_emulated_without_weight_paths(emu, M, K, N, r, dtype, p, bias, compute_dx):
    check_ops_against_oracle(emu, M, K, N, r, dtype, p, bias=bias, compute_dx=compute_dx, with_weight=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_emulated_base_is_a_separate_step(emu, dtype, p):
    check_base_is_a_separate_step(emu, 37, 37, 45, 3, dtype, p)


@pytest.mark.parametrize("seed", SEEDS, ids=hex)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 37), (9, 13), (2, 1001)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_emulated_keep_mask_matches_mirror(emu, seed, rows, cols, p):
    got = emu.dropout_keep_mask(torch.tensor([seed]), rows, cols, p)
    assert got.dtype == torch.bool and torch.equal(got, dropout_rule.dropout_keep_mask(seed, rows, cols, p))


def _mask_via_forward(forward, M, K, p, seed, device):
    """The keep-mask a backend's forward applies: with x = 1 and A = I (r = K), xa = keep / (1 - p)."""
    x = torch.ones(M, K, device=device)
    A = torch.eye(K, device=device)
    w = torch.zeros(3, K, device=device)
    B = torch.zeros(3, K, device=device)
    _, xa = forward(x, w, None, A, B, 1.0, p, torch.tensor([seed], device=device))
    return xa != 0


@pytest.mark.parametrize("seed", [7, 2**40 + 3], ids=hex)
def test_emulated_forward_applies_the_mirror_mask(emu, seed):
    got = _mask_via_forward(emu.fused_forward, 21, 37, 0.5, seed, "cpu")
    assert torch.equal(got, dropout_rule.dropout_keep_mask(seed, 21, 37, 0.5))


def test_emulated_is_deterministic(emu, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_EMU_SMS", "4")
    monkeypatch.setenv("LORA_KERNELS_CUDA_DY_PASS", "fused")
    x, w, b, A, B = make_inputs((260,), 96, 130, 16, torch.float16, requires_grad=False)
    gy = torch.randn(260, 130).half()
    seed = torch.tensor([5])
    first = _run_pair(emu, x, w, b, A, B, 0.5, 0.1, seed, gy)
    second = _run_pair(emu, x, w, b, A, B, 0.5, 0.1, seed, gy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_emulated_zero_rows(emu):
    x, w, b, A, B = make_inputs((0,), 16, 8, 4, torch.float32, requires_grad=False)
    y, xa, gx, gA, gB = _run_pair(emu, x, w, b, A, B, 1.0, 0.1, torch.tensor([1]), torch.zeros(0, 8))
    assert y.shape == (0, 8) and xa.shape == (0, 4) and gx.shape == (0, 16)
    assert not gA.any() and not gB.any()


def _bad_input_cases():
    def base():
        x, w, b, A, B = make_inputs((6,), 16, 8, 4, torch.float32, requires_grad=False)
        return dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, seed=torch.tensor([3]), p=0.1)

    def edit(name, fn, match):
        args = base()
        fn(args)
        return pytest.param(args, match, id=name)

    return [
        edit("x-int", lambda a: a.update(x=a["x"].long()), "x must be float16, bfloat16, float32 or float64"),
        edit("x-3d", lambda a: a.update(x=a["x"][None]), "x must be 2-D"),
        edit("weight-dtype", lambda a: a.update(weight=a["weight"].double()), "weight must have x's dtype"),
        edit("weight-noncontig", lambda a: a.update(weight=a["weight"].t().contiguous().t()), "weight must be contiguous"),
        edit("lora_A-shape", lambda a: a.update(lora_A=a["lora_A"][:, :8]), r"lora_A must be \(r, K\)"),
        edit("lora_B-shape", lambda a: a.update(lora_B=a["lora_B"][:, :2]), r"lora_B must be \(N, r\)"),
        edit("bias-shape", lambda a: a.update(bias=a["bias"][:3]), r"bias must be \(N,\)"),
        edit("seed-dtype", lambda a: a.update(seed=a["seed"].float()), "seed must be int64"),
        edit("seed-shape", lambda a: a.update(seed=torch.tensor([1, 2])), r"seed must have shape \(1,\)"),
        edit("dropout_p", lambda a: a.update(p=1.0), r"dropout_p must be in \[0, 1\)"),
        # Without a weight, N comes from lora_B and no check may speak of the weight.
        edit("noweight-lora_B-1d", lambda a: a.update(weight=None, lora_B=a["lora_B"][:, 0]), r"lora_B must be 2-D \(N, r\)"),
        edit("noweight-lora_B-rank", lambda a: a.update(weight=None, lora_B=a["lora_B"][:, :2]), r"lora_B must be \(N, r\)"),
        edit("noweight-lora_B-N0", lambda a: a.update(weight=None, bias=None, lora_B=a["lora_B"][:0]), "with N >= 1"),
        edit("noweight-bias-shape", lambda a: a.update(weight=None, bias=a["bias"][:3]), r"bias must be \(N,\) = \(8,\)"),
        edit("noweight-x-K0", lambda a: a.update(weight=None, x=a["x"][:, :0], lora_A=a["lora_A"][:, :0]), "with K >= 1"),
        edit("noweight-lora_A-dtype", lambda a: a.update(weight=None, lora_A=a["lora_A"].double()), "lora_A must have x's dtype"),
    ]


@pytest.mark.parametrize("args,match", _bad_input_cases())
def test_emulated_argument_checks(emu, args, match):
    with pytest.raises(RuntimeError, match=match) as err:
        emu.fused_forward(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 1.0, args["p"], args["seed"])
    if args["weight"] is None:
        assert "weight" not in str(err.value)


def test_emulated_backward_checks_grad_y(emu):
    x, w, b, A, B = make_inputs((6,), 16, 8, 4, torch.float32, requires_grad=False)
    y, xa = emu.fused_forward(x, w, b, A, B, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="grad_y must be contiguous"):
        emu.fused_backward(torch.zeros(8, 6).t(), x, w, A, B, xa, 1.0, 0.0, None, True)
    with pytest.raises(RuntimeError, match=r"xa must be \(M, r\)"):
        emu.fused_backward(torch.zeros(6, 8), x, w, A, B, xa[:, :2], 1.0, 0.0, None, True)
    with pytest.raises(RuntimeError, match=r"grad_y must be \(M, N\) = \(6, 8\)") as err:  # N from lora_B
        emu.fused_backward(torch.zeros(6, 7), x, None, A, B, xa, 1.0, 0.0, None, True)
    assert "weight" not in str(err.value)


# --- on a GPU -------------------------------------------------------------------------------------


def _gpu_case(M, K, N, r, dtype, bias, layout):
    """CPU inputs for the oracle and their CUDA copies (x laid out as asked)."""
    x, w, b, A, B = make_inputs((M,), K, N, r, dtype, bias=bias, requires_grad=False)
    dev = torch.device("cuda")
    if layout == "strided":  # every other column of a wider tensor
        xg = torch.zeros(M, 2 * K, dtype=dtype, device=dev)[:, ::2]
        xg.copy_(x)
    else:
        xg = x.to(dev)
    return (x, w, b, A, B), (xg,) + tuple(None if t is None else t.to(dev) for t in (w, b, A, B))


@pytest.mark.gpu
@requires_gpu_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "M,K,N,r,p,bias,layout",
    [
        (64, 37, 45, 1, 0.0, True, "contiguous"),
        (64, 37, 45, 3, 0.1, False, "contiguous"),
        (1, 64, 45, 16, 0.1, True, "contiguous"),
        (300, 256, 200, 64, 0.1, True, "strided"),
        (300, 96, 200, 80, 0.5, True, "contiguous"),
        (1000, 512, 384, 16, 0.1, True, "contiguous"),
    ],
)
def test_gpu_lora_linear_matches_oracle(dtype, M, K, N, r, p, bias, layout):
    (x, w, b, A, B), (xg, wg, bg, Ag, Bg) = _gpu_case(M, K, N, r, dtype, bias, layout)
    leaves = [xg.requires_grad_(True), Ag.requires_grad_(True), Bg.requires_grad_(True)]
    torch.manual_seed(3)
    y = lora_kernels.lora_linear(xg, wg, bg, Ag, Bg, 0.5, dropout_p=p, backend="cuda")
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    torch.manual_seed(3)  # the same seed draw as the call above
    seed = dropout_rule.draw_seed("cuda") if p > 0 else None
    y_ref, grads_ref = oracle(x, w, b, A, B, 0.5, p, None if seed is None else seed.cpu(), grad_y.cpu())
    y_e, grads_e = eager_same_dtype(xg, wg, bg, Ag, Bg, 0.5, p, seed, grad_y)
    assert_close(y, y_ref, dtype, "y", y_e)
    for name, got, want, base in zip(("grad_x", "grad_A", "grad_B"), grads, grads_ref, grads_e):
        assert_close(got, want, dtype, name, base)


def _relative_check(got, ref32, eager, name):
    """Large shapes: the error against an fp32 reference must be at most twice a same-dtype eager
    computation's (flash-attention's criterion), plus a small floor."""
    err = (got.float() - ref32).abs().max().item()
    base = (eager.float() - ref32).abs().max().item()
    scale = ref32.abs().max().item()
    assert err <= 2 * base + 1e-3 * scale, f"{name}: max error {err} vs eager {base} (max |ref| {scale})"


def _reference_fp32(x, w, b, A, B, s, p, seed, grad_y):
    """fp32 forward and gradients on the GPU, by plain torch ops (the masked x only in fp32 chunks)."""
    M, K = x.shape
    keep = None if seed is None else dropout_rule.dropout_keep_mask(int(seed.item()), M, K, p, device=x.device)
    xf = x.float()
    x_l = xf if keep is None else xf * keep * (1.0 / (1.0 - p))
    xa = x_l @ A.float().t()
    y = xf @ w.float().t() + (0 if b is None else b.float()) + s * xa @ B.float().t()
    g = grad_y.float() @ B.float()
    dA = s * g.t() @ x_l
    dB = s * grad_y.float().t() @ xa
    lora_dx = s * g @ A.float()
    dx = grad_y.float() @ w.float() + (lora_dx if keep is None else lora_dx * keep * (1.0 / (1.0 - p)))
    return y, xa, dx, dA, dB


@pytest.mark.gpu
@pytest.mark.slow
@requires_gpu_backend
@pytest.mark.parametrize(
    "M,K,N,r", [(16384, 4096, 4096, 16), (4096, 4096, 14336, 16), (4096, 14336, 4096, 64)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_gpu_large_shapes(M, K, N, r, dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, generator=g).to(dtype)
    w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(dtype)
    b = torch.randn(N, device=dev, generator=g).to(dtype)
    A = (torch.randn(r, K, device=dev, generator=g) * K**-0.5).to(dtype)
    B = (torch.randn(N, r, device=dev, generator=g) * r**-0.5).to(dtype)
    grad_y = torch.randn(M, N, device=dev, generator=g).to(dtype)
    seed = torch.tensor([12345], device=dev)
    ops = torch.ops.lora_kernels
    y, xa = ops.fused_forward(x, w, b, A, B, 2.0, 0.1, seed)
    dx, dA, dB = ops.fused_backward(grad_y, x, w, A, B, xa, 2.0, 0.1, seed, True)
    ref = _reference_fp32(x, w, b, A, B, 2.0, 0.1, seed, grad_y)
    eager_y, eager_xa = flat_forward(reference_backend, x, w, b, A, B, 2.0, 0.1, seed)
    eager = (eager_y, eager_xa) + tuple(flat_backward(reference_backend, grad_y, x, w, A, B, eager_xa, 2.0, 0.1, seed, True))
    for name, got, want, base in zip(("y", "xa", "grad_x", "grad_A", "grad_B"), (y, xa, dx, dA, dB), ref, eager):
        _relative_check(got, want, base, name)


def _mirror_rows(seed, row0, rows, cols, p, device):
    """The mirror's keep-mask of rows [row0, row0 + rows) of a (*, cols) input, computed from the
    groups those rows cover only (flat indices past 2**31 without the rows before them)."""
    start, end = row0 * cols, (row0 + rows) * cols
    g0, g1 = start // 8, (end + 7) // 8
    words = torch.stack(dropout_rule.philox4x32(torch.arange(g0, g1, dtype=torch.int64, device=device), seed), dim=1)
    lanes = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=2).reshape(-1)[start - 8 * g0 : end - 8 * g0]
    return (lanes >= dropout_rule.dropout_threshold(p)).reshape(rows, cols)


def test_mirror_rows_helper():
    want = dropout_rule.dropout_keep_mask(9, 11, 13, 0.3)
    assert torch.equal(_mirror_rows(9, 4, 5, 13, 0.3, "cpu"), want[4:9])


@pytest.mark.gpu
@pytest.mark.slow
@requires_gpu_backend
def test_gpu_flat_indices_past_2_31():
    """M·K > 2**31: 64-bit offsets and Philox counters past 2**28 groups; rows near the end checked."""
    dev = torch.device("cuda")
    K, N, r, p, s, seed_v = 4096, 64, 16, 0.25, 1.5, 77
    M = 2**31 // K + 300
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
    w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).bfloat16()
    A = (torch.randn(r, K, device=dev, generator=g) * K**-0.5).bfloat16()
    B = (torch.randn(N, r, device=dev, generator=g) * r**-0.5).bfloat16()
    grad_y = torch.randn(M, N, device=dev, generator=g, dtype=torch.bfloat16)
    seed = torch.tensor([seed_v], device=dev)
    ops = torch.ops.lora_kernels
    y, xa = ops.fused_forward(x, w, None, A, B, s, p, seed)
    dx, dA, dB = ops.fused_backward(grad_y, x, w, A, B, xa, s, p, seed, True)
    tail = slice(M - 400, M)  # flat indices past 2**31
    keep = _mirror_rows(seed_v, M - 400, 400, K, p, dev)
    x_l = x[tail].float() * keep / (1 - p)
    xa_ref = x_l @ A.float().t()
    _relative_check(xa[tail], xa_ref, (x[tail] * keep.bfloat16() / (1 - p)) @ A.t(), "xa (tail rows)")
    y_ref = x[tail].float() @ w.float().t() + s * xa_ref @ B.float().t()
    _relative_check(y[tail], y_ref, (x[tail] @ w.t() + s * (xa[tail] @ B.t())), "y (tail rows)")
    gt = grad_y[tail].float() @ B.float()
    dx_ref = grad_y[tail].float() @ w.float() + s * (gt @ A.float()) * keep / (1 - p)
    _relative_check(dx[tail], dx_ref, grad_y[tail] @ w + (s * (grad_y[tail] @ B) @ A) * keep.bfloat16() / (1 - p), "grad_x (tail rows)")
    assert torch.equal(ops.dropout_keep_mask(seed, M, K, p)[tail].cpu(), keep.cpu())
    # dA, dB over all rows, accumulated in fp32 chunks.
    dA_ref = torch.zeros(r, K, device=dev)
    dB_ref = torch.zeros(N, r, device=dev)
    for m0 in range(0, M, 16384):
        rows = slice(m0, min(M, m0 + 16384))
        kc = _mirror_rows(seed_v, m0, rows.stop - m0, K, p, dev)
        dA_ref += s * (grad_y[rows].float() @ B.float()).t() @ (x[rows].float() * kc / (1 - p))
        dB_ref += s * grad_y[rows].float().t() @ xa[rows].float()
    for name, got, want in (("grad_A", dA, dA_ref), ("grad_B", dB, dB_ref)):
        rel = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert rel < 2e-2, f"{name}: relative error {rel}"


@pytest.mark.gpu
@requires_gpu_backend
@pytest.mark.parametrize("seed", SEEDS, ids=hex)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 37), (9, 13), (64, 4096), (2, 1001)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_keep_mask_bit_identical(seed, rows, cols, p):
    got = torch.ops.lora_kernels.dropout_keep_mask(torch.tensor([seed], device="cuda"), rows, cols, p).cpu()
    assert torch.equal(got, dropout_rule.dropout_keep_mask(seed, rows, cols, p))
    if torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::dropout_keep_mask", "CPU"):
        assert torch.equal(got, torch.ops.lora_kernels.dropout_keep_mask(torch.tensor([seed]), rows, cols, p))


@pytest.mark.gpu
@requires_gpu_backend
@pytest.mark.parametrize("M,K", [(21, 37), (64, 64)])
def test_gpu_forward_mask_matches_mirror_and_triton(M, K):
    from lora_kernels.backends import compiled

    seed = 2**40 + 9
    got = _mask_via_forward(lambda *a: flat_forward(compiled, *a), M, K, 0.5, seed, "cuda").cpu()
    assert torch.equal(got, dropout_rule.dropout_keep_mask(seed, M, K, 0.5))
    if "triton" in lora_kernels.available_backends("cuda"):
        import lora_kernels.backends.triton as triton_backend

        assert torch.equal(got, _mask_via_forward(lambda *a: flat_forward(triton_backend, *a), M, K, 0.5, seed, "cuda").cpu())


@pytest.mark.gpu
@requires_gpu_backend
def test_gpu_runs_on_the_current_stream():
    """Inputs produced on a side stream behind a long sleep: kernels launched anywhere but the
    current stream would read them before they exist."""
    x, w, b, A, B = make_inputs((700,), 256, 192, 16, torch.bfloat16, requires_grad=False)
    dev = torch.device("cuda")
    xg, wg, bg, Ag, Bg = (t.to(dev) for t in (x, w, b, A, B))
    gy = torch.randn(700, 192, device=dev, dtype=torch.bfloat16)
    seed = torch.tensor([11], device=dev)
    ops = torch.ops.lora_kernels
    want_y, want_xa = ops.fused_forward(xg, wg, bg, Ag, Bg, 0.5, 0.1, seed)
    want = ops.fused_backward(gy, xg, wg, Ag, Bg, want_xa, 0.5, 0.1, seed, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x2, gy2 = xg * 1, gy * 1
        y, xa = ops.fused_forward(x2, wg, bg, Ag, Bg, 0.5, 0.1, seed)
        got = ops.fused_backward(gy2, x2, wg, Ag, Bg, xa, 0.5, 0.1, seed, True)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(y, want_y) and torch.equal(xa, want_xa)
    for a, c in zip(got, want):
        assert torch.equal(a, c)


@pytest.mark.gpu
@requires_gpu_backend
def test_gpu_backward_is_deterministic_and_skips_grad_x():
    x, w, b, A, B = make_inputs((3000,), 512, 768, 16, torch.bfloat16, requires_grad=False)
    dev = torch.device("cuda")
    xg, wg, Ag, Bg = (t.to(dev) for t in (x, w, A, B))
    gy = torch.randn(3000, 768, device=dev, dtype=torch.bfloat16)
    seed = torch.tensor([5], device=dev)
    ops = torch.ops.lora_kernels
    _, xa = ops.fused_forward(xg, wg, None, Ag, Bg, 1.0, 0.1, seed)
    first = ops.fused_backward(gy, xg, wg, Ag, Bg, xa, 1.0, 0.1, seed, True)
    second = ops.fused_backward(gy, xg, wg, Ag, Bg, xa, 1.0, 0.1, seed, True)
    no_dx = ops.fused_backward(gy, xg, wg, Ag, Bg, xa, 1.0, 0.1, seed, False)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    assert no_dx[0].numel() == 0
    assert torch.equal(no_dx[1], first[1]) and torch.equal(no_dx[2], first[2])
