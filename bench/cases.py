# SPDX-License-Identifier: Apache-2.0
"""What the benchmark times: shapes, and one setup function per provider (frozen base linear,
PEFT's lora.Linear, lora_linear per backend) returning the callables the harness times."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import lora_kernels


@dataclass(frozen=True)
class BenchSet:
    """A named list of cases: every (M, K, N) shape × rank × dropout p, each timed `reps` rounds
    (`small_reps` for decode-sized M ≤ 64, whose calls are cheap and noisy)."""

    name: str
    device_type: str
    dtype: str
    shapes: Tuple[Tuple[int, int, int], ...]  # (M, K, N): M = flattened tokens; K, N = in/out features
    ranks: Tuple[int, ...]
    dropouts: Tuple[float, ...]
    reps: int
    small_reps: int
    about: str
    kind: str = "lora"  # which providers: "lora", "dora" (PEFT's use_dora=True layer vs dora_linear), "qlora"
    # (bench/qlora.py), "multi" / "mixed" (bench/multi.py: several adapters summed / a mixed batch)
    modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    adapters: int = 1  # adapters per layer (multi, mixed, decode)
    seq_len: int = 1  # tokens per sequence of a mixed batch (M = sequences x seq_len)
    base_rows: bool = False  # a mixed batch also has "__base__" sequences

    def reps_for(self, m: int) -> int:
        return self.small_reps if m <= 64 else self.reps


LLAMA_8B = ((8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096))  # attention proj, MLP up, MLP down
SETS = {
    "cpu": BenchSet(
        "cpu", "cpu", "fp32", ((2048, 2048, 2048),), (16,), (0.0, 0.1), 15, 15,
        "the default: the design's CPU target shape, under a minute on 2 idle cores",
    ),
    "cpu-full": BenchSet(
        "cpu-full", "cpu", "fp32", ((2048, 2048, 2048), (512, 4096, 4096), (512, 4096, 14336)), (16,), (0.0, 0.1),
        30, 30, "the long CPU run behind the README's table (--full; ~30 min on 2 cores)",
    ),
    "gpu": BenchSet(
        "gpu", "cuda", "bf16", LLAMA_8B + ((1, 4096, 4096), (16, 4096, 4096)), (16, 64), (0.0, 0.1), 20, 100,
        "Llama-8B-sized layers and decode (M = 1, 16): base vs PEFT vs triton vs cuda, ~5 min on an H100",
    ),
    "quick": BenchSet("quick", "any", "fp32", ((256, 512, 512),), (16,), (0.0, 0.1), 5, 5, "a smoke test, seconds"),
    "dora": BenchSet(
        "dora", "cpu", "fp32", ((2048, 2048, 2048), (64, 4096, 4096)), (16,), (0.0, 0.1), 15, 15,
        "DoRA: PEFT's use_dora=True layer vs dora_linear; the design's CPU shape and a small-M layer whose "
        "W₀ dwarfs the activations (~5 min on 2 idle cores)",
        kind="dora",
    ),
    "qlora": BenchSet(
        "qlora", "cpu", "fp32", ((512, 4096, 4096),), (16,), (0.1,), 10, 10,
        "PEFT's QLoRA layer (NF4, double quant, fp32 compute) vs the frozen 4-bit base and patched, "
        "with peak fwd+bwd memory; ~3 min on 2 cores", kind="qlora",
    ),
    "multi": BenchSet(
        "multi", "cpu", "fp32", ((2048, 2048, 2048),), (16,), (0.1,), 15, 15,
        "3 PEFT adapters active at once (summed), each with dropout, training: base vs PEFT vs patched "
        "(one fused call); ~3 min on 2 cores", kind="multi", adapters=3,
    ),
    "mixed": BenchSet(
        "mixed", "cpu", "fp32", ((2048, 512, 512), (2048, 4096, 4096)), (16,), (0.0,), 15, 15,
        "a mixed batch (PEFT adapter_names): 32 sequences x 64 tokens over 8 adapters and __base__, eval "
        "forward: base vs PEFT vs patched (per-row path); ~3 min on 2 cores",
        kind="mixed", modes=("fwd",), adapters=8, seq_len=64, base_rows=True,
    ),
    "decode": BenchSet(
        "decode", "cpu", "fp32", ((64, 4096, 4096),), (16,), (0.0,), 30, 30,
        "a decode step: 64 sequences x 1 token over 32 adapters (PEFT adapter_names), eval forward; ~1 min",
        kind="mixed", modes=("fwd",), adapters=32, seq_len=1,
    ),
}


@dataclass
class Case:
    m: int
    k: int
    n: int
    r: int
    p: float
    dtype: torch.dtype
    device: torch.device
    adapters: int = 1
    seq_len: int = 1
    base_rows: bool = False

    @property
    def name(self) -> str:
        many = f"-T{self.adapters}" + ("+base" if self.base_rows else "") if self.adapters > 1 else ""
        return f"M{self.m}-K{self.k}-N{self.n}-r{self.r}-p{self.p}{many}"


@dataclass
class Provider:
    """forward() runs the layer once in training mode; forward_backward() also its backward.
    `params` are excluded from saved-activation counts; `shared_input` is the layer's input x."""

    forward: Callable[[], torch.Tensor]
    forward_backward: Callable[[], None]
    params: List[torch.Tensor]
    shared_input: torch.Tensor


