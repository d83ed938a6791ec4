# SPDX-License-Identifier: Apache-2.0
"""Hypothesis: random shapes, dtypes, strides and dropout rates against the oracle (every CPU
backend; the triton backend under TRITON_INTERPRET=1 for fp32/fp16 when there is no GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CPU_BACKENDS, backend_context, check_against_oracle, make_inputs

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]), **CASE)
def test_random_cases_match_oracle(backend, lead, k, n, r, dtype, p, transpose, bias, scaling):
    _check_random_case(backend, lead, k, n, r, dtype, p, transpose, bias, scaling)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float16]), **CASE)  # the interpreter cannot run bf16 tl.dot
def test_random_cases_match_oracle_triton(lead, k, n, r, dtype, p, transpose, bias, scaling):
    """The triton kernels, interpreted on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the triton backend runs on cuda tensors (tests/test_triton.py)")
    with backend_context("triton", torch.device("cpu")):
        _check_random_case("triton", lead, k, n, r, dtype, p, transpose, bias, scaling)


def _check_random_case(backend, lead, k, n, r, dtype, p, transpose, bias, scaling):
    x, weight, b, lora_A, lora_B = make_inputs(tuple(lead), k, n, r, dtype, bias=bias)
    if transpose and x.dim() >= 3:
        x = x.detach().transpose(0, 1).requires_grad_()
    check_against_oracle(x, weight, b, lora_A, lora_B, scaling, p, backend=backend, baseline=True)
