# SPDX-License-Identifier: Apache-2.0
"""The QLoRA rows (`python -m bench --set qlora`): PEFT's `lora.bnb.Linear4bit` on a bitsandbytes
NF4 base (compute dtype = the set's dtype, double quantization on, as QLoRA trains), timed as

  base         the frozen 4-bit base layer alone (bitsandbytes' Linear4bit, grad of x only)
  peft         PEFT's QLoRA layer, unpatched
  fused:<b>    the same layer after `lora_kernels.patch(..., backend=b)`

and, per provider, the peak memory of one forward+backward (`peak_memory`)."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from bench.cases import Case, Provider, _provider, _tensors, patched_providers
from bench.harness import peak_allocated_bytes


class _FourBit(nn.Module):
    is_loaded_in_4bit = True  # PEFT then wraps the layer in lora.bnb.Linear4bit

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _qlora_model(case: Case):
    """(unpatched PEFT model, its layer, x, grad_y) or None without peft/bitsandbytes."""
    try:
        import bitsandbytes as bnb
        import peft
    except Exception:  # ImportError, or a broken native library
        return None
    x, weight, bias, lora_A, lora_B, grad_y = _tensors(case)
    base = bnb.nn.Linear4bit(case.k, case.n, bias=True, compute_dtype=case.dtype, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    base.bias = nn.Parameter(bias.cpu(), requires_grad=False)
    base = base.to(case.device)  # quantizes
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p, target_modules=["proj"])
    model = peft.get_peft_model(_FourBit(base), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    model.train()
    return model, layer, x, grad_y


def providers(case: Case, backends: List[str], with_peft: bool = True) -> Dict[str, Provider]:
    """name -> Provider: "base" (the 4-bit layer alone), "peft", "fused:<backend>" each ({} without
    peft or bitsandbytes). `with_peft` is ignored: the patched layers are PEFT's."""
    built = _qlora_model(case)
    if built is None:
        return {}
    model, layer, x, grad_y = built
    base = layer.base_layer
    out = {"base": _provider(lambda: base(x), (x,), grad_y, list(base.parameters()), x)}

    def lora_provider(m: nn.Module) -> Provider:
        lay = m.base_model.model.proj
        inputs = (x, lay.lora_A["default"].weight, lay.lora_B["default"].weight)
        return _provider(lambda: m(x), inputs, grad_y, list(m.parameters()), x)

    out["peft"] = lora_provider(model)
    out.update(patched_providers(model, backends, lora_provider))
    return out


def peak_memory(provider: Provider) -> Dict[str, int]:
    """One forward+backward of `provider` (`forward_backward`): `peak` (bytes allocated during it and
    held at once, `harness.peak_allocated_bytes`), `outputs` (y (M, N) and grad_x (M, K): what every
    provider holds at the end of its backward) and `extra` = peak - outputs, what the layer's
    temporaries and saved activations add on top."""
    peak = peak_allocated_bytes(provider.forward_backward)
    with torch.no_grad():
        y = provider.forward()
    x = provider.shared_input
    outputs = y.numel() * y.element_size() + x.numel() * x.element_size()
    return {"peak": peak, "outputs": outputs, "extra": peak - outputs}


def dequantized_bytes(case: Case) -> int:
    """The 4-bit base weight dequantized to the compute dtype (N x K)."""
    return case.n * case.k * torch.empty(0, dtype=case.dtype).element_size()
