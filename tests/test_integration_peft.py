# SPDX-License-Identifier: Apache-2.0
"""lora_kernels.integrations.peft: a patched PEFT model computes what PEFT computes (outputs and
every LoRA gradient), keeps PEFT's forward where it must, and round-trips save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels.integrations import _common  # noqa: E402
from lora_kernels.reference import lora_linear_eager, lora_linear_stacked_eager  # noqa: E402
from integration_helpers import (  # noqa: E402
    CPU_BACKENDS,
    FP32_TOL,
    LLAMA_PROJECTIONS,
    FusedCalls,
    SeedRecorder,
    assert_error_like_peft,
    assert_fused_only_under_autocast,
    assert_grads_close,
    assert_runs_match,
    assert_tensors_close,
    mirror_peft_dropouts,
    peft_llama,
    run_layer,
    run_llama,
    token_batch,
    twin,
)

N_LORA_LAYERS = 2 * len(LLAMA_PROJECTIONS)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, PeftLoraLinear)]


class TwoLinears(nn.Module):
    """x -> down(relu(up(x))): two LoRA targets, one with a bias."""

    def __init__(self, k=32, n=48, bias=True):
        super().__init__()
        self.up = nn.Linear(k, n, bias=bias)
        self.down = nn.Linear(n, k, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_mlp(dtype=torch.float32, seed=0, **lora_kwargs):
    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **lora_kwargs)
    return get_peft_model(TwoLinears().to(dtype), config, autocast_adapter_dtype=False)


@pytest.fixture
def fused_calls(monkeypatch):
    return FusedCalls(monkeypatch)


# --- equality with PEFT --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patched_llama_equals_peft_p0(fused_calls, backend):
    ref = peft_llama()
    fused = twin(ref)
    report = lora_kernels.patch(fused, backend=backend)
    assert report.num_patched == N_LORA_LAYERS and report.num_kept == 0, str(report)
    ids = token_batch()
    logits_ref, grads_ref = run_llama(ref, ids)
    assert fused_calls.take() == 0
    logits, grads = run_llama(fused, ids)
    assert fused_calls.take() == N_LORA_LAYERS
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert len(grads) == 2 * N_LORA_LAYERS
    assert_grads_close(grads, grads_ref, **FP32_TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patched_llama_dropout_equals_peft_with_the_same_masks(monkeypatch, backend):
    """p > 0: the patched model equals PEFT whose dropouts apply the masks the fused op drew."""
    ref = peft_llama(dropout=0.2)
    fused, plain_peft = twin(ref), twin(ref)
    lora_kernels.patch(fused, backend=backend)
    recorder = SeedRecorder().install(monkeypatch)
    ids = token_batch()
    logits, grads = run_llama(fused, ids)
    assert len(recorder.seeds) == N_LORA_LAYERS  # one seed per LoRA layer call, none in backward
    mirror_peft_dropouts(ref, list(recorder.seeds))
    logits_ref, grads_ref = run_llama(ref, ids)
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert_grads_close(grads, grads_ref, **FP32_TOL)
    # eval mode: no dropout, no seed drawn, equal to PEFT's (own nn.Dropout) eval forward
    recorder.seeds.clear()
    fused.eval(), plain_peft.eval()
    with torch.no_grad():
        assert_tensors_close(fused(input_ids=ids).logits, plain_peft(input_ids=ids).logits, **FP32_TOL, what="eval")
    assert recorder.seeds == []


def test_single_layer_dropout_matches_reference_oracle(monkeypatch):
    model = peft_mlp(lora_dropout=0.3, lora_bias=True)
    lora_kernels.patch(model)
    layer = model.base_model.model.up
    recorder = SeedRecorder().install(monkeypatch)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    seed = torch.tensor([recorder.seeds[0]])
    x_ref = x.detach().clone().requires_grad_(True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    s = layer.scaling["default"]
    bias = layer.base_layer.bias + s * B.bias
    y_ref = lora_linear_eager(x_ref, layer.base_layer.weight, bias, A.weight, B.weight, s, 0.3, seed)
    gA, gB, gBb, gx = torch.autograd.grad(y_ref, [A.weight, B.weight, B.bias, x_ref], torch.ones_like(y_ref))
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    pairs = ((A.weight.grad, gA, "A"), (B.weight.grad, gB, "B"), (B.bias.grad, gBb, "B.bias"), (x.grad, gx, "x"))
    for got, want, what in pairs:
        assert_tensors_close(got, want, **FP32_TOL, what=what)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_scaling_is_read_per_call(rslora, fused_calls):
    ref = peft_mlp(use_rslora=rslora, lora_bias=True)
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(4, 32)
    for change in (
        lambda m: None,
        lambda m: [layer.set_scale("default", 0.25) for layer in lora_layers(m)],
        lambda m: [layer.scale_layer(3.0) for layer in lora_layers(m)],
        lambda m: [layer.unscale_layer() for layer in lora_layers(m)],
    ):
        change(ref), change(fused)
        assert_runs_match(fused, ref, x)
        assert fused_calls.take() == 2


def test_several_adapters_and_set_adapter(fused_calls):
    ref = peft_mlp()
    torch.manual_seed(5)
    ref.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False))
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(4, 32)
    for active in ("default", "second", ["default", "second"]):
        for m in (ref, fused):
            m.base_model.set_adapter(active)
        y_ref, g_ref = run_layer(ref, x)
        y, g = run_layer(fused, x)
        assert fused_calls.take() == 2  # one fused call per layer, all adapters stacked
        assert_tensors_close(y, y_ref, **FP32_TOL, what=f"y {active}")
        assert_grads_close(g, g_ref, **FP32_TOL)


def test_several_adapters_with_dropout_match_the_same_masks(fused_calls):
    """Two active adapters with dropout: one lora_linear_stacked call, each adapter's mask the
    single-adapter rule under its own seed, the seeds drawn from torch's generator (so
    torch.manual_seed reproduces them)."""
    model = peft_mlp(lora_dropout=0.25)
    torch.manual_seed(5)
    second = LoraConfig(r=2, lora_alpha=3, lora_dropout=0.5, target_modules=["up"], init_lora_weights=False)
    model.add_adapter("second", second)
    model.base_model.set_adapter(["default", "second"])
    lora_kernels.patch(model)
    layer = model.base_model.model.up
    x = torch.randn(6, 32)
    torch.manual_seed(11)
    y = layer(x)
    assert fused_calls.take() == 1
    torch.manual_seed(11)
    seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64)  # what the stacked op drew, one per adapter
    names = ("default", "second")
    want = lora_linear_stacked_eager(
        x, layer.base_layer.weight, layer.base_layer.bias, [layer.lora_A[n].weight for n in names],
        [layer.lora_B[n].weight for n in names], [layer.scaling[n] for n in names], [0.25, 0.5], seeds)
    assert_tensors_close(y, want, **FP32_TOL, what="y")


def test_lora_bias(fused_calls):
    ref = peft_mlp(lora_bias=True)
    fused = twin(ref)
    assert lora_kernels.patch(fused).num_patched == 2
    x = torch.randn(2, 3, 32)
    y_ref, g_ref = run_layer(ref, x)
    y, g = run_layer(fused, x)
    assert fused_calls.take() == 2
    assert any("lora_B.default.bias" in n for n in g)
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert_grads_close(g, g_ref, **FP32_TOL)


def test_merged_and_disabled_adapters_follow_peft(fused_calls):
    ref = peft_mlp()
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(4, 32)
    with ref.disable_adapter(), fused.disable_adapter():
        assert_tensors_close(fused(x), ref(x), **FP32_TOL, what="disabled")
    assert_tensors_close(fused(x), ref(x), **FP32_TOL, what="re-enabled")
    for m in (ref, fused):
        m.merge_adapter()
    with torch.no_grad():
        assert_tensors_close(fused(x), ref(x), **FP32_TOL, what="merged")
    assert fused_calls.take() == 2  # only the re-enabled call was fused
    for m in (ref, fused):
        m.unmerge_adapter()
    assert_runs_match(fused, ref, x, what="unmerged")
    assert fused_calls.take() == 2


def test_mixed_batch_adapter_names_is_one_per_row_call(fused_calls):
    """A mixed batch (adapter_names) is one fused per-row call per layer (more in
    tests/test_integration_multi_adapter.py)."""
    ref = peft_mlp()
    torch.manual_seed(5)
    ref.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False))
    ref.eval()
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(3, 32)
    names = ["default", "second", "__base__"]
    with torch.no_grad():
        assert_tensors_close(fused(x, adapter_names=names), ref(x, adapter_names=names), **FP32_TOL, what="mixed")
        assert fused_calls.variants == ["per_row", "per_row"]
        assert fused_calls.take() == 2
        assert_tensors_close(fused(x), ref(x), **FP32_TOL, what="plain call")
        assert fused_calls.take() == 2


# --- dtypes --------------------------------------------------------------------------------------


def test_bf16_patched_error_is_like_peft_error(fused_calls):
    """bf16 base and adapters: the patched model's error against fp64 PEFT is at most ~2x PEFT-bf16's."""
    exact = peft_llama(dtype=torch.float64)
    ref = peft_llama(dtype=torch.bfloat16)
    fused = twin(ref)
    lora_kernels.patch(fused, strict=True)
    ids = token_batch()
    logits_exact, grads_exact = run_llama(exact, ids)
    logits_ref, grads_ref = run_llama(ref, ids)
    logits, grads = run_llama(fused, ids)
    assert fused_calls.take() == N_LORA_LAYERS
    assert logits.dtype == logits_ref.dtype == torch.bfloat16
    assert_error_like_peft(logits, logits_ref, logits_exact, "logits")
    for name in grads_exact:
        assert_error_like_peft(grads[name], grads_ref[name], grads_exact[name], name)


def test_fp32_adapters_on_bf16_base_fused_under_autocast_or_cast_when_asked(fused_calls):
    """PEFT's default fp32 adapters on a bf16 base: PEFT's forward without autocast (its fp32 LoRA
    branch), fused under autocast, fused in bf16 with cast_adapters=True."""
    ref = peft_mlp(dtype=torch.bfloat16)
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    plain = twin(ref)
    report = lora_kernels.patch(plain)
    assert report.num_patched == 2 and report.num_kept == 0
    assert "under torch.autocast" in next(iter(report.conditional)) and "fused only 2" in str(report)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert_fused_only_under_autocast(plain, ref, x, fused_calls, 2, torch.bfloat16, dict(atol=2e-2, rtol=2e-2))
    cast = twin(ref)
    assert lora_kernels.patch(cast, cast_adapters=True).num_patched == 2
    exact = twin(ref).double()
    y_exact, g_exact = run_layer(exact, x.double())
    y_ref, g_ref = run_layer(ref, x)
    assert fused_calls.take() == 0
    y, g = run_layer(cast, x)
    assert fused_calls.take() == 2
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_error_like_peft(y, y_ref, y_exact, "y")
    for name in g_exact:
        assert g[name].dtype == g_ref[name].dtype  # fp32 grads for the fp32 adapters
        # PEFT computes this LoRA branch in fp32, the cast path in bf16: a bf16-sized error is expected
        assert_error_like_peft(g[name], g_ref[name], g_exact[name], name, slack=2e-2 * g_exact[name].abs().max().item())


def test_autocast_matches_peft_under_autocast(fused_calls):
    ref = peft_mlp()
    fused = twin(ref)
    lora_kernels.patch(fused)
    x = torch.randn(4, 32)
    y_exact, g_exact = run_layer(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref = run_layer(ref, x)
        y, g = run_layer(fused, x)
    assert fused_calls.take() == 2
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_error_like_peft(y, y_ref, y_exact, "y")
    for name in g_exact:
        assert g[name].dtype == g_ref[name].dtype
        assert_error_like_peft(g[name], g_ref[name], g_exact[name], name)


# --- patch / unpatch / report ----------------------------------------------------------------------


def test_patch_twice_is_harmless_and_unpatch_restores_peft():
    model = peft_mlp()
    layers = lora_layers(model)
    state_keys = list(model.state_dict())
    first = lora_kernels.patch(model)
    second = lora_kernels.patch(model)
    assert first.num_patched == second.num_patched == second.already_patched == 2
    for layer in layers:
        assert isinstance(layer.forward, _common.BoundForward) and layer.forward.module is layer
        assert _common.patch_state(layer).original is PeftLoraLinear.forward  # not our own forward
    assert list(model.state_dict()) == state_keys
    x = torch.randn(4, 32)
    y = model(x)
    assert lora_kernels.unpatch(model) == 2
    for layer in layers:
        assert "forward" not in layer.__dict__ and layer.forward.__func__ is PeftLoraLinear.forward
        assert not _common.is_patched(layer)
    assert_tensors_close(model(x), y, **FP32_TOL, what="unpatched")
    assert lora_kernels.unpatch(model) == 0


def test_save_load_round_trip(tmp_path):
    model = peft_mlp(lora_bias=True)
    lora_kernels.patch(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 32)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # same base weights as peft_mlp
    loaded = PeftModel.from_pretrained(TwoLinears(), tmp_path)
    with torch.no_grad():
        assert_tensors_close(loaded(x), y, **FP32_TOL, what="loaded (PEFT forward)")
        lora_kernels.patch(loaded)
        assert_tensors_close(loaded(x), y, **FP32_TOL, what="loaded (patched)")


def test_deepcopy_and_pickle_keep_the_patch():
    import copy
    import io

    model = peft_mlp()
    lora_kernels.patch(model)
    x = torch.randn(2, 32)
    y = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        layers = lora_layers(clone)
        assert all(_common.is_patched(m) and m.forward.module is m for m in layers)
        assert_tensors_close(clone(x), y, **FP32_TOL, what="clone")
        assert lora_kernels.unpatch(clone) == 2


class _MixedTargets(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(4, 4, 1)
        self.hooked = nn.Linear(16, 16)

    def forward(self, x):
        return self.hooked(self.q(x))


def test_fallback_reasons_reported_and_strict_raises():
    torch.manual_seed(0)
    model = get_peft_model(
        _MixedTargets(),
        LoraConfig(r=2, target_modules=["q", "emb", "conv", "hooked"], init_lora_weights=False),
    )
    model.base_model.model.hooked.base_layer.register_forward_hook(lambda m, i, o: None)
    from transformers.pytorch_utils import Conv1D

    gpt2_like = get_peft_model(
        nn.Sequential(Conv1D(16, 16)), LoraConfig(r=2, target_modules=["0"], fan_in_fan_out=True)
    )
    x = torch.randn(3, 16)

    with pytest.raises(ValueError) as excinfo:
        lora_kernels.patch(model, strict=True)
    message = str(excinfo.value)
    assert "base_model.model.emb" in message and "base_model.model.conv" in message and "hooked" in message
    assert not any(_common.is_patched(m) for m in model.modules())  # strict patches nothing

    y_ref = model(x)
    report = lora_kernels.patch(model)
    reasons = " | ".join(report.kept)
    assert report.num_patched == 1 and report.num_kept == 3, str(report)
    assert "Embedding is not a lora.Linear" in reasons and "Conv2d is not a lora.Linear" in reasons
    assert "forward hooks on the base layer" in reasons
    assert "kept 1" in str(report) and "1 LoRA layer(s) fused" in str(report)
    assert_tensors_close(model(x), y_ref, **FP32_TOL, what="partially patched")

    report = lora_kernels.patch(gpt2_like)
    assert report.num_patched == 0 and "fan_in_fan_out" in next(iter(report.kept)), str(report)


def test_instance_forward_replaced_by_someone_else_is_kept():
    model = peft_mlp()
    layer = model.base_model.model.up
    layer.forward = lambda x, *a, **k: PeftLoraLinear.forward(layer, x, *a, **k)  # e.g. accelerate's hook
    report = lora_kernels.patch(model)
    assert report.num_patched == 1 and "forward already replaced" in next(iter(report.kept))


def test_import_lora_kernels_does_not_need_peft():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['peft'] = None; sys.modules['torchtune'] = None\n"
        "import lora_kernels, warnings\n"
        "with warnings.catch_warnings(record=True): r = lora_kernels.patch(__import__('torch').nn.Linear(2, 2))\n"
        "assert r.num_patched == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- training machinery -----------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_regenerates_the_same_masks(reentrant, fused_calls):
    """p > 0 under checkpointing: the recomputed forward draws the same seeds, so logits and
    gradients equal the un-checkpointed patched model's for the same torch.manual_seed."""
    plain = peft_llama(dropout=0.3)
    ckpt = twin(plain)
    for m in (plain, ckpt):
        lora_kernels.patch(m)
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.base_model.model.enable_input_require_grads()
    plain.train(), ckpt.train()
    ids = token_batch()
    torch.manual_seed(3)
    logits_ref, grads_ref = run_llama(plain, ids)
    assert fused_calls.take() == N_LORA_LAYERS
    torch.manual_seed(3)
    logits, grads = run_llama(ckpt, ids)
    assert fused_calls.take() == 2 * N_LORA_LAYERS  # forward + recomputation
    assert_tensors_close(logits, logits_ref, atol=1e-6, rtol=1e-6, what="logits")
    assert_grads_close(grads, grads_ref, atol=1e-6, rtol=1e-5)


