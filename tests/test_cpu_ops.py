# SPDX-License-Identifier: Apache-2.0
"""The C++ cpu ops called directly (torch.ops.lora_kernels.fused_forward / fused_backward) without a
weight: they compute the LoRA terms (+ bias) only, N taken from lora_B, and the base product is the
caller's own step (lora_kernels.base_weights). The harness is the one the emulated cuda ops are
checked with (tests/test_cuda_backend.py)."""

import pytest
import torch
from test_cuda_backend import check_base_is_a_separate_step, check_ops_against_oracle

import lora_kernels
from helpers import make_inputs

pytestmark = pytest.mark.skipif("cpu" not in lora_kernels.available_backends("cpu"), reason="cpu kernels not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_without_weight_matches_oracle(dtype, p):
    # 70 rows: three 32-row blocks; K = 130, N = 67 off the 16-lane vectors of the fp32 loops.
    check_ops_against_oracle(torch.ops.lora_kernels, 70, 130, 67, 16, dtype, p, with_weight=False)


@pytest.mark.parametrize(
    "layout,bias,compute_dx",
    [("strided", True, True), ("transposed", False, True), ("row_slice", True, True), ("contiguous", True, False)],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_without_weight_layouts(layout, bias, compute_dx, p):
    check_ops_against_oracle(
        torch.ops.lora_kernels, 37, 37, 45, 3, torch.float32, p, bias=bias, layout=layout, compute_dx=compute_dx,
        with_weight=False,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_base_is_a_separate_step(dtype, p):
    check_base_is_a_separate_step(torch.ops.lora_kernels, 70, 130, 67, 16, dtype, p)


def _bad_calls():
    """(id, call, message) for calls without a weight; N = 6 comes from lora_B (6, 2)."""
    x, _, bias, lora_A, lora_B = make_inputs((4,), 8, 6, 2, torch.float32, requires_grad=False)
    ops = torch.ops.lora_kernels

    def fwd(**kw):
        args = dict(x=x, weight=None, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=1.0, dropout_p=0.0, seed=None)
        args.update(kw)
        return lambda: ops.fused_forward(*args.values())

    def bwd(**kw):
        args = dict(grad_y=torch.zeros(4, 6), x=x, weight=None, lora_A=lora_A, lora_B=lora_B, xa=torch.zeros(4, 2))
        args.update(kw)
        return lambda: ops.fused_backward(*args.values(), 1.0, 0.0, None, True)

    return [
        ("lora_B-rank", fwd(lora_B=torch.randn(6, 3)), r"lora_B must be \(N, r=2\), got \[6, 3\]"),
        ("lora_B-1d", fwd(lora_B=torch.randn(6)), r"lora_B must be \(N, r=2\)"),
        ("lora_B-dtype", fwd(lora_B=lora_B.double()), "lora_B must have x's dtype"),
        ("bias-length", fwd(bias=torch.randn(5)), r"bias must be \(N=6,\)"),
        ("grad_y-columns", bwd(grad_y=torch.zeros(4, 5)), r"grad_y must be \(M=4, N=6\)"),
        ("grad_y-dtype", bwd(grad_y=torch.zeros(4, 6, dtype=torch.float64)), "grad_y must have x's dtype"),
        ("xa-dtype", bwd(xa=torch.zeros(4, 2, dtype=torch.bfloat16)), "xa must have x's dtype"),
    ]


@pytest.mark.parametrize("call,match", [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_without_weight_checks_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match) as err:
        call()
    assert "weight" not in str(err.value)
