# SPDX-License-Identifier: Apache-2.0
"""Helpers for the PEFT / torchtune / Trainer / DDP integration tests: tiny models, seed recording
and the dropout mirror that lets an unpatched model reproduce the fused op's masks."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

import lora_kernels
from lora_kernels.dropout import draw_seed, dropout_multiplier

FP32_TOL = dict(atol=1e-5, rtol=1e-4)
CPU_BACKENDS = [b for b in lora_kernels.available_backends("cpu") if b != "triton"]  # triton: interpreter only
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden=32, layers=2, heads=4, vocab=64, intermediate=64, seed=0, dtype=torch.float32):
    """A randomly initialised LlamaForCausalLM (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(dtype)


def peft_llama(dropout=0.0, r=4, alpha=8, dtype=torch.float32, seed=0, **lora_kwargs):
    """tiny_llama with PEFT LoRA on all seven projections; lora_B random so every gradient is non-zero."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(dtype=dtype, seed=seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LLAMA_PROJECTIONS,
        init_lora_weights=False,
        **lora_kwargs,
    )
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def token_batch(batch=2, seq=8, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def run_llama(model, ids, backward=True):
    """(logits, {name: grad}) of one forward (+ backward of the LM loss)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    if not backward:
        return out.logits.detach(), {}
    out.loss.backward()
    return out.logits.detach(), trainable_grads(model)


def run_layer(model, x, params_of=None):
    """(y, {param name: grad} + {"x": grad}) of sum(y²) through `model` (grads of `params_of`'s parameters)."""
    params_of = model if params_of is None else params_of
    params_of.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in params_of.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def assert_runs_match(fused, ref, x, what="y", tol=FP32_TOL):
    """run_layer of the patched `fused` equals that of `ref` (output and every gradient)."""
    y_ref, g_ref = run_layer(ref, x)
    y, g = run_layer(fused, x)
    assert_tensors_close(y, y_ref, **tol, what=what)
    assert_grads_close(g, g_ref, **tol)


def assert_fused_only_under_autocast(fused, ref, x, fused_calls, calls, dtype, tol):
    """Without autocast the patched `fused` runs `ref`'s own forward (bit-identical, no fused call);
    under torch.autocast(bf16) it makes `calls` fused calls, with ref's output dtype `dtype`, close to ref."""
    assert torch.equal(fused(x), ref(x))
    assert fused_calls.take() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, _ = run_layer(ref, x)
        y, _ = run_layer(fused, x)
    assert fused_calls.take() == calls
    assert y.dtype == y_ref.dtype == dtype
    assert_tensors_close(y, y_ref, **tol, what="autocast")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_error_like_peft(actual, peft_result, exact, what, slack=1e-2):
    """The patched result's error against `exact` is at most ~2x PEFT's own (error-ratio test)."""
    assert max_err(actual, exact) <= 2 * max_err(peft_result, exact) + slack, (
        f"{what}: patched err {max_err(actual, exact):.3g} vs PEFT err {max_err(peft_result, exact):.3g}"
    )


def assert_tensors_close(actual, expected, atol, rtol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((err <= bound).all()), f"{what}: max abs err {err.max().item():.3g} (atol={atol}, rtol={rtol})"


def assert_grads_close(actual, expected, atol, rtol):
    assert actual.keys() == expected.keys() and actual, (sorted(actual), sorted(expected))
    for name in expected:
        assert_tensors_close(actual[name], expected[name], atol, rtol, name)


def twin(model):
    """An independent copy (same parameters) to patch while `model` stays PEFT's."""
    return copy.deepcopy(model)


class SeedRecorder:
    """Stands in for `lora_kernels.dropout.draw_seed` wherever lora_kernels imported it (the op,
    the variants): draws the same seeds and remembers them in order."""

    def __init__(self):
        self.seeds = []

    def __call__(self, device, count=1):
        seed = draw_seed(device, count)
        self.seeds.extend(seed.tolist())
        return seed

    def install(self, monkeypatch):
        for name, module in list(sys.modules.items()):
            if name.startswith("lora_kernels") and getattr(module, "draw_seed", None) is draw_seed:
                monkeypatch.setattr(module, "draw_seed", self)
        return self


class MirrorDropout(nn.Module):
    """Dropout with the lora_kernels mask of the next recorded seed (the Python mirror of the generator)."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        k = x.shape[-1]
        d = dropout_multiplier(self.seeds.pop(0), x.numel() // k, k, self.p, x.dtype, x.device)
        return x * d.reshape(x.shape)


def mirror_peft_dropouts(model, seeds):
    """Replace every PEFT lora_dropout nn.Dropout by a MirrorDropout consuming `seeds` in call order."""
    from peft.tuners.lora.layer import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in list(module.lora_dropout.items()):
                if isinstance(dropout, nn.Dropout):
                    module.lora_dropout[name] = MirrorDropout(dropout.p, seeds).train(dropout.training)


class FusedCalls:
    """Counts the calls the integrations make to the fused op (`adapter.fused_op`), so a test can
    tell the fused path from a delegation to the framework's own forward; `variants` lists the
    variant of each call."""

    def __init__(self, monkeypatch):
        from lora_kernels.integrations import adapter

        self.count, self.variants = 0, []
        original = adapter.fused_op

        def counting(variant, *args, **kwargs):
            self.count += 1
            self.variants.append(variant)
            return original(variant, *args, **kwargs)

        monkeypatch.setattr(adapter, "fused_op", counting)

    def take(self):
        count, self.count = self.count, 0
        self.variants = []
        return count
