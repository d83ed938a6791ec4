# SPDX-License-Identifier: Apache-2.0
"""Bad input raises TypeError/ValueError naming the argument — never a wrong answer or a crash."""

import math

import pytest
import torch

import lora_kernels
from helpers import make_inputs, needs_cpu_kernels


def good(**overrides):
    x, weight, bias, lora_A, lora_B = make_inputs((4,), 8, 6, 2, torch.float32, requires_grad=False)
    args = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=1.0, dropout_p=0.1)
    args.update(overrides)
    return args


def call(**overrides):
    return lora_kernels.lora_linear(**good(**overrides))


CASES = [
    ("x 0-dim", dict(x=torch.tensor(1.0)), ValueError, "x must have shape"),
    ("x wrong K", dict(x=torch.randn(4, 7)), ValueError, "x must have last dim K=8"),
    ("x int", dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be float16"),
    ("x not tensor", dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    ("weight 1-D", dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    ("weight dtype", dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight must have x's dtype"),
    ("bias shape", dict(bias=torch.randn(5)), ValueError, "bias must be (N,)"),
    ("bias 2-D", dict(bias=torch.randn(1, 6)), ValueError, "bias must be 1-D"),
    ("bias dtype", dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias must have x's dtype"),
    ("r = 0", dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "rank r >= 1"),
    ("lora_A K", dict(lora_A=torch.randn(2, 5)), ValueError, "lora_A must be (r, K)"),
    ("lora_A 3-D", dict(lora_A=torch.randn(1, 2, 8)), ValueError, "lora_A must be 2-D"),
    ("lora_B shape", dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be (N, r)"),
    ("lora_B transposed", dict(lora_B=torch.randn(2, 6)), ValueError, "lora_B must be (N, r)"),
    ("lora_B dtype", dict(lora_B=torch.randn(6, 2, dtype=torch.bfloat16)), TypeError, "lora_B must have x's dtype"),
    ("lora_A device", dict(lora_A=torch.randn(2, 8, device="meta")), ValueError, "lora_A must be on x's device"),
    ("p > 1", dict(dropout_p=1.5), ValueError, "dropout_p must be in [0, 1]"),
    ("p < 0", dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1]"),
    ("p NaN", dict(dropout_p=math.nan), ValueError, "dropout_p must be in [0, 1]"),
    ("p str", dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    ("scaling NaN", dict(scaling=math.nan), ValueError, "scaling must be finite"),
    ("scaling inf", dict(scaling=math.inf), ValueError, "scaling must be finite"),
    ("scaling tensor", dict(scaling=torch.tensor([1.0, 2.0])), TypeError, "scaling must be a real number"),
    ("training str", dict(training="yes"), TypeError, "training must be a bool"),
    ("seed float", dict(seed=torch.tensor([1.0])), TypeError, "seed must be an int64 tensor of shape (1,)"),
    ("seed shape", dict(seed=torch.tensor([1, 2])), TypeError, "seed must be an int64 tensor of shape (1,)"),
    ("seed int", dict(seed=7), TypeError, "seed must be an int64 tensor of shape (1,)"),
    ("seed device", dict(seed=torch.tensor([7], device="meta")), ValueError, "seed must be on x's device"),
    ("unknown backend", dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    ("cuda backend on cpu", dict(backend="cuda"), ValueError, "backend 'cuda' cannot serve cpu tensors"),
]


@pytest.mark.parametrize("name,overrides,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(name, overrides, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(**overrides)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' cannot serve cpu tensors"):
        call(backend="triton")


@needs_cpu_kernels
def test_compiled_op_checks_its_own_inputs():
    # The C++ op is public through torch.ops: it checks shapes itself (TORCH_CHECK -> RuntimeError).
    args = good()
    with pytest.raises(RuntimeError, match="lora_B must be"):
        torch.ops.lora_kernels.fused_forward(
            args["x"], args["weight"], None, args["lora_A"], torch.randn(6, 3), 1.0, 0.0, None
        )
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        torch.ops.lora_kernels.fused_forward(
            args["x"], args["weight"], None, args["lora_A"], args["lora_B"], 1.0, 0.5, torch.tensor([1.0])
        )


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        lora_kernels.LoRALinear(8, 4, r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        lora_kernels.LoRALinear(8, 4, dropout=1.5)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        lora_kernels.LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))
