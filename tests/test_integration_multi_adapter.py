# SPDX-License-Identifier: Apache-2.0
"""Several adapters through `lora_kernels.patch` (PEFT): several active adapters at any dropout
are one `lora_linear_stacked` call per layer and equal PEFT given the same masks; mixed batches
(`adapter_names`, "__base__" and repeated names included) are one `lora_linear_per_row` call per
layer and equal PEFT's `_mixed_batch_forward`; what cannot be matched runs PEFT's forward and is
reported. `LoRALinear`'s multi-adapter form is tested in tests/test_modules.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels.backends import BACKENDS  # noqa: E402
from lora_kernels.integrations import _common  # noqa: E402
from lora_kernels.integrations import peft as peft_integration  # noqa: E402
from lora_kernels.reference import lora_linear_stacked_eager  # noqa: E402
from lora_kernels.variants import VARIANTS  # noqa: E402
import integration_helpers as helpers  # noqa: E402
from integration_helpers import (  # noqa: E402
    FP32_TOL,
    LLAMA_PROJECTIONS,
    FusedCalls,
    assert_grads_close,
    assert_tensors_close,
    mirror_peft_dropouts,
    run_layer,
    run_llama,
    token_batch,
    twin,
)

CPU = torch.device("cpu")
# backends that implement both multi-adapter ops on the CPU ("auto" picks one of them)
MULTI_BACKENDS = [
    name for name in helpers.CPU_BACKENDS
    if not any(BACKENDS[name].unavailable_reason(CPU, torch.float32, variant=v) for v in ("stacked", "per_row"))
]
# name: (r, alpha, dropout) — different ranks, scalings and rates, one adapter without dropout
ADAPTERS = {"default": (4, 8, 0.1), "second": (2, 3, 0.0), "third": (6, 5, 0.3)}
NAMES = list(ADAPTERS)


@pytest.fixture
def fused_calls(monkeypatch):
    return FusedCalls(monkeypatch)


class StackedSeeds:
    """Wraps `lora_kernels.lora_linear_stacked` (which the integration calls): each call's seeds
    (T,) are drawn here and passed on, and those of the adapters that drop (training, p > 0) are
    queued in call order — the order PEFT's dropout modules run in (layer by layer, adapter by
    adapter), so `mirror_peft_dropouts(ref, recorder.queue)` gives PEFT the same masks."""

    def __init__(self, monkeypatch):
        self.queue, self.calls = [], 0
        original = lora_kernels.lora_linear_stacked

        def recording(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend="auto",
                      *, seed=None):
            count = len(lora_A)
            rates = list(dropout_p) if isinstance(dropout_p, (list, tuple)) else [dropout_p] * count
            if seed is None:
                seed = torch.randint(0, 2**62, (count,), dtype=torch.int64, device=x.device)
            self.calls += 1
            self.queue += [s for s, p in zip(seed.tolist(), rates) if training and p > 0.0]
            return original(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend, seed=seed)

        monkeypatch.setattr(lora_kernels, "lora_linear_stacked", recording)


def add_adapters(model, targets, **kwargs):
    """Add "second" and "third" (ADAPTERS) to a PEFT model whose "default" is ADAPTERS["default"]."""
    for name in NAMES[1:]:
        r, alpha, p = ADAPTERS[name]
        torch.manual_seed(len(name))
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=targets, init_lora_weights=False,
                            **kwargs)
        model.add_adapter(name, config)
    return model


class TwoLinears(nn.Module):
    """x -> down(relu(up(x))): two LoRA targets, one with a bias."""

    def __init__(self, k=32, n=48):
        super().__init__()
        self.up, self.down = nn.Linear(k, n), nn.Linear(n, k, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def three_adapter_mlp(active=NAMES, **kwargs):
    torch.manual_seed(0)
    r, alpha, p = ADAPTERS["default"]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["up", "down"], init_lora_weights=False,
                        **kwargs)
    model = add_adapters(get_peft_model(TwoLinears(), config, autocast_adapter_dtype=False), ["up", "down"], **kwargs)
    model.base_model.set_adapter(active)
    return model


def three_adapter_llama(active=NAMES):
    r, alpha, p = ADAPTERS["default"]
    model = add_adapters(helpers.peft_llama(dropout=p, r=r, alpha=alpha), LLAMA_PROJECTIONS)
    model.base_model.set_adapter(active)
    return model


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]


# --- several active adapters ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", *MULTI_BACKENDS])
def test_three_active_adapters_with_dropout_equal_peft_with_the_same_masks(monkeypatch, fused_calls, backend):
    ref = three_adapter_llama()
    fused = twin(ref)
    report = lora_kernels.patch(fused, strict=True, backend=backend)
    assert report.num_patched == 14
    ids = token_batch()
    seeds = StackedSeeds(monkeypatch)
    logits, grads = run_llama(fused, ids)
    assert fused_calls.take() == 14 and seeds.calls == 14  # one stacked call per layer
    assert len(seeds.queue) == 2 * 14  # "default" and "third" drop, "second" (p = 0) does not
    mirror_peft_dropouts(ref, list(seeds.queue))
    logits_ref, grads_ref = run_llama(ref, ids)
    assert len(grads) == 3 * 2 * 14  # A and B of every adapter of every layer
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert_grads_close(grads, grads_ref, **FP32_TOL)


def test_three_active_adapters_layer_equals_the_stacked_oracle(monkeypatch, fused_calls):
    """One layer against `reference.lora_linear_stacked_eager` with the recorded seeds: x, A, B grads."""
    model = three_adapter_mlp()
    lora_kernels.patch(model)
    layer = model.base_model.model.up
    seeds = StackedSeeds(monkeypatch)
    x = torch.randn(3, 5, 32)
    y, grads = run_layer(layer, x)
    assert fused_calls.variants == ["stacked"] and seeds.calls == 1
    assert fused_calls.take() == 1
    As = [layer.lora_A[n].weight for n in NAMES]
    Bs = [layer.lora_B[n].weight for n in NAMES]
    queue = list(seeds.queue)
    seed = torch.tensor([queue[0], 0, queue[1]], dtype=torch.int64)  # "second" has p = 0: its seed is unused
    oracle = nn.Module()
    oracle.forward = lambda x: lora_linear_stacked_eager(
        x, layer.base_layer.weight, layer.base_layer.bias, As, Bs, [layer.scaling[n] for n in NAMES],
        [ADAPTERS[n][2] for n in NAMES], seed)
    for p in (*As, *Bs):
        p.grad = None
    y_ref, grads_ref = run_layer(oracle, x, params_of=layer)
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert_grads_close(grads, grads_ref, **FP32_TOL)


def test_several_adapters_eval_and_p0_equal_peft(fused_calls):
    ref = three_adapter_mlp(lora_bias=False)
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(4, 32)
    for mode in ("eval", "train"):
        for m in (ref, fused):
            m.train(mode == "train")
            for layer in layers_of(m):  # p = 0 everywhere in training
                for name in NAMES:
                    layer.lora_dropout[name] = nn.Identity()
        y_ref, g_ref = run_layer(ref, x)
        y, g = run_layer(fused, x)
        assert fused_calls.take() == 2
        assert_tensors_close(y, y_ref, **FP32_TOL, what=mode)
        assert_grads_close(g, g_ref, **FP32_TOL)


def test_dora_among_active_adapters_runs_peft_forward_and_is_reported(fused_calls):
    if "dora" not in VARIANTS:
        pytest.skip("no 'dora' variant")
    ref = three_adapter_mlp()
    torch.manual_seed(9)
    ref.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, target_modules=["up"], use_dora=True, init_lora_weights=False))
    ref.base_model.set_adapter([*NAMES, "dora"])
    ref.eval()  # PEFT's own masks are torch's: compare without dropout
    fused = twin(ref)
    report = lora_kernels.patch(fused)
    assert report.num_patched == 2
    assert any("one adapter is active" in c and names == ["base_model.model.up"]
               for c, names in report.conditional.items()), str(report)
    x = torch.randn(4, 32)
    y_ref, g_ref = run_layer(ref, x)
    y, g = run_layer(fused, x)
    assert fused_calls.take() == 1  # "down" (no DoRA adapter) stacked; "up" runs PEFT's forward
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert_grads_close(g, g_ref, **FP32_TOL)


def test_adapters_in_another_dtype_run_peft_forward_and_are_reported(fused_calls):
    ref = three_adapter_mlp()
    ref.eval()
    for layer in layers_of(ref):
        layer.lora_B["third"].to(torch.float64)
        layer.lora_A["third"].to(torch.float64)
    fused = twin(ref)
    report = lora_kernels.patch(fused)
    assert any("float64" in c and "autocast" in c for c in report.conditional), str(report)
    x = torch.randn(4, 32)
    assert torch.equal(fused(x), ref(x))
    assert fused_calls.take() == 0


# --- mixed batches (adapter_names) --------------------------------------------------------------


MIXED = ["default", "__base__", "third", "default", "second", "__base__"]


@pytest.mark.parametrize("backend", ["auto", *MULTI_BACKENDS])
def test_mixed_batch_equals_peft_mixed_batch_forward(fused_calls, backend):
    ref = three_adapter_mlp(active="second")  # the active adapter does not matter for a mixed batch
    ref.eval()
    fused = twin(ref)
    lora_kernels.patch(fused, backend=backend)
    x = torch.randn(len(MIXED), 7, 32)
    with torch.no_grad():
        y_ref = ref(x, adapter_names=MIXED)
        y = fused(x, adapter_names=MIXED)
    assert fused_calls.variants == ["per_row", "per_row"]
    assert fused_calls.take() == 2
    assert_tensors_close(y, y_ref, **FP32_TOL, what="mixed")
    two_d = torch.randn(len(MIXED), 32)  # one row per sample
    with torch.no_grad():
        assert_tensors_close(fused(two_d, adapter_names=MIXED), ref(two_d, adapter_names=MIXED), **FP32_TOL,
                             what="2-d")
    only_base = ["__base__"] * 3
    with torch.no_grad():
        assert_tensors_close(fused(x[:3], adapter_names=only_base), ref(x[:3], adapter_names=only_base),
                             **FP32_TOL, what="base only")


def test_mixed_batch_llama_equals_peft(fused_calls):
    ref = three_adapter_llama()
    ref.eval()
    fused = twin(ref)
    lora_kernels.patch(fused, strict=True)
    ids = token_batch(batch=5)
    names = ["third", "__base__", "default", "third", "second"]
    with torch.no_grad():
        logits_ref = ref(input_ids=ids, adapter_names=names).logits
        logits = fused(input_ids=ids, adapter_names=names).logits
    assert fused_calls.take() == 14
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")


def test_mixed_batch_layer_gradients_equal_peft(fused_calls):
    """The layer-level mixed batch in training mode (p = 0): x, A and B gradients as PEFT's."""
    ref = three_adapter_mlp()
    for layer in layers_of(ref):
        for name in NAMES:
            layer.lora_dropout[name] = nn.Identity()
    fused = twin(ref)
    lora_kernels.patch(fused)
    names = ["third", "__base__", "default", "third"]

    def mixed(model):
        layer = model.base_model.model.up
        wrapper = nn.Module()
        wrapper.forward = lambda x: layer(x, adapter_names=names)
        return run_layer(wrapper, torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(0)), params_of=layer)

    y_ref, g_ref = mixed(ref)
    y, g = mixed(fused)
    assert fused_calls.take() == 1
    assert sorted(k for k in g if "second" in k) == []  # unnamed adapter: no gradient, as in PEFT
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert_grads_close(g, g_ref, **FP32_TOL)


