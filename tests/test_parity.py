# SPDX-License-Identifier: Apache-2.0
"""Backend parity, generated from the registries: every registered backend × variant × base-weight
format × dtype × shape × dropout setting against the variant's fp64 oracle (forward and every
gradient: x, lora_A, lora_B and the variant's own parameters), and every backend's dropout mask
bit-identical to the Python mirror of the rule (hence to each other's).

Nothing here names a backend, variant or format: a new one registered in
`lora_kernels.backends.BACKENDS`, `lora_kernels.variants.VARIANTS` or
`lora_kernels.base_weights.FORMATS` is tested by this file as it stands (a new base format needs
a factory in `tests/helpers.make_base`; without one its cases skip saying so). A combination a
backend cannot serve is a skip whose reason is the backend's own (`not_supported_reasons`).

Tolerances: `tests/helpers.TOLERANCES` per dtype; fp16/bf16 also pass within 2x the error of the
same maths run by PyTorch in that dtype (flash-attention's criterion, `assert_close(baseline=)`).
The triton backend on CPU tensors runs under the Triton interpreter: small shapes, no bf16.
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends import BACKENDS
from lora_kernels.dropout import dropout_keep_mask
from helpers import (
    REGISTRY_CASES,
    backend_context,
    check_against_oracle,
    device_for,
    flat_backward,
    flat_forward,
    interpreted,
    make_base,
    make_extra,
    make_inputs,
    skip_unless_served,
)

DTYPES = sorted({d for b in BACKENDS.values() for d in b.dtypes}, key=lambda d: (d.itemsize, str(d)), reverse=True)

# id -> (leading dims of x, K, N, r, bias). N*K is even (two 4-bit codes per byte); K = 37 makes the
# 8-element dropout groups and the 64-element 4-bit blocks straddle rows; "rows" spans several
# 32-row blocks of the CPU kernels with K and N off every vector width.
SHAPES = {
    "M1": ((1,), 64, 40, 16, True),
    "ragged": ((7,), 37, 46, 3, True),
    "3d-nobias": ((2, 5), 24, 17, 4, False),
    "rows": ((70,), 130, 67, 17, True),
}
INTERPRETER_SHAPES = ("M1", "ragged", "3d-nobias")  # the interpreter takes ~5 s per "rows" case
# id -> (dropout_p, training)
DROPOUT = {"p0": (0.0, True), "p0.1": (0.1, True), "eval": (0.1, False)}
SCALING = 0.75


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dropout", DROPOUT)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend,variant,base_format", REGISTRY_CASES)
def test_matches_oracle(backend, variant, base_format, dtype, shape, dropout):
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, dtype, base_format)
        if interpreted(backend, device):
            if dtype == torch.bfloat16:
                pytest.skip("the Triton interpreter cannot run bf16 tl.dot (bf16 runs on a GPU)")
            if shape not in INTERPRETER_SHAPES:
                pytest.skip("the Triton interpreter runs small shapes only (larger ones run on a GPU)")
        lead, k, n, r, bias = SHAPES[shape]
        p, training = DROPOUT[dropout]
        x, weight, b, lora_A, lora_B = make_inputs(lead, k, n, r, dtype, device, bias=bias)
        base = make_base(base_format, weight)
        extra = make_extra(variant, base, lora_A, lora_B, SCALING)
        check_against_oracle(x, base, b, lora_A, lora_B, SCALING, p, backend=backend, variant=variant, extra=extra,
                             training=training, baseline=dtype in (torch.float16, torch.bfloat16))


SEEDS = [0, 2**32 + 5, 2**63 - 1]


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("m,k", [(1, 1), (13, 21), (9, 64)], ids=["1x1", "13x21", "9x64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_the_mirrors(backend, m, k, p):
    """The keep mask each backend applies, forward and backward, equals `dropout_keep_mask` bit for
    bit (so every backend applies the same one). W₀ = 0, A = B = I (r = N = K), s = 1, x = 1:
    xa = D·x exposes the forward mask and, with dY = 1, dX = D ⊙ (dY·B·A) the regenerated one."""
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, torch.float32)
        impl = BACKENDS[backend]
        eye = torch.eye(k, device=device)
        weight, x = torch.zeros(k, k, device=device), torch.ones(m, k, device=device)
        for seed_value in SEEDS:
            seed = torch.tensor([seed_value], dtype=torch.int64, device=device)
            keep = dropout_keep_mask(seed_value, m, k, p).to(device)
            _, xa = flat_forward(impl, x, weight, None, eye, eye, 1.0, p, seed)
            assert torch.equal(xa != 0, keep), f"forward mask differs from the mirror, seed={seed_value:#x}"
            dx, _, _ = flat_backward(impl, torch.ones(m, k, device=device), x, weight, eye, eye, xa, 1.0, p, seed, True)
            assert torch.equal(dx != 0, keep), f"backward regenerated another mask, seed={seed_value:#x}"
