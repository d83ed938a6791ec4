# SPDX-License-Identifier: Apache-2.0
"""PEFT's DoRA (`use_dora=True`) and QLoRA (`lora.bnb.Linear4bit` on a bitsandbytes NF4/FP4 base)
layers and torchtune's `DoRALinear` served by the fused op: outputs and gradients (A, B,
magnitude, x) equal the frameworks' own layers, the report counts them as fused, and calls the
fused op cannot reproduce run the framework's forward.

The DoRA variant and the 4-bit base formats come from `lora_kernels.variants` /
`lora_kernels.base_weights`; without them these layers keep the framework's forward (tested
here too) and the equality tests skip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels.base_weights import FORMATS  # noqa: E402
from lora_kernels.variants import VARIANTS  # noqa: E402
import integration_helpers as helpers  # noqa: E402
from integration_helpers import FP32_TOL, assert_grads_close, assert_tensors_close, run_layer, twin  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception as exc:  # ImportError, or a broken native library
    bnb, BNB_MISSING = None, f"bitsandbytes not importable: {exc}"
else:
    BNB_MISSING = None

HAS_DORA = "dora" in VARIANTS
needs_dora = pytest.mark.skipif(not HAS_DORA, reason="lora_kernels has no 'dora' variant (lora_kernels.variants)")
needs_4bit = pytest.mark.skipif(
    bnb is None or not {"nf4", "fp4"} <= set(FORMATS),
    reason=BNB_MISSING or "lora_kernels has no 'nf4'/'fp4' base format (lora_kernels.base_weights)",
)
MODES = ["p0", "eval", "dropout"]  # p = 0 in training, eval mode (p > 0 configured), p > 0 in training


@pytest.fixture
def fused_calls(monkeypatch):
    return helpers.FusedCalls(monkeypatch)


def _serves_4bit(backend: str):
    """Why `backend` cannot run a 4-bit base here, or None (a compiled lora_kernels._C built before
    its ops took weight=None cannot)."""
    from lora_kernels.base_weights import NF4Weight

    layer = peft_qlora()
    x = torch.randn(2, 128)
    weight = NF4Weight.from_bnb(qlora_layer(layer).base_layer.weight, torch.float32)
    a, b = torch.randn(4, 128), torch.randn(64, 4)
    try:
        lora_kernels.lora_linear(x, weight, None, a, b, 1.0, 0.0, backend=backend)
    except RuntimeError as exc:
        return f"backend {backend!r} cannot run a 4-bit base in this build: {exc}".splitlines()[0]
    return None


@pytest.fixture(params=helpers.CPU_BACKENDS)
def backend4bit(request):
    reason = _serves_4bit(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def with_mode(model, mode):
    model.train(mode != "eval")
    return model


def same_masks_run(monkeypatch, fused, ref, x, run=run_layer):
    """Run the patched `fused`, then `ref` (unpatched PEFT) with the masks the fused calls drew."""
    recorder = helpers.SeedRecorder().install(monkeypatch)
    got = run(fused, x)
    helpers.mirror_peft_dropouts(ref, list(recorder.seeds))
    return got, run(ref, x), recorder.seeds


# --- QLoRA ----------------------------------------------------------------------------------------


class FourBit(nn.Module):
    """One bitsandbytes Linear4bit (K=128 -> N=64, bias) built from a seeded nn.Linear; PEFT
    dispatches LoRA on it to `lora.bnb.Linear4bit` (`is_loaded_in_4bit`)."""

    is_loaded_in_4bit = True

    def __init__(self, quant_type="nf4", double_quant=False, compute_dtype=torch.float32, dtype=torch.float32,
                 blocksize=64, k=128, n=64):
        super().__init__()
        torch.manual_seed(0)
        dense = nn.Linear(k, n)
        layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant, blocksize=blocksize)
        layer.bias = nn.Parameter(dense.bias.data.to(compute_dtype or dtype), requires_grad=False)
        self.proj = layer.to("cpu")  # quantizes

    def forward(self, x):
        return self.proj(x)


def peft_qlora(quant_type="nf4", double_quant=False, dropout=0.0, dora=False, adapter_dtype=torch.float32, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False,
                        use_dora=dora)
    torch.manual_seed(1)
    model = get_peft_model(FourBit(quant_type, double_quant, **kwargs), config, autocast_adapter_dtype=False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(adapter_dtype)
    return model


def qlora_layer(model):
    return model.base_model.model.proj


@needs_4bit
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_equals_peft(monkeypatch, fused_calls, backend4bit, quant_type, double_quant, mode):
    ref = with_mode(peft_qlora(quant_type, double_quant, dropout=0.0 if mode == "p0" else 0.2), mode)
    fused = twin(ref)
    report = lora_kernels.patch(fused, strict=True, backend=backend4bit)
    assert report.num_patched == 1 and report.num_kept == 0, str(report)
    assert type(qlora_layer(fused)).__name__ == "Linear4bit"
    x = torch.randn(2, 5, 128)
    (y, grads), (y_ref, grads_ref), seeds = same_masks_run(monkeypatch, fused, ref, x)
    assert fused_calls.take() == 1
    assert len(seeds) == (1 if mode == "dropout" else 0)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert sorted(grads) == ["base_model.model.proj.lora_A.default.weight",
                             "base_model.model.proj.lora_B.default.weight", "x"]
    assert_grads_close(grads, grads_ref, **FP32_TOL)


@needs_4bit
def test_qlora_base_weight_is_built_once(monkeypatch, backend4bit):
    model = peft_qlora(double_quant=True)
    lora_kernels.patch(model, strict=True, backend=backend4bit)
    built = []
    original = FORMATS["nf4"].from_bnb
    counting = classmethod(lambda cls, *a, **k: built.append(1) or original(*a, **k))
    monkeypatch.setattr(FORMATS["nf4"], "from_bnb", counting)
    x = torch.randn(3, 128)
    for _ in range(3):
        run_layer(model, x)
    assert len(built) <= 1  # the de-nested absmax is kept with the frozen weight, not rebuilt per call


@needs_4bit
def test_qlora_bf16_compute_and_fp32_adapters(fused_calls, backend4bit):
    """bf16 compute dtype, fp32 x: bitsandbytes casts x to bf16 and the result back to fp32. With
    bf16 adapters the whole call is fused; PEFT's default fp32 adapters compute the LoRA term in
    fp32, so they run PEFT's forward unless under torch.autocast(bf16) or cast_adapters=True."""
    x = torch.randn(4, 128)
    ref = peft_qlora(compute_dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    exact = twin(ref).float()  # the same (bf16-rounded) adapters and 4-bit weight, computed in fp32
    qlora_layer(exact).base_layer.compute_dtype = torch.float32
    y_exact, g_exact = run_layer(exact, x)
    fused = twin(ref)
    report = lora_kernels.patch(fused, strict=True, backend=backend4bit)
    assert not report.conditional, str(report)
    y_ref, g_ref = run_layer(ref, x)
    assert fused_calls.take() == 0
    y, g = run_layer(fused, x)
    assert fused_calls.take() == 1
    assert y.dtype == y_ref.dtype == torch.float32
    helpers.assert_error_like_peft(y, y_ref, y_exact, "y", slack=1e-3 * y_exact.abs().max().item())
    for name in g_ref:
        assert g[name].dtype == g_ref[name].dtype
        slack = 1e-3 * g_exact[name].abs().max().item()
        helpers.assert_error_like_peft(g[name], g_ref[name], g_exact[name], name, slack=slack)

    ref32 = peft_qlora(compute_dtype=torch.bfloat16, adapter_dtype=torch.float32)
    plain = twin(ref32)
    report = lora_kernels.patch(plain, backend=backend4bit)
    assert report.num_patched == 1 and "under torch.autocast" in next(iter(report.conditional)), str(report)
    # fp32 out under autocast: PEFT casts the LoRA term back (it reads the CUDA autocast flag, off here)
    helpers.assert_fused_only_under_autocast(plain, ref32, x, fused_calls, 1, torch.float32, dict(atol=5e-2, rtol=5e-2))
    cast = twin(ref32)
    lora_kernels.patch(cast, cast_adapters=True, backend=backend4bit)
    y, g = run_layer(cast, x)
    assert fused_calls.take() == 1
    assert y.dtype == torch.float32 and all(g[n].dtype == torch.float32 for n in g)


@needs_4bit
def test_qlora_bias_in_another_dtype_runs_peft_once(fused_calls, backend4bit):
    """bitsandbytes converts a bias of another dtype in place on its first call: that call runs
    PEFT's forward, later calls are fused."""
    model = peft_qlora(compute_dtype=torch.float32)
    layer = qlora_layer(model)
    layer.base_layer.bias.data = layer.base_layer.bias.data.half()
    lora_kernels.patch(model, strict=True, backend=backend4bit)
    x = torch.randn(3, 128)
    model(x)
    assert fused_calls.take() == 0 and layer.base_layer.bias.dtype == torch.float32
    model(x)
    assert fused_calls.take() == 1


@needs_4bit
def test_qlora_unsupported_blocksize_is_reported():
    ok = peft_qlora()
    assert lora_kernels.patch(ok).num_patched == 1
    bad = peft_qlora()
    qlora_layer(bad).base_layer.weight.quant_state.blocksize = 48
    with pytest.raises(ValueError, match="blocksize"):
        lora_kernels.patch(bad, strict=True)


def test_qlora_without_the_4bit_format_keeps_peft_forward(monkeypatch):
    if bnb is None:
        pytest.skip(BNB_MISSING)
    for name in ("nf4", "fp4"):
        monkeypatch.delitem(FORMATS, name, raising=False)
    report = lora_kernels.patch(peft_qlora())
    assert report.num_patched == 0 and "'nf4' format" in next(iter(report.kept)), str(report)


@needs_4bit
@needs_dora
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_dora_equals_peft(monkeypatch, fused_calls, backend4bit, quant_type, mode):
    ref = with_mode(peft_qlora(quant_type, True, dropout=0.0 if mode == "p0" else 0.2, dora=True), mode)
    fused = twin(ref)
    assert lora_kernels.patch(fused, strict=True, backend=backend4bit).num_patched == 1
    x = torch.randn(2, 5, 128)
    (y, grads), (y_ref, grads_ref), _ = same_masks_run(monkeypatch, fused, ref, x)
    assert fused_calls.variants == ["dora"]
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert any("lora_magnitude_vector" in n for n in grads)
    assert_grads_close(grads, grads_ref, **FP32_TOL)


# --- DoRA (dense base) -------------------------------------------------------------------------------


@needs_dora
@pytest.mark.parametrize("mode", MODES)
def test_dora_llama_equals_peft(monkeypatch, fused_calls, mode):
    ref = with_mode(helpers.peft_llama(dropout=0.0 if mode == "p0" else 0.2, use_dora=True), mode)
    fused = twin(ref)
    report = lora_kernels.patch(fused, strict=True)
    assert report.num_patched == 14 and report.num_kept == 0, str(report)
    ids = helpers.token_batch()
    (logits, grads), (logits_ref, grads_ref), _ = same_masks_run(
        monkeypatch, fused, ref, ids, run=lambda m, i: helpers.run_llama(m, i)
    )
    assert fused_calls.take() == 14 and set(fused_calls.variants) <= {"dora"}
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert sum("lora_magnitude_vector" in n for n in grads) == 14
    assert_grads_close(grads, grads_ref, **FP32_TOL)


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.proj(x)


@needs_dora
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_single_layer_x_grad_and_bias(monkeypatch, fused_calls, p):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["proj"], init_lora_weights=False,
                        use_dora=True)
    ref = get_peft_model(OneLinear(), config)
    fused = twin(ref)
    lora_kernels.patch(fused, strict=True)
    x = torch.randn(3, 4, 32)
    (y, grads), (y_ref, grads_ref), seeds = same_masks_run(monkeypatch, fused, ref, x)
    assert fused_calls.take() == 1 and len(seeds) == (p > 0)
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert "x" in grads and any("magnitude" in n for n in grads)
    assert_grads_close(grads, grads_ref, **FP32_TOL)