def test_mixed_batch_stack_is_cached_and_rebuilt_when_an_adapter_changes(fused_calls):
    ref = three_adapter_mlp()
    ref.eval()
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(len(MIXED), 32)
    layer = fused.base_model.model.up
    cache = _common.patch_state(layer).stacks
    with torch.no_grad():
        fused(x, adapter_names=MIXED)
        first = cache._stacks
        assert first[0].shape == (3, 6, 32) and first[1].shape == (3, 48, 6)  # padded to the largest rank
        fused(x, adapter_names=MIXED)
        assert cache._stacks is first  # not restacked
        for m in (ref, fused):  # an optimizer-like in-place update
            m.base_model.model.up.lora_B["third"].weight.mul_(2.0)
        assert_tensors_close(fused(x, adapter_names=MIXED), ref(x, adapter_names=MIXED), **FP32_TOL, what="updated")
        assert cache._stacks is not first
        for m in (ref, fused):
            m.delete_adapter("second")
        assert_tensors_close(fused(x, adapter_names=["third", "__base__", "default"] * 2),
                             ref(x, adapter_names=["third", "__base__", "default"] * 2), **FP32_TOL, what="deleted")
        assert cache._stacks[0].shape[0] == 2
    lora_kernels.unpatch(fused)
    assert _common.patch_state(layer) is None  # the cache went with the patch state


