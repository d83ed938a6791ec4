# SPDX-License-Identifier: Apache-2.0
"""Hypothesis: random shapes, dtypes, strides and dropout rates against the oracle (every CPU
backend; the triton backend under TRITON_INTERPRET=1 for fp32/fp16 when there is no GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_kernels
from lora_kernels.dropout import draw_seed
from helpers import assert_close, eager_same_dtype, make_inputs, oracle

BACKENDS = [b for b in lora_kernels.available_backends("cpu") if b != "triton"]


# Everything but the dtype: the same strategies for every backend.
CASE = dict(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    k=st.integers(1, 70),
    n=st.integers(1, 40),
    r=st.integers(1, 20),
    p=st.sampled_from([0.0, 0.1, 0.5, 0.75]),
    transpose=st.booleans(),
    bias=st.booleans(),
    scaling=st.floats(-4, 4),
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]), **CASE)
def test_random_cases_match_oracle(backend, lead, k, n, r, dtype, p, transpose, bias, scaling):
    _check_random_case(backend, lead, k, n, r, dtype, p, transpose, bias, scaling)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float16]), **CASE)  # the interpreter cannot run bf16 tl.dot
def test_random_cases_match_oracle_triton(lead, k, n, r, dtype, p, transpose, bias, scaling):
    """The triton kernels, interpreted on the CPU (test_triton's import decorates them so)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the triton backend runs on cuda tensors (tests/test_triton.py)")
    import test_triton

    with test_triton._interpreter_env():
        _check_random_case("triton", lead, k, n, r, dtype, p, transpose, bias, scaling)


def _check_random_case(backend, lead, k, n, r, dtype, p, transpose, bias, scaling):
    x, weight, b, lora_A, lora_B = make_inputs(tuple(lead), k, n, r, dtype, bias=bias)
    if transpose and x.dim() >= 3:
        x = x.detach().transpose(0, 1).requires_grad_()
    torch.manual_seed(9)
    y = lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, scaling, p, backend=backend)
    torch.manual_seed(9)
    seed = draw_seed("cpu") if p > 0 else None
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y_ref, grads_ref = oracle(x, weight, b, lora_A, lora_B, scaling, p, seed, grad_y)
    y_base, grads_base = eager_same_dtype(x, weight, b, lora_A, lora_B, scaling, p, seed, grad_y)
    assert_close(y, y_ref, dtype, "y", baseline=y_base)
    if y.numel():
        grads = torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)
        for name, got, want, base in zip(("grad_x", "grad_A", "grad_B"), grads, grads_ref, grads_base):
            assert_close(got, want, dtype, name, baseline=base)
