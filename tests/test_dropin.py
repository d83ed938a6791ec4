"""Drop-in safety of the op (issue 12): what works on PEFT's eager layer works on `lora_linear` —
in-place ops on the output, a loud error for double backward, p = 1, out-of-range scaling,
autocast around the call — on every CPU-usable backend and through both autograd paths (the eager
autograd.Function and the torch.library custom op that torch.compile traces)."""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels.ops import lora_linear_op
from lora_kernels.reference import draw_seed, lora_linear_eager
from helpers import make_inputs

BACKENDS = [b for b in lora_kernels.available_backends("cpu") if b != "triton"]  # triton: test_triton.py


def eager_path(x, weight, bias, lora_A, lora_B, scaling, p, backend):
    return lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, backend=backend)


def op_path(x, weight, bias, lora_A, lora_B, scaling, p, backend):
    seed = draw_seed(x.device) if p > 0 else None
    return lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, p, seed, backend)[0]


PATHS = {"eager": eager_path, "custom_op": op_path}


def plain_pytorch(x, weight, bias, lora_A, lora_B, scaling, p, backend):
    assert p == 0.0
    return lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling)


# --- 1. in-place ops on the output -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2d", "3d"])
def test_in_place_ops_on_the_output(backend, path, lead):
    x, weight, bias, lora_A, lora_B = make_inputs(lead, 16, 8, 4, torch.float64)
    residual = torch.randn(*lead, 8, dtype=torch.float64)

    def model(fn):
        y = fn(x, weight, bias, lora_A, lora_B, 0.5, 0.0, backend)
        y += residual  # PEFT's mixed models do `result += ...` on a LoRA layer's output
        return torch.nn.ReLU(inplace=True)(y)

    got = model(PATHS[path])
    want = model(plain_pytorch)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, lora_A, lora_B))
    want_grads = torch.autograd.grad(want.square().sum(), (x, lora_A, lora_B))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


# --- 2. double backward -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("loss", ["square", "sum"])  # grad_y requires grad / only x, A, B do
def test_double_backward_raises_a_clear_error(backend, path, p, loss):
    x, weight, bias, lora_A, lora_B = make_inputs((6,), 16, 8, 4, torch.float64)
    y = PATHS[path](x, weight, bias, lora_A, lora_B, 0.5, p, backend)
    out = y.square().sum() if loss == "square" else y.sum()
    grad_x, grad_a = torch.autograd.grad(out, (x, lora_A), create_graph=True)
    with pytest.raises(RuntimeError, match="lora_linear does not support double backward"):
        torch.autograd.grad((grad_x.square().sum() + grad_a.square().sum()), (x, lora_A, lora_B), allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_create_graph_first_order_gradients_are_right(backend, path):
    """create_graph=True alone (e.g. a penalty on other parameters) still gives the right first order."""
    x, weight, bias, lora_A, lora_B = make_inputs((6,), 16, 8, 4, torch.float64)
    y = PATHS[path](x, weight, bias, lora_A, lora_B, 0.5, 0.0, backend)
    got = torch.autograd.grad(y.square().sum(), (x, lora_A, lora_B), create_graph=True)
    want_y = lora_linear_eager(x, weight, bias, lora_A, lora_B, 0.5)
    want = torch.autograd.grad(want_y.square().sum(), (x, lora_A, lora_B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach(), w)