def test_mixed_batch_unnamed_trainable_adapter_gets_no_gradient_as_in_peft(fused_calls):
    """A frozen named adapter beside a trainable unnamed one: PEFT leaves the unnamed one's .grad
    None (an optimizer with weight decay or momentum would otherwise move it), and so do we."""
    ref = three_adapter_mlp()
    for layer in layers_of(ref):
        for name in NAMES:
            layer.lora_dropout[name] = nn.Identity()
            trainable = name == "default"
            layer.lora_A[name].weight.requires_grad_(trainable)
            layer.lora_B[name].weight.requires_grad_(trainable)
    fused = twin(ref)
    lora_kernels.patch(fused)
    names = ["second", "__base__"]
    x = torch.randn(2, 3, 32, requires_grad=True)  # the layer itself: PEFT's model refuses names in training
    for model in (ref, fused):
        model.base_model.model.up(x, adapter_names=names).sum().backward()
    assert fused_calls.take() == 1
    for model in (ref, fused):
        layer = model.base_model.model.up
        assert layer.lora_A["default"].weight.grad is None and layer.lora_B["default"].weight.grad is None


def test_mixed_batch_of_no_samples_equals_peft(fused_calls):
    ref = three_adapter_mlp()
    ref.eval()
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(0, 3, 32)
    with torch.no_grad():
        y_ref, y = ref(x, adapter_names=[]), fused(x, adapter_names=[])
    assert y.shape == y_ref.shape == (0, 3, 32)


