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


# --- several adapters ------------------------------------------------------------------------------


def multi_layer(dtype=torch.float64):
    """A LoRALinear (32 -> 24) with "default" (r=4) and two added adapters of other ranks, every
    lora_B random so each adapter's term is non-zero."""
    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear(32, 24, r=4, alpha=8, dropout=0.1, dtype=dtype)
    layer.add_adapter("b", r=2, alpha=3, dropout=0.0)
    layer.add_adapter("c", r=6, alpha=5, dropout=0.3, use_rslora=True)
    for name in layer.adapter_names:
        nn.init.normal_(layer._adapter(name)[1])
    return layer


def adapter_tensors(layer, names):
    """(lora_As, lora_Bs, scalings, dropouts) of `names`."""
    parts = [layer._adapter(n) for n in names]
    return [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], [p[3] for p in parts]


def test_add_set_delete_adapter_and_state_dict():
    layer = multi_layer()
    assert layer.adapter_names == ["default", "b", "c"] and layer.active_adapters == ["default"]
    assert [layer.adapter_index(n) for n in ("default", "b", "c")] == [0, 1, 2]
    assert layer.adapters["c"].scaling == 5 / math.sqrt(6)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "adapters.b.lora_A", "adapters.b.lora_B",
                                       "adapters.c.lora_A", "adapters.c.lora_B"}
    fresh = lora_kernels.LoRALinear(32, 24, r=4).add_adapter("x", r=2)
    assert torch.count_nonzero(fresh.lora_B) == 0 and fresh.lora_A.requires_grad
    copy = lora_kernels.LoRALinear(32, 24, r=4, dtype=torch.float64)
    copy.add_adapter("b", r=2, alpha=3)
    copy.add_adapter("c", r=6, alpha=5, dropout=0.3, use_rslora=True)
    copy.load_state_dict(layer.state_dict())
    copy.set_adapter(["b", "c"]), layer.set_adapter(["b", "c"])
    x = torch.randn(5, 32, dtype=torch.float64)
    layer.eval(), copy.eval()
    torch.testing.assert_close(copy(x), layer(x))
    layer.delete_adapter("b")
    assert layer.adapter_names == ["default", "c"] and layer.active_adapters == ["c"] and layer.adapter_index("c") == 1
    layer.delete_adapter("c")
    assert layer.active_adapters == ["default"]
    for bad in (lambda: layer.delete_adapter("default"), lambda: layer.delete_adapter("nope"),
                lambda: layer.set_adapter(["default", "default"]), lambda: layer.set_adapter("nope"),
                lambda: layer.add_adapter("default"), lambda: layer.add_adapter("a.b"),
                lambda: layer.add_adapter("__base__"), lambda: layer.add_adapter("d", r=0)):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("training", [False, True])
def test_several_active_adapters_equal_the_stacked_oracle(monkeypatch, training):
    from lora_kernels.reference import lora_linear_stacked_eager

    layer = multi_layer().train(training)
    names = ["c", "default", "b"]
    layer.set_adapter(names)
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    seeds = torch.randint(0, 2**62, (3,), dtype=torch.int64) if training else None  # what the op drew
    As, Bs, scalings, dropouts = adapter_tensors(layer, names)
    want = lora_linear_stacked_eager(x, layer.weight, layer.bias, As, Bs, scalings,
                                     dropouts if training else [0.0] * 3, seeds)
    assert_close(y, want, torch.float64, "stacked")
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, As + Bs, grad)
    expected = torch.autograd.grad(want, As + Bs, grad)
    for g, e, name in zip(got, expected, ["A_c", "A_default", "A_b", "B_c", "B_default", "B_b"]):
        assert_close(g, e, torch.float64, name)


@pytest.mark.parametrize("training", [False, True])
def test_several_active_adapters_with_dropout_1_follow_nn_dropout(training):
    """dropout=1.0, as nn.Dropout allows: in training those adapters add nothing (and their A, B
    get zero gradients), in eval they add their full term; one such adapter or several alike."""
    from lora_kernels.reference import lora_linear_stacked_eager

    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear(32, 24, r=4, alpha=8, dropout=1.0, dtype=torch.float64)
    layer.add_adapter("b", r=2, alpha=3, dropout=1.0)
    layer.add_adapter("c", r=3, alpha=3, dropout=0.0)
    for name in layer.adapter_names:
        nn.init.normal_(layer._adapter(name)[1])
    layer.train(training).set_adapter(["default", "b", "c"])
    x = torch.randn(5, 32, dtype=torch.float64)
    y = layer(x)
    As, Bs, scalings, _ = adapter_tensors(layer, ["default", "b", "c"])
    kept = [0.0, 0.0, scalings[2]] if training else scalings
    assert_close(y, lora_linear_stacked_eager(x, layer.weight, layer.bias, As, Bs, kept, [0.0] * 3, None),
                 torch.float64, "y")
    if training:
        grad_a = torch.autograd.grad(y.sum(), As[0])[0]
        assert torch.count_nonzero(grad_a) == 0


def test_per_row_adapter_ids_equal_the_per_row_oracle():
    from lora_kernels.reference import lora_linear_per_row_eager

    layer = multi_layer().eval()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([2, -1, 0, 1, 1, 2, -1, 0], dtype=torch.int32)
    y = layer(x, adapter_ids=ids)
    As, Bs, scalings, _ = adapter_tensors(layer, layer.adapter_names)
    A = torch.stack([nn.functional.pad(a, (0, 0, 0, 6 - a.shape[0])) for a in As])
    B = torch.stack([nn.functional.pad(b, (0, 6 - b.shape[1])) for b in Bs])
    want = lora_linear_per_row_eager(x, layer.weight, layer.bias, A, B, scalings, ids)
    assert_close(y, want, torch.float64, "per-row")
    grad = torch.randn_like(y)  # gradients reach every adapter named by some row (and x)
    got = torch.autograd.grad(y, [x, *As, *Bs], grad)
    expected = torch.autograd.grad(want, [x, *As, *Bs], grad)
    for g, e in zip(got, expected):
        assert_close(g, e, torch.float64, "per-row grad")
    with torch.no_grad():  # no gradient needed: the stacked adapters are cached, and rebuilt on change
        first = layer(x, adapter_ids=ids)
        stacks = layer._stacks._stacks
        assert layer(x, adapter_ids=ids).equal(first) and layer._stacks._stacks is stacks
        layer.adapters["b"].lora_B.mul_(3.0)
        changed = layer(x, adapter_ids=ids)
    assert layer._stacks._stacks is not stacks
    rows_b = (ids == 1).reshape(2, 4)
    assert not torch.equal(changed[rows_b], first[rows_b]) and torch.equal(changed[~rows_b], first[~rows_b])


def test_per_row_refuses_dropout_in_training_and_merged_layers():
    layer = multi_layer()
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="adapter_ids: the per-row path applies no dropout"):
        layer(torch.randn(3, 32, dtype=torch.float64), adapter_ids=ids)
    layer.eval().merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(3, 32, dtype=torch.float64), adapter_ids=ids)


def test_merge_unmerge_several_active_adapters():
    layer = multi_layer().eval()
    layer.set_adapter(["b", "c"])
    x = torch.randn(5, 32, dtype=torch.float64)
    before, w0 = layer(x), layer.weight.clone()
    layer.merge()
    assert_close(layer(x), before, torch.float64, "merged")
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_adapter("default")
    layer.unmerge()
    assert_close(layer.weight, w0, torch.float64, "unmerged weight")
