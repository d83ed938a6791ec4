# SPDX-License-Identifier: Apache-2.0
"""Several adapters in one call, on every backend that serves them (generated from the registry;
a backend without the variant skips with its own reason), against the fp64 oracles of
`lora_kernels.reference`:

* stacked (`lora_linear_stacked`): T adapters summed, each with its own dropout — forward and the
  gradients of x and every lora_A[t]/lora_B[t]; each adapter's forward and backward masks equal
  the Python mirror under its own seed bit for bit; T = 1 is `lora_linear` bit for bit; nothing
  M x K is saved for backward;
* per-row (`lora_linear_per_row`): a mixed batch with base-only rows, decode-sized batches with
  many adapters, ranks padded;
* the errors, each naming the argument and the adapter (or row).

Tolerances: `helpers.TOLERANCES` per dtype (fp16/bf16 also within 2x the same-dtype eager error).
"""

from __future__ import annotations

import re

import pytest
import torch

from lora_kernels import lora_linear, lora_linear_per_row, lora_linear_stacked
from lora_kernels._extension import has_op
from lora_kernels.backends import BACKENDS
from lora_kernels.contract import group_rows
from lora_kernels.dropout import dropout_keep_mask
from lora_kernels.reference import lora_linear_per_row_eager, lora_linear_stacked_eager
from helpers import (
    TOLERANCES,
    assert_close,
    backend_context,
    device_for,
    interpreted,
    make_base,
    needs_cpu_kernels,
    skip_unless_served,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _rand(g, shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _setup(backend, dtype, small_only=False):
    """(device, context) for `backend`, skipping the combinations it cannot run here."""
    device = device_for(backend)
    if interpreted(backend, device) and dtype in (torch.bfloat16, torch.float64):
        pytest.skip("the Triton interpreter cannot run bf16 tl.dot, and triton does not serve fp64")
    return device


def _compare(got, want, dtype, names, baselines=None):
    for i, (name, a, b) in enumerate(zip(names, got, want)):
        assert_close(a, b, dtype, name, baseline=None if baselines is None else baselines[i])


# --- several adapters summed --------------------------------------------------------------------

# id -> (leading dims of x, K, N, ranks, scalings, dropout rates, bias, training)
STACKED_CASES = {
    "T1-p0.1": ((9,), 24, 20, (4,), (0.5,), (0.1,), True, True),
    "T2-p0-nodrop": ((2, 5), 32, 17, (8, 3), (1.0, 0.25), (0.0, 0.0), False, True),
    "T3-mixed-p": ((13,), 37, 46, (4, 16, 7), (0.5, 2.0, 1.0), (0.1, 0.0, 0.3), True, True),
    "T3-all-drop": ((35,), 40, 24, (2, 5, 3), (1.0, 1.0, 0.5), (0.2, 0.5, 0.1), True, True),
    "T2-eval": ((6,), 16, 12, (4, 4), (1.0, 2.0), (0.3, 0.1), True, False),
}
INTERPRETER_STACKED = ("T1-p0.1", "T2-p0-nodrop", "T3-mixed-p")


def _stacked_inputs(case, dtype, device, seed=0):
    lead, k, n, ranks, scalings, rates, bias, training = STACKED_CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, (*lead, k), dtype, device).requires_grad_(True)
    weight = _rand(g, (n, k), dtype, device, k**-0.5)
    b = _rand(g, (n,), dtype, device) if bias else None
    As = [_rand(g, (r, k), dtype, device, k**-0.5).requires_grad_(True) for r in ranks]
    Bs = [_rand(g, (n, r), dtype, device, r**-0.5).requires_grad_(True) for r in ranks]
    return x, weight, b, As, Bs, list(scalings), list(rates), training


def _fp64_grads(fn, leaves, grad_y):
    copies = [t.detach().double().requires_grad_(True) for t in leaves]
    y = fn(*copies)
    return y.detach(), torch.autograd.grad(y, copies, grad_y.double(), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("base_format", ["dense", "nf4"])
@pytest.mark.parametrize("case", STACKED_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_matches_oracle(backend, dtype, case, base_format):
    device = _setup(backend, dtype)
    with backend_context(backend, device):
        skip_unless_served(backend, device, dtype, base_format, variant="stacked")
        if interpreted(backend, device) and case not in INTERPRETER_STACKED:
            pytest.skip("the Triton interpreter runs a few small cases only (all of them run on a GPU)")
        x, weight, b, As, Bs, scalings, rates, training = _stacked_inputs(case, dtype, device)
        base = make_base(base_format, weight)
        seeds = torch.tensor([5, 2**32 + 7, 2**62 + 11][: len(As)], dtype=torch.int64, device=device)
        y = lora_linear_stacked(x, base, b, As, Bs, scalings, rates, training, backend, seed=seeds)
        leaves = [x, *As, *Bs]
        grad_y = _rand(torch.Generator().manual_seed(3), y.shape, dtype, device)
        grads = torch.autograd.grad(y, leaves, grad_y)
        active = rates if training else [0.0] * len(rates)
        t = len(As)
        dense = base.dense().double()

        def oracle(x, *ab):
            return lora_linear_stacked_eager(x, dense, None if b is None else b.double(), list(ab[:t]), list(ab[t:]),
                                             scalings, active, seeds)

        y_ref, grads_ref = _fp64_grads(oracle, leaves, grad_y)
        names = ["y", "grad_x", *(f"grad_A[{i}]" for i in range(t)), *(f"grad_B[{i}]" for i in range(t))]
        baselines = None
        if dtype in (torch.float16, torch.bfloat16):  # the same maths in the inputs' dtype, as test_parity
            same = [u.detach().requires_grad_(True) for u in leaves]
            y_same = lora_linear_stacked_eager(same[0], base.dense(), b, same[1 : 1 + t], same[1 + t :], scalings,
                                               active, seeds)
            baselines = [y_same, *torch.autograd.grad(y_same, same, grad_y)]
        _compare([y, *grads], [y_ref, *grads_ref], dtype, names, baselines)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_masks_are_the_mirrors(backend):
    """Adapter t's forward mask and its regenerated backward mask are the rule's under seeds[t]:
    W₀ = 0, A_t = B_t = I (r = N = K), x = 1 expose xa[:, seg_t] = D_t; with only adapter t's
    scaling non-zero, dX = D_t ⊙ (dY·B_t·A_t) exposes the backward one."""
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, torch.float32, variant="stacked")
        m, k, rates = 13, 21, [0.1, 0.5, 0.3]
        seeds = torch.tensor([0, 2**32 + 5, 2**63 - 1], dtype=torch.int64, device=device)
        eye = torch.eye(k, device=device)
        weight, ones = torch.zeros(k, k, device=device), torch.ones(m, k, device=device)
        keeps = [dropout_keep_mask(int(s), m, k, p).to(device) for s, p in zip(seeds.tolist(), rates)]
        for t in range(3):
            scalings = [1.0 if i == t else 0.0 for i in range(3)]
            x = ones.clone().requires_grad_(True)
            y = lora_linear_stacked(x, weight, None, [eye] * 3, [eye] * 3, scalings, rates, True, backend, seed=seeds)
            assert torch.equal(y != 0, keeps[t]), f"adapter {t}: forward mask differs from the mirror"
            (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
            assert torch.equal(dx != 0, keeps[t]), f"adapter {t}: backward regenerated another mask"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_stacked_adapter_is_lora_linear(backend):
    """T = 1 gives `lora_linear`'s bits with the same seed, forward and backward."""
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, torch.float32, variant="stacked")
        x, weight, b, As, Bs, scalings, rates, _ = _stacked_inputs("T1-p0.1", torch.float32, device)
        seed = torch.tensor([99], dtype=torch.int64, device=device)
        y1 = lora_linear_stacked(x, weight, b, As, Bs, scalings, rates, True, backend, seed=seed)
        y0 = lora_linear(x, weight, b, As[0], Bs[0], scalings[0], rates[0], True, backend, seed=seed)
        assert torch.equal(y1, y0)
        grad_y = torch.ones_like(y0)
        g1 = torch.autograd.grad(y1, [x, As[0], Bs[0]], grad_y)
        g0 = torch.autograd.grad(y0, [x, As[0], Bs[0]], grad_y)
        for name, a, c in zip(("x", "A", "B"), g1, g0):
            assert torch.equal(a, c), f"grad_{name} differs from lora_linear's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_saves_nothing_m_by_k(backend):
    """Saved for backward at p > 0: x, W₀ and the adapters by reference, then only xa (M, R) and the
    seeds — never a mask, a dropped copy of x or a copy of the adapters (docs/design.md §10)."""
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, torch.float32, variant="stacked")
        m, k, n, ranks = 64, 48, 40, (4, 8, 4)
        x = torch.randn(m, k, device=device, requires_grad=True)
        As = [torch.randn(r, k, device=device, requires_grad=True) for r in ranks]
        Bs = [torch.randn(n, r, device=device, requires_grad=True) for r in ranks]
        saved = []

        def pack(t):
            saved.append(t)
            return t

        weight = torch.randn(n, k, device=device)  # W₀ is saved (by reference), as by lora_linear
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lora_linear_stacked(x, weight, None, As, Bs, 1.0, 0.1, True, backend)
        by_reference = {t.data_ptr() for t in (x, weight, *As, *Bs)}
        others = [t for t in saved if t.data_ptr() not in by_reference]
        assert any(t.data_ptr() == x.data_ptr() for t in saved), "x is not saved by reference"
        # what is left: xa (M, R) and the seeds; not even a copy of the concatenated adapters
        assert sum(t.numel() for t in others) <= m * sum(ranks) + len(ranks), [tuple(t.shape) for t in others]


# --- a mixed batch: per-row adapter ids ----------------------------------------------------------

# id -> (leading dims, K, N, ranks, T, ids rule, bias); ids: "mixed" (base rows and every adapter,
# runs of different lengths), "one" (every row adapter 1), "base" (every row -1)
PER_ROW_CASES = {
    "mixed": ((4, 9), 40, 24, (8, 8, 8), 3, "mixed", True),
    "ranks-padded": ((19,), 37, 46, (4, 16, 7), 3, "mixed", False),
    "one-adapter": ((33,), 24, 20, (8, 8), 2, "one", True),
    "all-base": ((7,), 24, 20, (8, 8), 2, "base", True),
    "M1": ((1,), 64, 40, (16,), 1, "mixed", True),
    "decode-32-adapters": ((64,), 32, 48, (8,) * 32, 32, "mixed", True),
}
INTERPRETER_PER_ROW = ("mixed", "one-adapter", "all-base", "M1", "decode-32-adapters")


def _ids(rule, m, count, device):
    if rule == "one":
        return torch.ones(m, dtype=torch.int64, device=device)
    if rule == "base":
        return torch.full((m,), -1, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(m)
    runs = torch.randint(-1, count, (m,), generator=g)
    return runs.to(device)


@pytest.mark.parametrize("case", PER_ROW_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_matches_oracle(backend, dtype, case):
    device = _setup(backend, dtype)
    with backend_context(backend, device):
        skip_unless_served(backend, device, dtype, variant="per_row")
        if interpreted(backend, device) and case not in INTERPRETER_PER_ROW:
            pytest.skip("the Triton interpreter runs a few small cases only (all of them run on a GPU)")
        lead, k, n, ranks, count, rule, bias = PER_ROW_CASES[case]
        g = torch.Generator().manual_seed(1)
        x = _rand(g, (*lead, k), dtype, device).requires_grad_(True)
        weight = _rand(g, (n, k), dtype, device, k**-0.5)
        b = _rand(g, (n,), dtype, device) if bias else None
        As = [_rand(g, (r, k), dtype, device, k**-0.5).requires_grad_(True) for r in ranks]
        Bs = [_rand(g, (n, r), dtype, device, r**-0.5).requires_grad_(True) for r in ranks]
        scalings = [(t + 2) / 3 for t in range(count)]  # not fp32-exact: fp64 must keep them in fp64
        m = x.numel() // k
        ids = _ids(rule, m, count, device)
        y = lora_linear_per_row(x, weight, b, As, Bs, scalings, ids.to(torch.int32), backend)
        grad_y = _rand(torch.Generator().manual_seed(3), y.shape, dtype, device)
        leaves = [x, *As, *Bs]
        grads = torch.autograd.grad(y, leaves, grad_y)
        r = max(ranks)

        def oracle(x, *ab):
            a = torch.stack([torch.nn.functional.pad(u, (0, 0, 0, r - u.shape[0])) for u in ab[:count]])
            bb = torch.stack([torch.nn.functional.pad(u, (0, r - u.shape[1])) for u in ab[count:]])
            return lora_linear_per_row_eager(x, weight.double(), None if b is None else b.double(), a, bb, scalings, ids)

        y_ref, grads_ref = _fp64_grads(oracle, leaves, grad_y)
        names = ["y", "grad_x", *(f"grad_A[{i}]" for i in range(count)), *(f"grad_B[{i}]" for i in range(count))]
        atol, rtol = TOLERANCES[dtype]
        if dtype in (torch.float16, torch.bfloat16):  # sums over rows of one adapter: K- and M-long
            atol, rtol = 2 * atol, 2 * rtol
        for name, a, want in zip(names, [y, *grads], [y_ref, *grads_ref]):
            torch.testing.assert_close(a.double().cpu(), want.cpu(), atol=atol, rtol=rtol, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_base_rows_are_the_base_layer(backend):
    """Rows with id -1 get x·W₀ᵀ + b exactly as `F.linear` computes them on this backend's device."""
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, torch.float32, variant="per_row")
        g = torch.Generator().manual_seed(2)
        x, weight, b = (torch.randn(*s, generator=g).to(device) for s in ((10, 16), (12, 16), (12,)))
        A, B = torch.randn(2, 4, 16, generator=g).to(device), torch.randn(2, 12, 4, generator=g).to(device)
        ids = torch.tensor([-1, 0, -1, 1, 1, -1, 0, 0, -1, -1], device=device)
        y = lora_linear_per_row(x, weight, b, A, B, 1.0, ids, backend)
        base_rows = ids < 0
        torch.testing.assert_close(y[base_rows], torch.nn.functional.linear(x, weight, b)[base_rows])
        assert not torch.allclose(y[~base_rows], torch.nn.functional.linear(x, weight, b)[~base_rows])


# --- errors ---------------------------------------------------------------------------------------


def _small():
    x = torch.randn(6, 16)
    weight = torch.randn(12, 16)
    As = [torch.randn(4, 16), torch.randn(3, 16)]
    Bs = [torch.randn(12, 4), torch.randn(12, 3)]
    return x, weight, As, Bs


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (dict(dropout_p=[0.1, -0.2]), ValueError, r"dropout_p\[1\] must be in \[0, 1\), got -0.2 \(adapter 1\)"),
        (dict(dropout_p=[1.0, 0.1]), ValueError, r"dropout_p\[0\] must be in \[0, 1\), got 1.0 \(adapter 0\)"),
        (dict(dropout_p=[0.1]), ValueError, r"dropout_p must have one value per adapter \(2\), got 1"),
        (dict(scaling=[1.0, float("nan")]), ValueError, r"scaling\[1\] must be finite.*\(adapter 1\)"),
        (dict(lora_A=1), TypeError, r"lora_A must be a tensor or a sequence of tensors"),
        (dict(lora_B=[torch.randn(12, 4)]), ValueError, r"lora_B must hold one adapter per lora_A \(2\), got 1"),
        (dict(lora_A=[torch.randn(4, 16), torch.randn(3, 15)]), ValueError, r"lora_A\[1\] must be \(r, K\).*\(adapter 1\)"),
        (dict(lora_B=[torch.randn(12, 4), torch.randn(12, 5)]), ValueError, r"lora_B\[1\] must be \(N, r\).*\(adapter 1\)"),
        (dict(lora_B=[torch.randn(12, 4), torch.randn(12, 3, dtype=torch.float64)]), TypeError,
         r"lora_B\[1\] must have x's dtype.*\(adapter 1\)"),
        (dict(seed=torch.tensor([1])), TypeError, r"seed must be an int64 tensor of shape \(2,\), one per adapter"),
        (dict(lora_A=torch.randn(2, 16)), ValueError, r"lora_A must be a \(T, r, K\) tensor"),
    ],
    ids=["p<0", "p=1", "p-count", "scaling-nan", "A-type", "B-count", "A-shape", "B-shape", "B-dtype", "seed-shape",
         "A-ndim"],
)
def test_stacked_errors_name_argument_and_adapter(change, error, pattern):
    x, weight, As, Bs = _small()
    args = dict(lora_A=As, lora_B=Bs, scaling=1.0, dropout_p=0.1)
    args.update(change)
    with pytest.raises(error, match=pattern):
        lora_linear_stacked(x, weight, None, backend="reference", **args)


@pytest.mark.parametrize(
    "ids,error,pattern",
    [
        (torch.tensor([0, 1, 2, 0, 1, -1]), ValueError, re.escape("adapter_ids must be in [-1, 2)") + r".*adapter_ids\[2\] = 2"),
        (torch.tensor([0, 1, -2, 0, 1, -1]), ValueError, r"adapter_ids\[2\] = -2"),
        (torch.tensor([0, 1, 0]), ValueError, r"adapter_ids must hold one id per row of x \(M = 6"),
        (torch.zeros(6), TypeError, r"adapter_ids must be an integer tensor"),
        ([0, 1, 0, 1, 0, 1], TypeError, r"adapter_ids must be an integer tensor, got list"),
    ],
    ids=["too-large", "below-minus-1", "length", "float", "list"],
)
def test_per_row_errors_name_argument(ids, error, pattern):
    x, weight, As, Bs = _small()
    with pytest.raises(error, match=pattern):
        lora_linear_per_row(x, weight, None, As, Bs, 1.0, ids, backend="reference")


@pytest.mark.parametrize("stacked", [False, True], ids=["lists", "stacks"])
def test_per_row_scaling_error_names_adapter(stacked):
    x, weight, _, _ = _small()
    A, B = torch.randn(3, 4, 16), torch.randn(3, 12, 4)
    args = (A, B) if stacked else (list(A), list(B))
    with pytest.raises(ValueError, match=r"scaling\[2\] must be finite.*\(adapter 2\)"):
        lora_linear_per_row(x, weight, None, *args, [1.0, 2.0, float("inf")], torch.zeros(6, dtype=torch.long))


def test_per_row_adapter_shape_error_names_adapter():
    x, weight, As, Bs = _small()
    with pytest.raises(ValueError, match=r"lora_B\[1\] must be \(N, r\) = \(12, 3\).*\(adapter 1\)"):
        lora_linear_per_row(x, weight, None, As, [Bs[0], torch.randn(11, 3)], 1.0, torch.zeros(6, dtype=torch.long))


@needs_cpu_kernels
@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(order=torch.tensor([0, 1, 2, 3, 4, 6])), r"order\[5\] = 6 is not a row of x"),
        (dict(order=torch.tensor([0, 1, 2, 3, 4, -1])), r"order\[5\] = -1 is not a row of x"),
        (dict(starts=torch.tensor([0, 2, 1, 6])), r"starts must be non-decreasing"),
        (dict(starts=torch.tensor([0, 2, 4, 7])), r"starts must run from 0 to M=6"),
        (dict(starts=torch.tensor([0, 6])), r"starts must be a contiguous int64 \(T\+2=4,\)"),
        (dict(scalings=[1.0, 1.0, 1.0]), r"scalings must hold T=2 values, got 3"),
    ],
    ids=["order-past-end", "order-negative", "starts-decreasing", "starts-past-end", "starts-length", "scalings"],
)
def test_compiled_per_row_op_bounds_its_indices(change, pattern):
    """The C++ per-row op writes y and xa rows through `order`: it refuses indices outside x."""
    x, weight, As, Bs = _small()
    A = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, 4 - a.shape[0])) for a in As])
    B = torch.stack([torch.nn.functional.pad(b, (0, 4 - b.shape[1])) for b in Bs])
    args = dict(order=torch.arange(6), starts=torch.tensor([0, 2, 4, 6]), scalings=[1.0, 1.0])
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.lora_kernels.per_row_forward(x, weight, None, A, B, args["scalings"], args["order"], args["starts"])


