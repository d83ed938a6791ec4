# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: the backend list, input and base-weight factories, the oracle's forward +
gradients, the one oracle harness (`check_against_oracle`), a verbose allclose, and flat-argument
calls of a backend's contract functions."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch

import lora_kernels
from lora_kernels.backends import BACKENDS
from lora_kernels.base_weights import FORMATS, BaseWeight, DenseWeight, as_base_weight
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights
from lora_kernels.dropout import draw_seed
from lora_kernels.variants import VARIANTS

# The backends that run on CPU tensors here as they are: triton only does so under its (slow)
# interpreter, which `backend_context` sets up (tests/test_parity.py, tests/test_triton.py).
CPU_BACKENDS = [b for b in lora_kernels.available_backends("cpu") if b != "triton"]
needs_cpu_kernels = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="lora_kernels._C (cpu kernels) is not built")

# Every registered backend × variant × base-weight format, for
# @pytest.mark.parametrize("backend,variant,base_format", REGISTRY_CASES): what the parity and
# memory suites run (a combination a backend cannot serve skips with its reasons, `skip_unless_served`).
REGISTRY_CASES = [
    pytest.param(b, v, f, id=f"{b}-{v}-{f}")
    for b in BACKENDS
    for v in VARIANTS
    if VARIANTS[v].form == "single"  # the multi-adapter forms: tests/test_multi_adapter.py
    for f in FORMATS
]

# (atol, rtol) per dtype for outputs and gradients of O(1)-scaled inputs with K, N <= ~300;
# fp16/bf16 kernels accumulate in fp32, the oracle runs in fp64 (see `oracle`).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}


def make_inputs(lead, k, n, r, dtype, device="cpu", bias=True, requires_grad=True, seed=0):
    """x (*lead, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r), scaled so
    every term of y is O(1). lora_B is random (not PEFT's zeros) so every gradient is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rand(*lead, k)
    weight = rand(n, k, scale=k**-0.5)
    b = rand(n) if bias else None
    lora_A = rand(r, k, scale=k**-0.5)
    lora_B = rand(n, r, scale=r**-0.5)
    for t in (x, lora_A, lora_B):
        t.requires_grad_(requires_grad)
    return x, weight, b, lora_A, lora_B


# How each bitsandbytes 4-bit format is quantized here: NF4 with double quantization (nested
# absmax), FP4 without, so both absmax layouts are served. Blocksize 64 is bitsandbytes' default.
BNB_4BIT = {
    "nf4": dict(quant_type="nf4", compress_statistics=True, blocksize=64),
    "fp4": dict(quant_type="fp4", compress_statistics=False, blocksize=64),
}
BNB_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_base(base_format: str, weight: torch.Tensor) -> BaseWeight:
    """A frozen base weight of `base_format` made from the dense W₀ (N, K), computing in W₀'s dtype.

    "dense" wraps W₀; "nf4"/"fp4" quantize it with bitsandbytes (`quantize_4bit`) and wrap the
    Params4bit (`lora_kernels.base_weights.FORMATS[fmt].from_bnb`): the oracle then uses the
    dequantized `base.dense()`. Skips (pytest) when the format cannot be built here, saying why."""
    weight = weight.detach()
    if base_format == "dense":
        return DenseWeight(weight)
    if base_format in BNB_4BIT:
        if importlib.util.find_spec("bitsandbytes") is None:
            pytest.skip(f"{base_format}: bitsandbytes is not installed (pip install 'lora_kernels[qlora]')")
        if weight.dtype not in BNB_COMPUTE_DTYPES:
            pytest.skip(f"{base_format}: bitsandbytes 4-bit weights compute in float32, float16 or bfloat16, "
                        f"not {weight.dtype}")
        import bitsandbytes

        options = BNB_4BIT[base_format]
        packed, state = bitsandbytes.functional.quantize_4bit(weight.float(), **options)
        param = bitsandbytes.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, bnb_quantized=True, **options
        )
        return FORMATS[base_format].from_bnb(param, compute_dtype=weight.dtype)
    pytest.skip(f"no test factory for base format {base_format!r}: add one to tests/helpers.make_base")


def make_extra(variant: str, base: BaseWeight, lora_A, lora_B, scaling, seed=0) -> Dict[str, torch.Tensor]:
    """`variant`'s own parameters ({} for plain LoRA), initialised as the variant does and then
    perturbed by ±25 % (DoRA's initial magnitude makes c = 1, which would hide the (c - 1) term),
    in x's dtype, requiring grad."""
    extra = VARIANTS[variant].init_extra(weight=base.dense(), lora_A=lora_A.detach(), lora_B=lora_B.detach(),
                                         scaling=scaling)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in extra.items():
        noise = 1 + 0.25 * (2 * torch.rand(t.shape, generator=g, dtype=torch.float64) - 1)
        out[name] = (t.detach().double().cpu() * noise).to(lora_A.dtype).to(lora_A.device).requires_grad_(True)
    return out


def device_for(backend: str) -> torch.device:
    """The device a backend's parity tests run on: cuda where it serves cuda tensors and a GPU is
    visible, else cpu (a GPU-only backend then skips with its own reason)."""
    if torch.cuda.is_available() and "cuda" in BACKENDS[backend].device_types:
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str, device: torch.device) -> bool:
    """True when `backend` runs on `device` only under the Triton interpreter (small shapes, no bf16)."""
    return backend == "triton" and device.type == "cpu"


