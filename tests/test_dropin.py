# SPDX-License-Identifier: Apache-2.0
"""Drop-in safety of the op (issue 12): what works on PEFT's eager layer works on `lora_linear` —
in-place ops on the output, a loud error for double backward, p = 1, out-of-range scaling,
autocast around the call — on every CPU-usable backend and through both autograd paths (the eager
autograd.Function and the torch.library custom op that torch.compile traces)."""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels.base_weights import DenseWeight
from lora_kernels.contract import LoRASpec, LoRAWeights
from lora_kernels.dropout import DROP_ALL_THRESHOLD, draw_seed, dropout_threshold
from lora_kernels.reference import lora_linear_eager
from helpers import flat_backward, flat_forward, make_inputs

BACKENDS = [b for b in lora_kernels.available_backends("cpu") if b != "triton"]  # triton: test_triton.py


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, backend):
    return lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, backend=backend)


@pytest.fixture(params=["eager", "custom_op"])
def path(request, monkeypatch):
    """The eager autograd.Function, or the custom op that lora_linear calls while torch.compile traces."""
    if request.param == "custom_op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


def plain_pytorch(x, weight, bias, lora_A, lora_B, scaling, p, backend):
    assert p == 0.0
    return lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling)


# --- 1. in-place ops on the output -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2d", "3d"])
def test_in_place_ops_on_the_output(backend, path, lead):
    x, weight, bias, lora_A, lora_B = make_inputs(lead, 16, 8, 4, torch.float64)
    residual = torch.randn(*lead, 8, dtype=torch.float64)

    def model(fn):
        y = fn(x, weight, bias, lora_A, lora_B, 0.5, 0.0, backend)
        y += residual  # PEFT's mixed models do `result += ...` on a LoRA layer's output
        return torch.nn.ReLU(inplace=True)(y)

    got = model(lora_linear)
    want = model(plain_pytorch)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, lora_A, lora_B))
    want_grads = torch.autograd.grad(want.square().sum(), (x, lora_A, lora_B))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


# --- 2. double backward -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("loss", ["square", "sum"])  # grad_y requires grad / only x, A, B do
def test_double_backward_raises_a_clear_error(backend, path, p, loss):
    x, weight, bias, lora_A, lora_B = make_inputs((6,), 16, 8, 4, torch.float64)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, backend)
    out = y.square().sum() if loss == "square" else y.sum()
    grad_x, grad_a = torch.autograd.grad(out, (x, lora_A), create_graph=True)
    with pytest.raises(RuntimeError, match="lora_linear does not support double backward"):
        torch.autograd.grad((grad_x.square().sum() + grad_a.square().sum()), (x, lora_A, lora_B), allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_first_order_gradients_are_right(backend, path):
    """create_graph=True alone (e.g. a penalty on other parameters) still gives the right first order."""
    x, weight, bias, lora_A, lora_B = make_inputs((6,), 16, 8, 4, torch.float64)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0, backend)
    got = torch.autograd.grad(y.square().sum(), (x, lora_A, lora_B), create_graph=True)
    want_y = lora_linear_eager(x, weight, bias, lora_A, lora_B, 0.5)
    want = torch.autograd.grad(want_y.square().sum(), (x, lora_A, lora_B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach(), w)


# --- 3. NaN/Inf at dropped positions propagate (x * mask, as torch's dropout) ----------------

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (K, x layout): fp32 rows on the vectorised path; strided x; rows that start mid Philox group.
NAN_LAYOUTS = {"k64": (64, False), "k64-strided": (64, True), "k13-mid-group": (13, False)}


def nan_case(layout, dtype, p=0.5, m=9, r=4, n=8):
    """x (m, K) with NaN/Inf at dropped elements only, the seed, and the reference keep mask."""
    k, strided = NAN_LAYOUTS[layout]
    x, weight, bias, lora_A, lora_B = make_inputs((m,), k, n, r, dtype, requires_grad=False)
    seed = draw_seed("cpu")
    keep = lora_kernels.dropout.dropout_keep_mask(int(seed), m, k, p)
    x = x.clone()
    for row in range(m):
        dropped = (~keep[row]).nonzero().flatten()
        if row % 3 != 2 and len(dropped):  # every third row stays finite
            x[row, dropped[0]] = float("nan") if row % 2 else float("inf")
    if strided:
        x = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]  # same values, stride (2K, 2)
        assert x.stride(1) == 2
    return x, weight, bias, lora_A, lora_B, seed, keep


def backend_fwd_bwd(backend, x, weight, bias, lora_A, lora_B, seed, p, scaling=0.5):
    impl = lora_kernels.backends.BACKENDS[backend]
    y, xa = flat_forward(impl, x, weight, bias, lora_A, lora_B, scaling, p, seed)
    grad_y = torch.ones_like(y)
    grad_x, grad_a, grad_b = flat_backward(impl, grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed, True)
    return {"xa": xa, "grad_x": grad_x, "grad_A": grad_a, "grad_B": grad_b}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", NAN_LAYOUTS)
def test_nan_and_inf_in_dropped_x_propagate(backend, dtype, layout):
    p = 0.5
    x, weight, bias, lora_A, lora_B, seed, keep = nan_case(layout, dtype, p)
    want = backend_fwd_bwd("reference", x, weight, bias, lora_A, lora_B, seed, p)
    got = backend_fwd_bwd(backend, x, weight, bias, lora_A, lora_B, seed, p)
    assert want["xa"].isnan().any(dim=1).tolist() == [row % 3 != 2 for row in range(x.shape[0])]
    for name in ("xa", "grad_A", "grad_B"):
        assert torch.equal(got[name].isnan(), want[name].isnan()), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", NAN_LAYOUTS)