def test_mixed_batch_stack_follows_data_writes_after_clear_and_training_steps(fused_calls):
    """Writes through .data leave _version alone: clear() makes the cache see them; a forward that
    needs adapter gradients (training) drops the cache, so the next inference restacks."""
    ref = three_adapter_mlp()
    ref.eval()
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(len(MIXED), 32)
    cache = _common.patch_state(fused.base_model.model.up).stacks
    with torch.no_grad():
        fused(x, adapter_names=MIXED)
    for m in (ref, fused):
        m.base_model.model.up.lora_B["third"].weight.data.mul_(3.0)
    cache.clear()
    with torch.no_grad():
        assert_tensors_close(fused(x, adapter_names=MIXED), ref(x, adapter_names=MIXED), **FP32_TOL, what=".data")
    fused(x, adapter_names=MIXED)  # grad mode, trainable adapters: not cached, and the cache dropped
    assert cache._stacks is None


def test_mixed_batch_on_inference_tensors_equals_peft(fused_calls):
    """Parameters made under torch.inference_mode have no version counter: stacked per call."""
    with torch.inference_mode():
        ref = three_adapter_mlp()
        ref.eval()
        fused = twin(ref)
        lora_kernels.patch(fused)
        x = torch.randn(len(MIXED), 32)
        assert_tensors_close(fused(x, adapter_names=MIXED), ref(x, adapter_names=MIXED), **FP32_TOL, what="inference")
    assert fused_calls.take() == 2