@contextlib.contextmanager
def backend_context(backend: str, device: torch.device):
    """The environment `backend` runs on `device` in: the triton backend on CPU tensors runs under
    TRITON_INTERPRET=1, with its kernels decorated for the interpreter (importing tests/test_triton.py
    does that once per session); everything else as it is."""
    if not interpreted(backend, device):
        yield
        return
    triton_tests = pytest.importorskip("test_triton", reason="triton is not installed")
    with triton_tests._interpreter_env():
        yield


def skip_unless_served(backend: str, device: torch.device, dtype=None, base_format: str = "dense",
                       variant: str = "lora") -> None:
    """pytest.skip with the registry's own reasons when `backend` cannot serve this combination."""
    reasons = BACKENDS[backend].not_supported_reasons(device, dtype, base_format, variant)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def apply_variant(variant, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend, extra):
    """`variant`'s served form, called by keyword (a variant's own parameters may sit anywhere in
    its signature): -> y (..., N)."""
    return VARIANTS[variant].apply(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=scaling,
                                   dropout_p=dropout_p, training=training, backend=backend, **extra)


# Dropout seeds of the harness: the op draws its own from torch's generator seeded with this.
TORCH_SEED = 1234


def check_against_oracle(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, backend, variant="lora",
                         extra=None, training=True, baseline=False):
    """The one oracle harness: `variant`'s served form (`VARIANTS[variant].apply`) on `backend`
    against its fp64 oracle — y and the gradients of x, lora_A, lora_B and the variant's `extra`
    params — with TOLERANCES[dtype]; `baseline`: a tensor outside them still passes within 2x the
    same-dtype eager error (see `assert_close`). The op draws its dropout seed from torch's
    generator (seeded with TORCH_SEED); the oracle gets the same seed. `weight`: a tensor or a
    BaseWeight. Returns y."""
    extra = extra or {}
    n = weight.shape[0]
    dtype = x.dtype
    torch.manual_seed(TORCH_SEED)
    y = apply_variant(variant, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend, extra)
    active_p = dropout_p if training else 0.0
    torch.manual_seed(TORCH_SEED)
    seed = draw_seed(x.device) if active_p > 0 else None
    assert y.dtype == dtype and tuple(y.shape) == (*x.shape[:-1], n), f"y is {y.dtype} {tuple(y.shape)}"
    g = torch.Generator().manual_seed(7)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).to(y.device)
    leaves = (x, lora_A, lora_B, *extra.values())
    names = ("grad_x", "grad_A", "grad_B", *(f"grad_{name}" for name in extra))
    grads = torch.autograd.grad(y, leaves, grad_y)
    args = (x, weight, bias, lora_A, lora_B, scaling, active_p, seed, grad_y, variant, extra)
    y_ref, grads_ref = oracle(*args)

    def compare(baselines):
        for name, got, want, base in zip(("y", *names), (y, *grads), (y_ref, *grads_ref), baselines):
            assert_close(got, want, dtype, name, baseline=base)

    try:
        compare([None] * (1 + len(leaves)))
    except AssertionError:
        if not baseline:
            raise
        y_base, grads_base = eager_same_dtype(*args)  # only when needed: slow in 16-bit on CPUs
        compare([y_base, *grads_base])
    return y