def test_nan_in_g_times_A_at_dropped_positions_propagates_to_grad_x(backend, dtype, layout):
    """A NaN in column k of A makes (g·A)[:, k] NaN; grad_x = dY·W + s·D⊙(g·A) keeps it NaN for
    every row, dropped or kept (torch: (g·A) * mask)."""
    p = 0.5
    x, weight, bias, lora_A, lora_B, seed, keep = nan_case(layout, dtype, p)
    x = torch.where(x.isfinite(), x, torch.zeros((), dtype=dtype))  # finite x
    col = 5
    assert not keep[:, col].all() and keep[:, col].any()
    lora_A = lora_A.clone()
    lora_A[1, col] = float("nan")
    got = backend_fwd_bwd(backend, x, weight, bias, lora_A, lora_B, seed, p)
    assert got["grad_x"][:, col].isnan().all()
    assert not got["grad_x"][:, col + 1 :].isnan().any()


# --- 4 and 8. p = 1, and p whose 16-bit threshold rounds to 2^16 ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 1 - 2**-17, 0.999995])  # every one drops every element
def test_p_that_drops_everything_is_served_as_p_equal_1(backend, path, p):
    assert dropout_threshold(p) == DROP_ALL_THRESHOLD
    x, weight, bias, lora_A, lora_B = make_inputs((2, 5), 16, 8, 4, torch.float32)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, backend)
    base = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(y, base)
    grad_y = torch.randn_like(y)
    grad_x, grad_a, grad_b = torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)
    assert not grad_a.any() and not grad_b.any()  # zeros, as torch's dropout(p=1) gives
    torch.testing.assert_close(grad_x, grad_y @ weight)


def test_p_just_below_the_drop_all_threshold_still_keeps_elements():
    """The largest p with t < 2^16 keeps 1 lane value in 65536: not served as p = 1."""
    p = 1 - 2**-17 - 1e-9
    assert dropout_threshold(p) == DROP_ALL_THRESHOLD - 1
    x, weight, bias, lora_A, lora_B = make_inputs((4096,), 64, 8, 4, torch.float64, requires_grad=False)
    weights = LoRAWeights(DenseWeight(weight), bias, lora_A, lora_B)
    _, xa = lora_kernels.backends.BACKENDS["reference"].forward(x, weights, LoRASpec(1.0, p), draw_seed("cpu"))
    assert xa.abs().sum() > 0  # ~4 of the 262144 elements are kept


def test_kernels_reject_a_p_that_drops_everything():
    if "cpu" not in BACKENDS:
        pytest.skip("no cpu backend")
    x, weight, bias, lora_A, lora_B = make_inputs((4,), 16, 8, 4, torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="drops every element"):
        torch.ops.lora_kernels.fused_forward(x, weight, bias, lora_A, lora_B, 1.0, 0.999995, draw_seed("cpu"))


# --- 5. scaling beyond the dtype's range --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scaling", [(torch.float16, 1e5), (torch.bfloat16, 1e300), (torch.float32, -1e300)])
def test_scaling_beyond_the_dtype_range_is_a_clear_error(backend, path, dtype, scaling):
    x, weight, bias, lora_A, lora_B = make_inputs((4,), 16, 8, 4, dtype)
    with pytest.raises(ValueError, match=r"scaling .* outside the range of x's dtype"):
        lora_linear(x, weight, bias, lora_A, lora_B, scaling, 0.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_at_the_fp16_limit_is_served(backend):
    x, weight, bias, lora_A, lora_B = make_inputs((4,), 16, 8, 4, torch.float16)
    y = lora_linear(x, weight, bias, lora_A * 1e-3, lora_B * 1e-3, 65504.0, 0.0, backend)
    assert y.isfinite().all()


# --- 6. autocast around the call does not change the bits ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_autocast_does_not_change_the_bits(backend, path, p, dtype):
    x, weight, bias, lora_A, lora_B = make_inputs((200,), 96, 40, 8, dtype)
    grad_y = torch.randn(200, 40).to(dtype)

    def run():
        torch.manual_seed(7)
        y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, backend)
        return (y, *torch.autograd.grad(y, (x, lora_A, lora_B), grad_y))

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run()
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compiled_cpu_ops_exclude_autocast(p, dtype):
    """The C++ ops called directly (no Python guard): their internal fp32 products must not be
    autocast on the calling thread."""
    if "cpu" not in BACKENDS:
        pytest.skip("no cpu backend")
    x, weight, bias, lora_A, lora_B = make_inputs((200,), 96, 40, 8, dtype, requires_grad=False)
    seed = draw_seed("cpu") if p else None
    grad_y = torch.randn(200, 40).to(dtype)

    def run():
        y, xa = torch.ops.lora_kernels.fused_forward(x, weight, bias, lora_A, lora_B, 0.5, p, seed)
        grads = torch.ops.lora_kernels.fused_backward(grad_y, x, weight, lora_A, lora_B, xa, 0.5, p, seed, True)
        return (y, xa, *grads)

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run()
    for a, b in zip(plain, under):
        assert torch.equal(a, b)
