# SPDX-License-Identifier: Apache-2.0
"""The many-adapter rows (issue 11), PEFT layers with several adapters, timed as

  base        the frozen base linear alone (F.linear)
  peft        the PEFT model, unpatched
  fused:<b>   the same model after `lora_kernels.patch(..., backend=b)`

Sets:
  multi   training: T adapters all active (summed), each with dropout p, fwd and fwd+bwd
  mixed   serving: a mixed batch, `model(x, adapter_names=[...])` in eval mode under no_grad, x of
          (sequences, tokens, K); sequence i uses adapter i mod (T + 1), the last being "__base__"
  decode  serving: one token per sequence, sequence i uses adapter i mod T (every adapter in use)
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from bench.cases import Case, Provider, _provider, _tensors, patched_providers


def _peft_model(case: Case, dropout: float):
    """(PEFT model over one nn.Linear with case.adapters adapters "a0".."a{T-1}", its LoRA layer,
    x, weight, bias, grad_y) or None without peft. Adapter t: rank case.r, alpha 2r, random B."""
    try:
        import peft
    except ImportError:
        return None
    x, weight, bias, _, _, grad_y = _tensors(case)
    linear = nn.Linear(case.k, case.n, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    names = [f"a{t}" for t in range(case.adapters)]
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=dropout, target_modules=["0"])
    model = peft.get_peft_model(nn.Sequential(linear), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model[0]
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name in names:
            for module, scale in ((layer.lora_A[name], case.k**-0.5), (layer.lora_B[name], 0.01)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * scale)
    return model, layer, names, x, weight, bias, grad_y


def training_providers(case: Case, backends: List[str], with_peft: bool = True) -> Dict[str, Provider]:
    """The `multi` set: every adapter active (summed) with dropout case.p, in training mode."""
    built = _peft_model(case, case.p)
    if built is None:
        return {}
    model, layer, names, x, weight, bias, grad_y = built
    model.base_model.set_adapter(names)  # several active adapters: PEFT sums their terms
    model.train()
    out = {"base": _provider(lambda: F.linear(x, weight, bias), (x,), grad_y, [weight, bias], x)}

    def provider(m) -> Provider:
        lay = m.base_model.model[0]
        inputs = (x, *(lay.lora_A[n].weight for n in names), *(lay.lora_B[n].weight for n in names))
        return _provider(lambda: m(x), inputs, grad_y, list(m.parameters()), x)

    if with_peft:
        out["peft"] = provider(model)
    out.update(patched_providers(model, backends, provider))
    return out


def _inference(fn, x) -> Provider:
    def forward():
        with torch.no_grad():
            return fn()

    return Provider(forward, None, [], x)


def serving_providers(case: Case, backends: List[str], with_peft: bool = True) -> Dict[str, Provider]:
    """The `mixed` and `decode` sets: a mixed batch in eval mode; x is (M / seq_len, seq_len, K)."""
    built = _peft_model(case, 0.0)
    if built is None:
        return {}
    model, layer, names, x, weight, bias, _ = built
    model.eval()
    x = x.detach().reshape(case.m // case.seq_len, case.seq_len, case.k)
    choices = names + ["__base__"] if case.base_rows else names
    adapter_names = [choices[i % len(choices)] for i in range(x.shape[0])]
    out = {"base": _inference(lambda: F.linear(x, weight, bias), x)}
    if with_peft:
        out["peft"] = _inference(lambda: model(x, adapter_names=adapter_names), x)
    out.update(patched_providers(model, backends, lambda m: _inference(lambda: m(x, adapter_names=adapter_names), x)))
    return out