def _tensors(case: Case, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(case.dtype).to(case.device)

    x = rand(case.m, case.k).requires_grad_()
    weight = rand(case.n, case.k, scale=case.k**-0.5)
    bias = rand(case.n)
    lora_A = rand(case.r, case.k, scale=case.k**-0.5).requires_grad_()
    lora_B = rand(case.n, case.r, scale=0.01).requires_grad_()
    grad_y = rand(case.m, case.n)
    return x, weight, bias, lora_A, lora_B, grad_y


def _provider(layer: Callable[[], torch.Tensor], inputs, grad_y, params, x) -> Provider:
    def forward_backward():
        torch.autograd.grad(layer(), inputs, grad_y)  # no .grad accumulation: the same work every call

    return Provider(layer, forward_backward, params, x)


def base_linear(case: Case) -> Provider:
    """The frozen base layer alone: what LoRA's cost is measured against."""
    x, weight, bias, _, _, grad_y = _tensors(case)
    return _provider(lambda: F.linear(x, weight, bias), (x,), grad_y, [weight, bias], x)


def peft_lora(case: Case, use_dora: bool = False) -> Optional[Provider]:
    """PEFT's eager lora.Linear (dropout module, two small linears, scale, add), or with `use_dora`
    its DoRA layer (LoraConfig(use_dora=True)); None without peft."""
    try:
        import peft
    except ImportError:
        return None
    x, weight, bias, lora_A, lora_B, grad_y = _tensors(case)
    base = torch.nn.Linear(case.k, case.n, device=case.device, dtype=case.dtype)
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p, target_modules=["0"],
                             use_dora=use_dora)
    layer = peft.get_peft_model(torch.nn.Sequential(base), config).base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    layer.train()
    inputs = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if use_dora:
        magnitude = layer.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            magnitude.copy_(_magnitude(weight, lora_A, lora_B, 2.0))
        inputs.append(magnitude)
    params = [p for p in layer.parameters()]
    return _provider(lambda: layer(x), tuple(inputs), grad_y, params, x)


def fused(case: Case, backend: str) -> Provider:
    """lora_linear with one backend."""
    x, weight, bias, lora_A, lora_B, grad_y = _tensors(case)

    def layer():
        return lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, case.p, backend=backend)

    return _provider(layer, (x, lora_A, lora_B), grad_y, [weight, bias, lora_A, lora_B], x)


def _magnitude(weight, lora_A, lora_B, scaling):
    """A DoRA magnitude near PEFT's initial one (‖W₀ + s·B·A‖ per row), perturbed so c ≠ 1."""
    from lora_kernels.variants.dora import init_magnitude

    g = torch.Generator(device="cpu").manual_seed(1)
    noise = 1.0 + 0.1 * torch.randn(weight.shape[0], generator=g)
    return (init_magnitude(weight, lora_A, lora_B, scaling) * noise.to(weight)).requires_grad_()


def fused_dora(case: Case, backend: str) -> Provider:
    """dora_linear with one backend."""
    from lora_kernels.variants.dora import dora_linear

    x, weight, bias, lora_A, lora_B, grad_y = _tensors(case)
    magnitude = _magnitude(weight, lora_A, lora_B, 2.0)

    def layer():
        with torch.no_grad():  # as after an optimizer step: the norm ‖W₀ + s·B·A‖ is recomputed each call
            lora_A.add_(0.0)
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 2.0, case.p, backend=backend)

    return _provider(layer, (x, lora_A, lora_B, magnitude), grad_y, [weight, bias, lora_A, lora_B, magnitude], x)


def providers(case: Case, backends: List[str], with_peft: bool = True, variant: str = "lora") -> Dict[str, Provider]:
    """name -> Provider for this case: "base", "peft" (if installed), "fused:<backend>" each; for
    variant "dora", PEFT's DoRA layer and dora_linear in place of the plain LoRA ones."""
    peft_layer, fused_layer = (functools.partial(peft_lora, use_dora=True), fused_dora) if variant == "dora" \
        else (peft_lora, fused)
    out: Dict[str, Provider] = {"base": base_linear(case)}
    if with_peft:
        peft_provider = peft_layer(case)
        if peft_provider is not None:
            out["peft"] = peft_provider
    for backend in backends:
        out[f"fused:{backend}"] = fused_layer(case, backend)
    return out


def patched_providers(model, backends: List[str], provider: Callable[[torch.nn.Module], Provider]) -> Dict[str, Provider]:
    """{"fused:<backend>": provider(a copy of the PEFT `model` patched with that backend)} per backend."""
    out = {}
    for backend in backends:
        copied = copy.deepcopy(model)
        lora_kernels.patch(copied, strict=True, backend=backend)
        out[f"fused:{backend}"] = provider(copied)
    return out


def parse_shape(text: str) -> Tuple[int, int, int]:
    m, k, n = (int(v) for v in text.lower().split("x"))
    return m, k, n
