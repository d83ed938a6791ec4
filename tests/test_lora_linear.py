# SPDX-License-Identifier: Apache-2.0
"""The fused op on every CPU-usable backend beyond the registry-wide parity suite
(tests/test_parity.py): edge shapes, the CPU loops' tile edges, strided x, trainable base,
gradcheck. Every comparison with the oracle goes through `helpers.check_against_oracle`."""

import os

import pytest
import torch

import lora_kernels
from helpers import CPU_BACKENDS, assert_close, check_against_oracle, make_inputs


def test_cpu_backend_is_built():
    if os.environ.get("LORA_KERNELS_NO_EXTENSION") == "1":
        pytest.skip("LORA_KERNELS_NO_EXTENSION=1: pure-Python install")
    assert "cpu" in CPU_BACKENDS, lora_kernels.backends.BACKENDS["cpu"].unavailable_reason(torch.device("cpu"))


def run_case(backend, lead, k, n, r, p, x_transform=None):
    """fp32 inputs of the given shape (x optionally re-laid out) against the oracle."""
    x, weight, b, lora_A, lora_B = make_inputs(lead, k, n, r, torch.float32)
    if x_transform is not None:
        x = x_transform(x.detach()).requires_grad_(True)
    check_against_oracle(x, weight, b, lora_A, lora_B, 0.75, p, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "lead,k,n,r",
    [
        ((), 16, 8, 4),  # a single vector (1-D x)
        ((1,), 33, 19, 1),  # M = 1, r = 1
        ((3,), 8, 8, 64),  # r > K, N
        ((2, 3, 4), 29, 31, 3),  # three leading dims
        ((0,), 12, 10, 4),  # M = 0
        ((2, 0, 3), 12, 10, 4),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_edge_shapes(backend, lead, k, n, r, p):
    run_case(backend, lead, k, n, r, p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "m,k,n,r",
    [(70, 130, 67, 17), (45, 67, 200, 66), (9, 20, 33, 99), (33, 64, 64, 4), (7, 16, 16, 16), (100, 2048, 48, 16)],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rank_and_width_tails(backend, m, k, n, r, p):
    """fp32 around the edges of the CPU loops' tiles: 16-lane vectors, 64-column strips, 4/6/8-row
    and 4-rank tiles, 32-row blocks; K = 2048 puts x's rows 2^k floats apart."""
    run_case(backend, (m,), k, n, r, p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize(
    "transform",
    [lambda x: x.transpose(0, 1), lambda x: x[:, ::2], lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2)],
    ids=["transposed-leading", "strided-rows", "column-major"],
)
def test_non_contiguous_x(backend, p, transform):
    run_case(backend, (6, 10), 24, 18, 4, p, x_transform=transform)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trainable_base_gets_weight_and_bias_grads(backend):
    x, weight, bias, lora_A, lora_B = make_inputs((4, 3), 11, 7, 2, torch.float64)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    y = lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend=backend)
    grad_y = torch.randn_like(y)
    gw, gb = torch.autograd.grad(y, (weight, bias), grad_y)
    assert_close(gw, grad_y.reshape(-1, 7).t() @ x.reshape(-1, 11), torch.float64, "grad_weight")
    assert_close(gb, grad_y.reshape(-1, 7).sum(0), torch.float64, "grad_bias")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_x_without_grad_skips_grad_x(backend):
    x, weight, bias, lora_A, lora_B = make_inputs((5,), 9, 6, 2, torch.float32)
    x = x.detach()
    y = lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.25, backend=backend)
    y.sum().backward()  # grad_y is an expanded (stride 0) tensor here
    assert x.grad is None and lora_A.grad is not None and lora_B.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp64_gradcheck(backend, p):
    x, weight, bias, lora_A, lora_B = make_inputs((3, 2), 7, 5, 3, torch.float64)
    weight.requires_grad_(True)
    bias.requires_grad_(True)

    def fn(x, weight, bias, lora_A, lora_B):
        torch.manual_seed(7)  # the same dropout mask on every evaluation
        return lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 0.9, p, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, lora_A, lora_B))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explicit_seed_is_the_mask(backend):
    """lora_linear(seed=s) drops by s (the oracle's mask for s, forward and backward), and the same
    s gives the same bits on the next call."""
    from lora_kernels.reference import lora_linear_eager

    x, weight, bias, lora_A, lora_B = make_inputs((3, 11), 40, 24, 4, torch.float64)
    seed = torch.tensor([2**40 + 17])
    grad_y = torch.randn(3, 11, 24, dtype=torch.float64)
    runs = []
    for fn in (lora_kernels.lora_linear, lora_kernels.lora_linear, lora_linear_eager):
        if fn is lora_linear_eager:
            y = fn(x, weight, bias, lora_A, lora_B, 0.5, 0.3, seed)
        else:
            y = fn(x, weight, bias, lora_A, lora_B, 0.5, 0.3, backend=backend, seed=seed)
        runs.append((y, *torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)))
    for got, again, want in zip(*runs):
        assert torch.equal(got, again)
        assert_close(got, want, torch.float64, "y and gradients under an explicit seed")
