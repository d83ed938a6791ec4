# SPDX-License-Identifier: Apache-2.0
"""lora_kernels.integrations.torchtune: a patched torchtune model computes what torchtune computes.

torchtune is optional; it also needs a torchao that imports under the installed torch."""

from __future__ import annotations

import copy

import pytest
import torch

try:
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.peft import DoRALinear, LoRALinear, QATLoRALinear, disable_adapter
except Exception as exc:  # ImportError, or torchao failing against this torch
    pytest.skip(f"torchtune (with a working torchao) is not importable: {exc}", allow_module_level=True)

import lora_kernels  # noqa: E402
from lora_kernels.integrations import _common  # noqa: E402
from integration_helpers import (  # noqa: E402
    FusedCalls,
    MirrorDropout,
    SeedRecorder,
    assert_grads_close,
    assert_tensors_close,
    token_batch,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-4)
MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]


def tiny_lora_llama2(dropout=0.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = lora_llama2(
        MODULES, apply_lora_to_mlp=True, apply_lora_to_output=True, vocab_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, embed_dim=32, max_seq_len=32, lora_rank=4, lora_alpha=8.0, lora_dropout=dropout, **kwargs,
    )
    for module in model.modules():  # lora_b starts at zero: make every gradient non-trivial
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b.weight, std=0.1)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def lora_count(model):
    return sum(isinstance(m, LoRALinear) for m in model.modules())


@pytest.fixture
def fused_calls(monkeypatch):
    return FusedCalls(monkeypatch)


def test_patched_equals_torchtune_p0(fused_calls):
    ref = tiny_lora_llama2()
    fused = copy.deepcopy(ref)
    report = lora_kernels.patch(fused, strict=True)
    n = lora_count(ref)
    assert report.num_patched == n == 2 * (len(MODULES) + 3) + 1, str(report)
    ids = token_batch()
    logits_ref, grads_ref = run(ref, ids)
    logits, grads = run(fused, ids)
    assert fused_calls.take() == n
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert len(grads) == 2 * n
    assert_grads_close(grads, grads_ref, **FP32_TOL)


def test_dropout_equals_torchtune_with_the_same_masks(monkeypatch):
    ref = tiny_lora_llama2(dropout=0.25)
    fused = copy.deepcopy(ref)
    lora_kernels.patch(fused)
    recorder = SeedRecorder().install(monkeypatch)
    ids = token_batch()
    logits, grads = run(fused, ids)
    assert len(recorder.seeds) == lora_count(ref)
    seeds = list(recorder.seeds)
    for module in ref.modules():
        if isinstance(module, LoRALinear):
            module.dropout = MirrorDropout(module.dropout.p, seeds)
    logits_ref, grads_ref = run(ref, ids)
    assert_tensors_close(logits, logits_ref, **FP32_TOL, what="logits")
    assert_grads_close(grads, grads_ref, **FP32_TOL)


def test_disabled_eval_and_unpatch(fused_calls):
    ref = tiny_lora_llama2(dropout=0.25)
    fused = copy.deepcopy(ref)
    lora_kernels.patch(fused)
    ids = token_batch()
    with torch.no_grad():
        with disable_adapter(ref), disable_adapter(fused):
            assert_tensors_close(fused(ids), ref(ids), **FP32_TOL, what="disabled")
        assert fused_calls.take() == 0
        ref.eval(), fused.eval()
        assert_tensors_close(fused(ids), ref(ids), **FP32_TOL, what="eval")
        assert fused_calls.take() == lora_count(ref)
    assert lora_kernels.unpatch(fused) == lora_count(ref)
    assert not any(_common.is_patched(m) for m in fused.modules())
    assert all("forward" not in m.__dict__ for m in fused.modules() if isinstance(m, LoRALinear))


def test_fallback_reasons():
    dora_with_bias = DoRALinear(16, 16, rank=2, alpha=4.0, use_bias=True)
    report = lora_kernels.patch(torch.nn.Sequential(dora_with_bias))
    assert report.num_patched == 0 and "DoRALinear with a bias" in next(iter(report.kept)), str(report)
    qat = QATLoRALinear(16, 16, rank=2, alpha=4.0)
    report = lora_kernels.patch(torch.nn.Sequential(qat))
    assert report.num_patched == 0 and "QATLoRALinear" in next(iter(report.kept)), str(report)
    try:
        nf4 = LoRALinear(128, 128, rank=2, alpha=4.0, quantize_base=True)
    except Exception as exc:  # pragma: no cover - NF4 unavailable in this torchao
        pytest.skip(f"NF4 quantize_base unavailable: {exc}")
    report = lora_kernels.patch(torch.nn.Sequential(nf4))
    assert report.num_patched == 0 and "quantize_base" in next(iter(report.kept)), str(report)
    with pytest.raises(ValueError, match="quantize_base"):
        lora_kernels.patch(torch.nn.Sequential(nf4), strict=True)