@needs_dora
def test_dora_under_autocast_runs_peft_forward(fused_calls):
    """PEFT's DoRA under autocast computes the magnitude scale in fp32 and the LoRA term in the
    autocast dtype; one fused call in one dtype does not reproduce that, so PEFT's forward runs."""
    ref = helpers.peft_llama(use_dora=True)
    fused = twin(ref)
    report = lora_kernels.patch(fused, strict=True)
    assert any("without torch.autocast" in c for c in report.conditional), str(report)
    ids = helpers.token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ref, grads_ref = helpers.run_llama(ref, ids)
        logits, grads = helpers.run_llama(fused, ids)
    assert fused_calls.take() == 0
    assert torch.equal(logits, logits_ref)
    assert_grads_close(grads, grads_ref, atol=0, rtol=0)


@needs_dora
def test_several_adapters_with_dora_keep_peft_forward(fused_calls):
    ref = helpers.peft_llama(use_dora=True)
    torch.manual_seed(5)
    ref.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False))
    fused = twin(ref)
    report = lora_kernels.patch(fused, strict=True)
    assert report.num_patched == 14
    assert any("one adapter is active" in c for c in report.conditional), str(report)
    ids = helpers.token_batch()
    fused.base_model.set_adapter(["default", "second"]), ref.base_model.set_adapter(["default", "second"])
    logits, grads = helpers.run_llama(fused, ids)
    logits_ref, grads_ref = helpers.run_llama(ref, ids)
    assert fused_calls.take() == 12  # the two q_proj layers hold both adapters: PEFT's forward
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert_grads_close(grads, grads_ref, **FP32_TOL)