def _sorted_groups(ids, count):
    """The GPU path's grouping (a stable sort and a search), the oracle of the CPU counting sort."""
    sorted_ids, order = torch.sort(ids.reshape(-1).to(torch.int64), stable=True)
    return order, torch.searchsorted(sorted_ids, torch.arange(-1, count + 1))


@needs_cpu_kernels
@pytest.mark.parametrize(
    "ids,count",
    [
        (torch.tensor([2, -1, 0, 2, 1, -1, 0, 0]), 3),
        (torch.randint(-1, 32, (64,), dtype=torch.int32), 32),  # decode: many adapters, int32 ids
        (torch.full((5,), -1), 4),  # base rows only, adapters without rows
        (torch.zeros(0, dtype=torch.int64), 2),
        (torch.arange(6).reshape(2, 3) % 3, 3),
    ],
    ids=["small", "decode-int32", "base-only", "empty", "2-D"],
)
def test_cpu_group_rows_is_the_stable_sort(ids, count):
    groups = group_rows(ids, count)
    order, starts = _sorted_groups(ids, count)
    assert torch.equal(groups.order, order) and torch.equal(groups.starts, starts)
    assert torch.equal(groups.ids, ids.reshape(-1).to(torch.int64))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_cpu_group_rows_checks_the_ids(compiled, monkeypatch):
    if compiled and not has_op("group_rows", "cpu"):
        pytest.skip("lora_kernels._C is not built")
    monkeypatch.setattr("lora_kernels.contract.has_op", lambda name, device_type: compiled)
    with pytest.raises(ValueError, match=re.escape("adapter_ids must be in [-1, 2)") + r".*adapter_ids\[3\] = 5"):
        group_rows(torch.tensor([0, 1, -1, 5, 7]), 2)