def test_mixed_batch_fallbacks_follow_peft(fused_calls):
    """DoRA among the names, dropout in training, a wrong number of names: PEFT's forward (which
    raises where PEFT raises); a layer lacking a named adapter serves it as base only."""
    model = three_adapter_mlp()
    if "dora" in VARIANTS:
        torch.manual_seed(9)
        model.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, target_modules=["up"], use_dora=True,
                                             init_lora_weights=False))
    report = lora_kernels.patch(model)
    assert any(c == peft_integration.MIXED_DROPOUT_CONDITION for c in report.conditional), str(report)
    layer = model.base_model.model.up
    x = torch.randn(2, 32)
    if "dora" in VARIANTS:
        layer.eval()
        with pytest.raises(ValueError, match="DoRA"):
            layer(x, adapter_names=["dora", "default"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(x, adapter_names=["default"])
    layer.train()  # "default" drops: PEFT's torch dropout on the sub-batch
    torch.manual_seed(3)
    y = layer(x, adapter_names=["default", "second"])
    unpatched = twin(model)
    lora_kernels.unpatch(unpatched)
    torch.manual_seed(3)
    assert torch.equal(y, unpatched.base_model.model.up(x, adapter_names=["default", "second"]))
    assert fused_calls.take() == 0
    layer.eval()
    down = model.base_model.model.down  # no "dora" adapter here: rows naming it are base only
    h = torch.randn(2, 48)
    names = ["dora", "second"] if "dora" in VARIANTS else ["__base__", "second"]
    got = down(h, adapter_names=names)
    assert fused_calls.take() == 1
    assert_tensors_close(got, unpatched.base_model.model.down.eval()(h, adapter_names=names), **FP32_TOL, what="lacks")


def test_a_backend_without_the_multi_adapter_ops_runs_peft_forward_and_is_reported(fused_calls):
    lacking = [n for n in helpers.CPU_BACKENDS if n not in MULTI_BACKENDS]
    if not lacking:
        pytest.skip("every CPU backend implements the multi-adapter ops")
    ref = three_adapter_mlp()
    ref.eval()
    fused = twin(ref)
    report = lora_kernels.patch(fused, backend=lacking[0])
    assert any("does not implement" in c and len(names) == 2 for c, names in report.conditional.items()), str(report)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert_tensors_close(fused(x), ref(x), **FP32_TOL, what="stacked")
        assert_tensors_close(fused(x, adapter_names=["third", "__base__", "default"]),
                             ref(x, adapter_names=["third", "__base__", "default"]), **FP32_TOL, what="mixed")
    assert fused_calls.take() == 0
    assert not any("does not implement" in c for c in lora_kernels.patch(fused).conditional)  # "auto" serves them


# --- QLoRA (PEFT's lora.bnb.Linear4bit) ------------------------------------------------------------


def test_qlora_three_adapters_and_mixed_batch_equal_peft(monkeypatch, fused_calls):
    qlora = pytest.importorskip("test_integration_qlora_dora")
    if qlora.bnb is None or not {"nf4", "fp4"} <= set(qlora.FORMATS):
        pytest.skip("no bitsandbytes or no 4-bit base format")
    ref = add_adapters(qlora.peft_qlora(dropout=ADAPTERS["default"][2]), ["proj"])
    ref.base_model.set_adapter(NAMES)
    fused = twin(ref)
    assert lora_kernels.patch(fused, strict=True).num_patched == 1
    x = torch.randn(2, 5, 128)
    seeds = StackedSeeds(monkeypatch)
    y, grads = run_layer(fused, x)
    assert fused_calls.take() == 1 and seeds.calls == 1
    mirror_peft_dropouts(ref, list(seeds.queue))
    y_ref, grads_ref = run_layer(ref, x)
    assert_tensors_close(y, y_ref, **FP32_TOL, what="stacked")
    assert_grads_close(grads, grads_ref, **FP32_TOL)
    for m in (ref, fused):
        m.eval()
    names = ["third", "__base__"]
    # an eval no-grad call would make bitsandbytes repack PEFT's weight for its AVX512-BF16 CPU
    # kernel, whose rounding differs (`packing_format_for_cpu`, see integrations/peft.py); with
    # grad, PEFT's 4-bit mixed batch raises (an in-place add on MatMul4Bit's output)
    qlora.qlora_layer(ref).base_layer.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        y, y_ref = fused(x, adapter_names=names), ref(x, adapter_names=names)
    assert fused_calls.variants == ["per_row"]
    assert y.dtype == y_ref.dtype
    assert_tensors_close(y, y_ref, **FP32_TOL, what="mixed")


def test_an_adapter_with_dropout_1_among_several_is_served_like_peft(fused_calls):
    """lora_dropout=1.0 drops everything (zero term, zero A/B gradients, as torch's dropout);
    with p = 0 for the others the comparison needs no mask."""
    ref = three_adapter_mlp()
    for layer in layers_of(ref):
        layer.lora_dropout["default"], layer.lora_dropout["third"] = nn.Identity(), nn.Dropout(1.0)
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(4, 32)
    y_ref, g_ref = run_layer(ref, x)
    y, g = run_layer(fused, x)
    assert fused_calls.take() == 2
    assert not any(g[n].any() for n in g if ".third." in n) and any(".third." in n for n in g)
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert_grads_close(g, g_ref, **FP32_TOL)


def test_several_fp32_adapters_on_a_bf16_base_follow_the_dtype_policy(fused_calls):
    """PEFT's default fp32 adapters on a bf16 base: PEFT's forward without autocast (reported), one
    stacked call per layer under torch.autocast or with cast_adapters=True."""
    ref = three_adapter_mlp()
    for layer in layers_of(ref):
        layer.base_layer.to(torch.bfloat16)
    ref.eval()
    fused = twin(ref)
    report = lora_kernels.patch(fused)
    assert any("under torch.autocast" in c and len(names) == 2 for c, names in report.conditional.items()), str(report)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    helpers.assert_fused_only_under_autocast(fused, ref, x, fused_calls, 2, torch.bfloat16, dict(atol=5e-2, rtol=5e-2))
    lora_kernels.patch(fused, cast_adapters=True)
    y, grads = run_layer(fused, x)
    assert fused_calls.take() == 2
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for n, g in grads.items() if "lora" in n)
    assert_tensors_close(y, ref(x), atol=5e-2, rtol=5e-2, what="cast_adapters")