def _eager(dtype, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, variant, extra):
    """`variant`'s oracle in `dtype` and its gradients w.r.t. x, lora_A, lora_B, then the extra params."""
    extra = extra or {}
    dense = weight.dense() if isinstance(weight, BaseWeight) else weight
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, lora_A, lora_B, *extra.values())]
    y = VARIANTS[variant].oracle(
        x=leaves[0], weight=dense.to(dtype), bias=None if bias is None else bias.to(dtype), lora_A=leaves[1],
        lora_B=leaves[2], scaling=scaling, dropout_p=dropout_p, seed=seed, **dict(zip(extra, leaves[3:])),
    )
    grads = torch.autograd.grad(y, leaves, grad_y.to(dtype)) if y.numel() else [torch.zeros_like(t) for t in leaves]
    return y.detach(), grads


def oracle(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, variant="lora", extra=None):
    """fp64 eager forward and gradients (x, lora_A, lora_B, then `extra`'s) of `variant`'s reference
    maths; `weight` a tensor or a BaseWeight (then its dequantized `dense()`), `extra` {name: tensor}."""
    return _eager(torch.float64, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, variant, extra)


def eager_same_dtype(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, variant="lora", extra=None):
    """The same plain-PyTorch computation in the inputs' own dtype: the error baseline for fp16/bf16."""
    return _eager(x.dtype, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, variant, extra)


def assert_close(actual, expected, dtype, name, baseline=None):
    """allclose with per-dtype tolerances and a message naming the tensor, its worst element and NaNs.

    With `baseline` (the same quantity from a same-dtype PyTorch computation), a tensor outside
    the fixed tolerances still passes if its max error against `expected` is at most twice the
    baseline's (flash-attention's criterion: robust to cancellation in low precision).
    """
    atol, rtol = TOLERANCES[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any() and baseline is not None and not actual.isnan().any():
        baseline_err = (baseline.detach().double().cpu() - expected).abs().max().item()
        if (actual - expected).abs().max().item() <= 2 * baseline_err + atol:
            return
    if bad.any():
        # the worst element relative to its own tolerance (a NaN counts as the worst)
        excess = (actual - expected).abs() / (atol + rtol * expected.abs())
        flat = int(excess.nan_to_num(float("inf")).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), excess.shape))
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"worst at {idx}: {actual[idx].item()} vs {expected[idx].item()}; "
            f"NaN in actual: {bool(actual.isnan().any())}"
        )


def flat_forward(backend, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, **kwargs):
    """A backend's `forward` (module or registry entry) from flat arguments: -> (y, xa)."""
    weights = LoRAWeights(as_base_weight(weight), bias, lora_A, lora_B)
    return backend.forward(x2d, weights, LoRASpec(scaling, dropout_p), seed, **kwargs)


def flat_backward(backend, dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, **kwargs):
    """A backend's `backward` from flat arguments: -> LoRAGrads(x, lora_A, lora_B)."""
    weights = LoRAWeights(as_base_weight(weight), None, lora_A, lora_B)
    return LoRAGrads(*backend.backward(dy, x2d, weights, xa, LoRASpec(scaling, dropout_p), seed, compute_dx, **kwargs))


def run_compiled(argv, timeout: int):
    """`python *argv` in a fresh interpreter without TRITON_INTERPRET (the kernels compiled for
    sm80/sm90, not interpreted), from the repository root on PYTHONPATH: -> CompletedProcess with
    text output. pytest.skip when this triton build ships no ptxas for sm80/sm90."""
    pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(90).path, get_ptxas(80).path
    except Exception as exc:  # no ptxas shipped with this triton build
        pytest.skip(f"no ptxas to compile for sm80/sm90: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