@pytest.mark.parametrize("rows", [1, 33])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_leaves_its_inputs_untouched(backend, rows):
    """No input is written to: a one-row chunk's bias row must not alias the caller's bias."""
    device = device_for(backend)
    with backend_context(backend, device):
        skip_unless_served(backend, device, torch.float32, variant="per_row")
        g = torch.Generator().manual_seed(4)
        x, weight, b = (torch.randn(*s, generator=g).to(device) for s in ((rows, 16), (12, 16), (12,)))
        A, B = torch.randn(2, 4, 16, generator=g).to(device), torch.randn(2, 12, 4, generator=g).to(device)
        ids = torch.ones(rows, dtype=torch.int64, device=device)
        before = [t.clone() for t in (x, weight, b, A, B, ids)]
        y1 = lora_linear_per_row(x, weight, b, A, B, 2.0, ids, backend)
        y2 = lora_linear_per_row(x, weight, b, A, B, 2.0, ids, backend)
        for name, t, old in zip(("x", "weight", "bias", "lora_A", "lora_B", "adapter_ids"), (x, weight, b, A, B, ids),
                                before):
            assert torch.equal(t, old), f"{name} was modified"
        assert torch.equal(y1, y2)


def test_torch_compile_runs_both_forms():
    """torch.compile (graph breaks allowed: the per-row id check syncs) gives the eager results and gradients."""
    x, weight, As, Bs = _small()
    x.requires_grad_(True)
    for t in (*As, *Bs):
        t.requires_grad_(True)
    seed = torch.tensor([5, 2**40 + 1])
    ids = torch.tensor([0, 1, -1, 0, 1, 1])

    def stacked(x):
        return lora_linear_stacked(x, weight, None, As, Bs, [1.0, 0.5], [0.1, 0.0], True, seed=seed)

    def per_row(x):
        return lora_linear_per_row(x, weight, None, As, Bs, [1.0, 0.5], ids)

    torch._dynamo.reset()
    for fn in (stacked, per_row):
        y, y_eager = torch.compile(fn)(x), fn(x)
        torch.testing.assert_close(y, y_eager)
        for got, want in zip(torch.autograd.grad(y.sum(), [x, *As, *Bs]), torch.autograd.grad(y_eager.sum(), [x, *As, *Bs])):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("form", ["stacked", "per_row"])
def test_double_backward_raises_a_clear_error(form):
    """Differentiating the gradients again must raise, not silently drop the second-order terms
    (a penalty on ‖dy/dx‖² would otherwise train A and B on the first-order terms alone)."""
    x, weight, As, Bs = _small()
    x = x.double().requires_grad_()
    weight = weight.double()
    As = [a.double().requires_grad_() for a in As]
    Bs = [b.double().requires_grad_() for b in Bs]
    if form == "stacked":
        y = lora_linear_stacked(x, weight, None, As, Bs, 0.5, dropout_p=0.0)
    else:
        y = lora_linear_per_row(x, weight, None, As, Bs, 0.5, torch.tensor([0, 1, -1, 0, 1, 1]))
    (grad_x,) = torch.autograd.grad(y.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (grad_x.square().sum() + y.sum()).backward()
