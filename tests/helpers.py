# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: input factories, the oracle's forward + gradients, a verbose allclose, and
flat-argument calls of a backend's contract functions."""

from __future__ import annotations

import torch

from lora_kernels.base_weights import as_base_weight
from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights
from lora_kernels.reference import lora_linear_eager

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


def oracle(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y):
    """fp64 eager forward and gradients (x, lora_A, lora_B) of the reference maths."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    y = lora_linear_eager(
        leaves[0], weight.double(), None if bias is None else bias.double(), leaves[1], leaves[2],
        scaling, dropout_p, seed,
    )
    grads = torch.autograd.grad(y, leaves, grad_y.double()) if y.numel() else [torch.zeros_like(t) for t in leaves]
    return y.detach(), grads


def eager_same_dtype(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y):
    """The plain-PyTorch computation in the inputs' own dtype: the error baseline for fp16/bf16."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    y = lora_linear_eager(leaves[0], weight, bias, leaves[1], leaves[2], scaling, dropout_p, seed)
    return y.detach(), torch.autograd.grad(y, leaves, grad_y)


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