def test_dora_without_the_variant_keeps_peft_forward(monkeypatch):
    monkeypatch.delitem(VARIANTS, "dora", raising=False)
    model = helpers.peft_llama(use_dora=True)
    report = lora_kernels.patch(model)
    assert report.num_patched == 0 and report.num_kept == 14, str(report)
    assert "no 'dora' variant" in next(iter(report.kept))


# --- torchtune DoRALinear -----------------------------------------------------------------------------


def _torchtune_dora():
    try:
        from torchtune.modules.peft import DoRALinear
    except Exception as exc:  # ImportError, or torchao failing against this torch
        pytest.skip(f"torchtune (with a working torchao) is not importable: {exc}")
    return DoRALinear


@needs_dora
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_torchtune_dora_equals_torchtune(fused_calls, dropout):
    DoRALinear = _torchtune_dora()
    torch.manual_seed(0)
    ref = nn.Sequential(DoRALinear(32, 24, rank=4, alpha=8.0, dropout=dropout))
    nn.init.normal_(ref[0].lora_b.weight, std=0.1)
    ref[0].initialize_dora_magnitude()
    with torch.no_grad():
        ref[0].magnitude.mul_(1.5)
    fused = copy.deepcopy(ref)
    report = lora_kernels.patch(fused, strict=True)
    assert report.num_patched == 1
    assert any("in eval mode" in c for c in report.conditional) == (dropout > 0), str(report)
    x = torch.randn(3, 5, 32)
    fused.eval()
    fused(x)  # a trainable base weight: DoRA's served form gives W₀ no gradient, torchtune's forward runs
    assert fused_calls.take() == 0
    for model in (ref, fused):
        model[0].weight.requires_grad_(False)
    ref.eval(), fused.eval()
    (y, grads), (y_ref, grads_ref) = run_layer(fused, x), run_layer(ref, x)
    assert fused_calls.variants == ["dora"]
    assert_tensors_close(y, y_ref, **FP32_TOL, what="y")
    assert "0.magnitude" in grads
    assert_grads_close(grads, grads_ref, **FP32_TOL)
    fused.train()
    fused_calls.take()
    fused(x)
    assert fused_calls.take() == (0 if dropout > 0 else 1)  # torchtune's DoRA dropout: its own forward
