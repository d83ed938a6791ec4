# SPDX-License-Identifier: Apache-2.0
"""torch.library registration: opcheck on every op, torch.compile(fullgraph=True) traces the
public op (forward and backward) with no graph break, and the custom op's autograd equals the
eager path's."""

import pytest
import torch

import lora_kernels
from lora_kernels.base_weights import DenseWeight
from lora_kernels.contract import LoRASpec
from lora_kernels.ops import EagerCall, _EagerLoRALinear, lora_linear_backward_op, lora_linear_op
from helpers import CPU_BACKENDS, assert_close, make_inputs, needs_cpu_kernels


def op_args(backend, p):
    x, weight, bias, lora_A, lora_B = make_inputs((3, 5), 12, 10, 4, torch.float32)
    seed = torch.tensor([42]) if p > 0 else None
    return x, [weight], "dense", [], bias, lora_A, lora_B, 0.5, p, seed, backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_lora_linear(backend, p):
    torch.library.opcheck(lora_linear_op, op_args(backend, p))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("compute_grad_x", [True, False])
def test_opcheck_backward(backend, compute_grad_x):
    x, base, fmt, meta, bias, lora_A, lora_B, s, p, seed, _ = op_args(backend, 0.3)
    xa = torch.randn(15, 4)
    grad_y = torch.randn(3, 5, 10)
    args = (grad_y, x.detach(), base, fmt, meta, lora_A.detach(), lora_B.detach(), xa, s, p, seed, backend,
            compute_grad_x)
    torch.library.opcheck(lora_linear_backward_op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("lead", [(3, 5), (0,)], ids=["3x5", "empty"])
def test_custom_op_autograd_equals_eager(backend, p, lead):
    """Eager calls run a plain autograd.Function; torch.compile and torch.export trace the custom
    op. Both must give the same y and the same gradients, the base weight's and bias's included."""
    x, weight, bias, lora_A, lora_B = make_inputs(lead, 12, 10, 4, torch.float32)
    inputs = (x, weight.requires_grad_(), bias.requires_grad_(), lora_A, lora_B)
    seed = torch.tensor([42]) if p > 0 else None
    y_op = lora_linear_op(x, [weight], "dense", [], bias, lora_A, lora_B, 0.5, p, seed, backend)[0]
    y_eager = _EagerLoRALinear.apply(*inputs, EagerCall(DenseWeight(weight), LoRASpec(0.5, p), seed, backend))
    assert torch.equal(y_op, y_eager)
    grad_y = torch.randn(y_op.shape)
    for got, want in zip(torch.autograd.grad(y_op, inputs, grad_y), torch.autograd.grad(y_eager, inputs, grad_y)):
        assert torch.equal(got, want)


@needs_cpu_kernels
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_compiled_ops(with_weight, p):
    x, weight, bias, lora_A, lora_B = make_inputs((7,), 12, 10, 4, torch.float32, requires_grad=False)
    weight = weight if with_weight else None  # without: the LoRA terms only, N from lora_B
    seed = torch.tensor([5]) if p > 0 else None
    for b in (bias, None):
        torch.library.opcheck(torch.ops.lora_kernels.fused_forward.default, (x, weight, b, lora_A, lora_B, 0.5, p, seed))
    xa = torch.randn(7, 4)
    grad_y = torch.randn(7, 10)
    for compute_grad_x in (True, False):
        torch.library.opcheck(
            torch.ops.lora_kernels.fused_backward.default,
            (grad_y, x, weight, lora_A, lora_B, xa, 0.5, p, seed, compute_grad_x),
        )


@needs_cpu_kernels
def test_opcheck_dropout_ops():
    seed = torch.tensor([5])
    torch.library.opcheck(torch.ops.lora_kernels.dropout_keep_mask.default, (seed, 5, 9, 0.3))
    torch.library.opcheck(torch.ops.lora_kernels.dropout_keep_bits.default, (seed, 2**32 - 3, 9, 0.3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend, compiler):
    # Inductor draws random numbers its own way unless told to match eager; the seed comes from
    # torch.randint, so fallback_random makes the compiled mask comparable with the eager one.
    with torch._inductor.config.patch(fallback_random=True):
        _check_compiled_matches_eager(backend, compiler)


def _check_compiled_matches_eager(backend, compiler):
    layer = lora_kernels.LoRALinear(24, 16, r=4, alpha=8, dropout=0.2, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 6, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)

    torch.manual_seed(0)
    y = compiled(x)
    y.square().sum().backward()
    grads = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None

    torch.manual_seed(0)
    y_eager = layer(x)
    y_eager.square().sum().backward()
    # Same seed stream -> same mask, same numbers as eager.
    assert_close(y, y_eager, torch.float32, "y")
    for name, got, want in zip(("grad_x", "grad_A", "grad_B"), grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_export_captures_the_custom_op(strict):
    layer = lora_kernels.LoRALinear(24, 16, r=4, alpha=8, backend=CPU_BACKENDS[-1])
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 6, 24)
    exported = torch.export.export(layer, (x,), strict=strict)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.lora_kernels.lora_linear.default in targets
    assert_close(exported.module()(x), layer(x), torch.float32, "y")