def test_torch_compile_fullgraph():
    """A patched PEFT model compiles with fullgraph=True (inductor), the graph holds the fused op,
    and it computes what eager computes (fallback_random: the seed comes from torch's generator)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    model = peft_mlp(lora_dropout=0.1)
    lora_kernels.patch(model)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(4, 32)
    torch.manual_seed(7)
    y_ref, g_ref = run_layer(model, x)
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(7)
        y, g = run_layer(compiled, x, params_of=model)
    assert sum("lora_kernels.lora_linear" in t for t in targets) == 2, targets
    assert_tensors_close(y, y_ref, **FP32_TOL, what="compiled")
    assert_grads_close(g, g_ref, **FP32_TOL)


def test_torch_compile_fullgraph_tiny_llama():
    """The whole patched tiny Llama (HF code + PEFT + the fused op) traces with fullgraph=True."""
    torch._dynamo.reset()
    model = peft_llama(dropout=0.1)
    lora_kernels.patch(model)
    ids = token_batch()
    torch.manual_seed(3)
    logits_ref, grads_ref = run_llama(model, ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_tensors_close(out.logits.detach(), logits_ref, **FP32_TOL, what="logits")
    assert_grads_close(grads, grads_ref, **FP32_TOL)


# --- drop-in safety (issue 12) -----------------------------------------------------------------


def test_lora_and_adalora_mixed_model_adds_onto_the_fused_output():
    """A PeftMixedModel with an AdaLoRA adapter on a patched LoRA layer does `result += ...` on the
    fused op's output (an in-place op on a custom Function's output) and must equal PEFT."""
    from peft import AdaLoraConfig

    def build():
        torch.manual_seed(0)
        model = get_peft_model(
            TwoLinears(), LoraConfig(r=4, target_modules=["up"], init_lora_weights=False), "adapter0", mixed=True
        )
        model.add_adapter("ada", AdaLoraConfig(init_r=4, target_modules=["up"], init_lora_weights=False, total_step=1))
        model.set_adapter(["adapter0", "ada"])
        return model

    plain, patched = build(), build()
    assert lora_kernels.patch(patched).num_patched == 1
    x = torch.randn(3, 5, 32)
    y_ref, grads_ref = run_layer(plain, x)
    y, grads = run_layer(patched, x)
    assert_tensors_close(y, y_ref, **FP32_TOL)
    assert_grads_close(grads, grads_ref, **FP32_TOL)


def test_lora_dropout_1_is_served_like_peft(fused_calls):
    plain, patched = peft_mlp(lora_dropout=1.0), peft_mlp(lora_dropout=1.0)
    lora_kernels.patch(patched, strict=True)
    x = torch.randn(3, 5, 32)
    y_ref, grads_ref = run_layer(plain, x)
    y, grads = run_layer(patched, x)
    assert fused_calls.take() == 2
    assert_tensors_close(y, y_ref, **FP32_TOL)
    assert_grads_close(grads, grads_ref, **FP32_TOL)
    assert all(not g.any() for name, g in grads.items() if "lora_" in name)


def test_scaling_beyond_half_range_keeps_peft_forward(fused_calls):
    plain, patched = peft_mlp(torch.float16), peft_mlp(torch.float16)
    lora_kernels.patch(patched, strict=True)
    for model in (plain, patched):
        for layer in lora_layers(model):
            layer.scaling["default"] = 1e300
    x = torch.randn(3, 32, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), plain(x), atol=0, rtol=0, equal_nan=True)
    assert fused_calls.take() == 0
