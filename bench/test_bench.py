# SPDX-License-Identifier: Apache-2.0
"""pytest-benchmark suite: `python -m pytest bench/ --benchmark-only` (not part of `make test`).

Each provider of bench/cases.py, forward+backward, on the device's quick-to-run shapes; compare
providers with pytest-benchmark's table (group = shape and p)."""

import pytest
import torch

import lora_kernels
from bench.cases import Case, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [(8192, 4096, 4096), (16, 4096, 4096)] if DEVICE.type == "cuda" else [(2048, 2048, 2048)]
BACKENDS = [b for b in lora_kernels.available_backends(DEVICE) if b != "reference"]
PROVIDERS = ["base", "peft"] + [f"fused:{b}" for b in BACKENDS]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_forward_backward(benchmark, shape, p, provider):
    if provider == "peft":
        pytest.importorskip("peft")
    case = Case(*shape, r=16, p=p, dtype=DTYPE, device=DEVICE)
    fn = providers(case, BACKENDS)[provider].forward_backward
    benchmark.group = f"{case.name} fwd+bwd"

    def step():
        fn()
        _sync()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
