# SPDX-License-Identifier: Apache-2.0
"""The dropout contract (docs/design.md §4): one generator, bit-identical across backends, never stored.
The masks every backend applies are compared with the mirror in tests/test_parity.py."""

import math
import os
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels.dropout import dropout_keep_mask, dropout_threshold, philox4x32
from tests.helpers import CPU_BACKENDS, needs_cpu_kernels

SEEDS = [0, 1, 2**32 - 1, 2**32, 0x0123456789ABCDEF, 2**63 - 1]


def test_mirror_matches_philox_known_answer():
    # Random123's published philox4x32-10 answer for counter 0, key 0.
    words = [int(w) for w in philox4x32(torch.zeros(1, dtype=torch.int64), 0)]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_mirror_lane_layout():
    # Lane j of group g is the 16-bit half j % 2 of word j // 2.
    seed, p = 99, 0.5
    words = [int(w) for w in philox4x32(torch.tensor([1], dtype=torch.int64), seed)]
    lanes = [(words[j // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(8)]
    mask = dropout_keep_mask(seed, 1, 16, p)[0, 8:]
    assert mask.tolist() == [lane >= 32768 for lane in lanes]


@needs_cpu_kernels
@pytest.mark.parametrize("seed", SEEDS, ids=hex)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (17, 37), (64, 128), (5, 1001)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_mask_bit_identical_to_mirror(seed, rows, cols, p):
    got = torch.ops.lora_kernels.dropout_keep_mask(torch.tensor([seed]), rows, cols, p)
    assert torch.equal(got, dropout_keep_mask(seed, rows, cols, p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_4_sigma(p):
    n_rows, n_cols = 500, 999
    rate = dropout_keep_mask(12345, n_rows, n_cols, p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (n_rows * n_cols))
    assert abs(rate - (1 - p)) < 4 * sigma


def identity_layer(k, dtype=torch.float32):
    """weight = 0, A = B = I, scaling 1: y = dropout(x), grad_x = D ⊙ grad_y, exposing the mask."""
    eye = torch.eye(k, dtype=dtype)
    return torch.zeros(k, k, dtype=dtype), eye.clone().requires_grad_(), eye.clone().requires_grad_()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_manual_seed_reproduces_and_seeds_differ(backend):
    k = 32
    weight, lora_A, lora_B = identity_layer(k)
    x = torch.rand(8, k) + 1.0

    def run():
        return lora_kernels.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.5, backend=backend)

    torch.manual_seed(11)
    first, second = run(), run()
    torch.manual_seed(11)
    again = run()
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.5, False)])
def test_no_dropout_draws_no_seed(backend, p, training):
    weight, lora_A, lora_B = identity_layer(8)
    x = torch.rand(4, 8)
    state = torch.get_rng_state()
    y = lora_kernels.lora_linear(x, weight, None, lora_A, lora_B, 1.0, p, training=training, backend=backend)
    assert torch.equal(torch.get_rng_state(), state), "the generator was used with dropout off"
    torch.testing.assert_close(y, x)


def mirror_keep_bits(seed, first_group, count, p):
    """Byte i = keep bits of group first_group + i, from the Python mirror."""
    groups = torch.arange(first_group, first_group + count, dtype=torch.int64)
    words = torch.stack(philox4x32(groups, seed), dim=1)  # (count, 4)
    lanes = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=2).reshape(count, 8)
    keep = (lanes >= dropout_threshold(p)).to(torch.int64)
    return (keep << torch.arange(8)).sum(1).to(torch.uint8)


# Counters whose low word wraps inside a vector of 16 (and a block of 64) groups, and far ones.
LARGE_GROUPS = [(2**32 - 37, 150), (2**33 - 5, 70), (2**40 + 3, 17), (2**62 - 100, 200)]


@needs_cpu_kernels
@pytest.mark.parametrize("first_group,count", LARGE_GROUPS)
def test_cpu_keep_bits_past_2_32_groups(first_group, count):
    seed, p = 0x0123456789ABCDEF, 0.3
    got = torch.ops.lora_kernels.dropout_keep_bits(torch.tensor([seed]), first_group, count, p)
    assert torch.equal(got, mirror_keep_bits(seed, first_group, count, p))


@needs_cpu_kernels
def test_cpu_keep_bits_rejects_negative_ranges():
    with pytest.raises(RuntimeError, match="first_group and count must be >= 0"):
        torch.ops.lora_kernels.dropout_keep_bits(torch.tensor([1]), -1, 4, 0.3)


@needs_cpu_kernels
def test_cpu_scalar_loops_match_the_reference():
    """LORA_KERNELS_NO_AVX512=1 forces the scalar loops of the CPU dropout (Philox and the masked
    multiply; read once per process, so in a child process): masks equal the mirror's, and the
    fused forward and gradients equal the reference backend's with the same seed."""
    code = (
        "import torch, lora_kernels\n"
        "from lora_kernels.dropout import dropout_keep_mask\n"
        "for seed, rows, cols, p in [(0, 3, 7, 0.1), (2**63 - 1, 17, 37, 0.5), (12345, 5, 1001, 0.9)]:\n"
        "    got = torch.ops.lora_kernels.dropout_keep_mask(torch.tensor([seed]), rows, cols, p)\n"
        "    assert torch.equal(got, dropout_keep_mask(seed, rows, cols, p)), (seed, rows, cols, p)\n"
        "x = torch.randn(70, 45, requires_grad=True)\n"
        "w, b = torch.randn(30, 45), torch.randn(30)\n"
        "a, bb = torch.randn(4, 45, requires_grad=True), torch.randn(30, 4, requires_grad=True)\n"
        "outs = []\n"
        "for backend in ('cpu', 'reference'):\n"
        "    torch.manual_seed(3)\n"
        "    y = lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.3, backend=backend)\n"
        "    outs.append((y, *torch.autograd.grad(y.square().sum(), (x, a, bb))))\n"
        "for got, want in zip(*outs):\n"
        "    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)\n"
        "from tests.test_dropout import LARGE_GROUPS, mirror_keep_bits\n"
        "for first, count in LARGE_GROUPS:\n"
        "    got = torch.ops.lora_kernels.dropout_keep_bits(torch.tensor([99]), first, count, 0.3)\n"
        "    assert torch.equal(got, mirror_keep_bits(99, first, count, 0.3)), first\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LORA_KERNELS_NO_AVX512="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
