# SPDX-License-Identifier: Apache-2.0
"""LoRALinear: init, wrapping, merge/unmerge, state_dict, and equality with PEFT's lora.Linear."""

import math

import pytest
import torch
from torch import nn

import lora_kernels
from helpers import assert_close


def test_fresh_layer_equals_base_linear_and_init_is_peft_like():
    layer = lora_kernels.LoRALinear(20, 12, r=4, alpha=8)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 20
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_scaling_and_rslora():
    assert lora_kernels.LoRALinear(8, 8, r=4, alpha=16).scaling == 4.0
    assert lora_kernels.LoRALinear(8, 8, r=4, alpha=16, use_rslora=True).scaling == 8.0


def test_from_linear_shares_and_freezes_base():
    linear = nn.Linear(16, 10)
    layer = lora_kernels.LoRALinear.from_linear(linear, r=2, alpha=4, dropout=0.1)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    no_bias = lora_kernels.LoRALinear.from_linear(nn.Linear(16, 10, bias=False), r=2)
    assert set(no_bias.state_dict()) == {"weight", "lora_A", "lora_B"}


def test_merge_unmerge_round_trip():
    layer = lora_kernels.LoRALinear(16, 10, r=3, alpha=6, dropout=0.3, dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    before = layer(x)
    w0 = layer.weight.clone()
    layer.merge()
    layer.merge()  # idempotent
    assert layer.merged
    assert_close(layer(x), before, torch.float64, "merged output")
    layer.unmerge()
    assert_close(layer.weight, w0, torch.float64, "unmerged weight")
    assert_close(layer(x), before, torch.float64, "unmerged output")


def test_training_uses_dropout_eval_does_not():
    layer = lora_kernels.LoRALinear(32, 8, r=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32)
    layer.eval()
    a, b = layer(x), layer(x)
    torch.testing.assert_close(a, b)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_state_dict_round_trip():
    src = lora_kernels.LoRALinear(12, 6, r=2)
    nn.init.normal_(src.lora_B)
    dst = lora_kernels.LoRALinear(12, 6, r=2)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 12)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_equals_peft_lora_linear_at_p0(use_rslora):
    peft = pytest.importorskip("peft", reason="peft is an optional test dependency")
    torch.manual_seed(0)
    base = nn.Linear(24, 18)
    ours = lora_kernels.LoRALinear.from_linear(base, r=4, alpha=8, use_rslora=use_rslora)
    nn.init.normal_(ours.lora_B)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=use_rslora, target_modules=["0"])
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(24, 18)), config).base_model.model[0]
    assert isinstance(theirs, peft.tuners.lora.Linear)
    theirs.base_layer.load_state_dict(base.state_dict())
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A.data)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B.data)
    x = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_peft = ours(x), theirs(x2)
    torch.testing.assert_close(y, y_peft)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_peft.backward(grad_y)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad)
