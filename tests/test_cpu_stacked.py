# SPDX-License-Identifier: Apache-2.0
"""Several adapters summed in one layer (`lora_kernels.contract.StackedSpec`) on the compiled ops:
the fused cpu ops torch.ops.lora_kernels.fused_forward_stacked / fused_backward_stacked and the
cuda backend's composed form (one single-adapter call per adapter, run here on the cpu ops and
on the emulated cuda ops), against the fp64 oracle `lora_kernels.reference.lora_linear_stacked_eager`
(gradients by autograd).

Tolerances: `helpers.TOLERANCES` per dtype; fp16/bf16 also pass within 2x the error of the same
maths run eagerly in their own dtype (`helpers.assert_close`'s baseline). Masks: each adapter's xa
columns equal, bit for bit, those of a single-adapter fused_forward with seed seeds[t:t+1]."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_cuda_backend import emu  # noqa: F401  (the emulated cuda ops: a module fixture)

import lora_kernels
from lora_kernels.backends import compiled
from lora_kernels.contract import LoRASpec, LoRAWeights, StackedSpec
from lora_kernels.dropout import dropout_keep_mask, dropout_multiplier
from lora_kernels.reference import lora_linear_stacked_eager
from helpers import assert_close, make_base

pytestmark = pytest.mark.skipif("cpu" not in lora_kernels.available_backends("cpu"), reason="cpu kernels not built")

OPS = torch.ops.lora_kernels
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SCALINGS = (0.5, 2.0, 1.25)  # differing: the fused expand folds them into Bᵀ
SEEDS = (11, 2**40 + 3, 7)


def make_stacked(m, k, n, ranks, dtype, bias=True, layout="contiguous", seed=0):
    """x (M, K) laid out as `layout` says, weight (N, K), bias (N,) or None, the concatenated
    lora_A (R, K) and lora_B (N, R) (each adapter's block scaled as a single adapter's would be),
    grad_y (M, N): every term O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rand(m, k)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(m, 2 * k, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif layout == "transposed":  # column-major
        x = x.t().contiguous().t()
    weight = rand(n, k, scale=k**-0.5)
    b = rand(n) if bias else None
    lora_A = torch.cat([rand(r, k, scale=k**-0.5) for r in ranks])
    lora_B = torch.cat([rand(n, r, scale=r**-0.5) for r in ranks], dim=1)
    return x, weight, b, lora_A, lora_B, rand(m, n)


def make_spec(ranks, ps, scalings=SCALINGS):
    return StackedSpec(tuple(LoRASpec(s, p) for s, p in zip(scalings, ps)), tuple(ranks))


def make_seeds(spec):
    """seeds (T,) when an adapter drops, else None (the contract)."""
    return torch.tensor(SEEDS[: len(spec.ranks)]) if any(p > 0 for p in spec.dropout_ps) else None


def segments(spec):
    return [slice(o, o + r) for o, r in zip(spec.offsets, spec.ranks)]


def eager(dtype, x, weight, bias, lora_A, lora_B, spec, seeds, grad_y):
    """The oracle in `dtype`: y and the gradients (x, lora_A (R, K), lora_B (N, R)), xa (M, R)."""
    segs = segments(spec)
    xl = x.detach().to(dtype).requires_grad_(True)
    As = [lora_A[s].detach().to(dtype).requires_grad_(True) for s in segs]
    Bs = [lora_B[:, s].detach().to(dtype).requires_grad_(True) for s in segs]
    y = lora_linear_stacked_eager(xl, weight.to(dtype), None if bias is None else bias.to(dtype), As, Bs,
                                  spec.scalings, spec.dropout_ps, seeds)
    grads = torch.autograd.grad(y, [xl, *As, *Bs], grad_y.to(dtype))
    xas = []
    for t, (a, p) in enumerate(zip(As, spec.dropout_ps)):
        d = dropout_multiplier(int(seeds[t]), *x.shape, p, dtype, "cpu") if p > 0 else 1.0
        xas.append((xl.detach() * d) @ a.detach().t())
    t = len(segs)
    return y.detach(), grads[0], torch.cat(grads[1 : 1 + t]), torch.cat(grads[1 + t :], dim=1), torch.cat(xas, 1)


def check_against_oracle(got, x, weight, bias, lora_A, lora_B, spec, seeds, grad_y, with_weight=True):
    """got = (y, xa, grad_x or empty, grad_A, grad_B) of a stacked call, in x's dtype."""
    dtype = x.dtype
    w = weight if with_weight else torch.zeros_like(weight)
    want = eager(torch.float64, x, w, bias, lora_A, lora_B, spec, seeds, grad_y)
    base = eager(dtype, x, w, bias, lora_A, lora_B, spec, seeds, grad_y) if dtype.itemsize == 2 else [None] * 5
    y, xa, gx, ga, gb = got
    for t in got:
        assert t.dtype == dtype
    assert_close(y, want[0], dtype, "y", base[0])
    assert_close(xa, want[4], dtype, "xa", base[4])
    if gx.numel():
        assert_close(gx, want[1], dtype, "grad_x", base[1])
    assert_close(ga, want[2], dtype, "grad_A", base[2])
    assert_close(gb, want[3], dtype, "grad_B", base[3])


def run_stacked(x, weight, bias, lora_A, lora_B, spec, seeds, grad_y, compute_dx=True):
    y, xa = OPS.fused_forward_stacked(x, weight, bias, lora_A, lora_B, list(spec.ranks), list(spec.scalings),
                                      list(spec.dropout_ps), seeds)
    gx, ga, gb = OPS.fused_backward_stacked(grad_y, x, weight, lora_A, lora_B, xa, list(spec.ranks),
                                            list(spec.scalings), list(spec.dropout_ps), seeds, compute_dx)
    return y, xa, gx, ga, gb


def run_composed(ops, x, weight, bias, lora_A, lora_B, spec, seeds, grad_y, compute_dx=True):
    y, xa = compiled._compose_stacked_forward(ops, x, weight, bias, lora_A, lora_B, spec, seeds)
    gx, ga, gb = compiled._compose_stacked_backward(ops, grad_y, x, weight, lora_A, lora_B, xa, spec, seeds,
                                                    compute_dx)
    return y, xa, gx, ga, gb


# (ranks, dropout_ps): T = 1, 2, 3, differing ranks, mixes of rates, none dropping (seeds None).
ADAPTERS = [
    ((16,), (0.1,)),
    ((4, 16), (0.0, 0.5)),
    ((4, 16, 7), (0.1, 0.0, 0.5)),
    ((4, 16, 7), (0.1, 0.1, 0.1)),
    ((4, 16, 7), (0.5, 0.0, 0.0)),  # the last two share x's rows: one product for both
    ((4, 16, 7), (0.0, 0.0, 0.0)),
]


def _adapters_id(case):
    ranks, ps = case
    return "r" + "-".join(map(str, ranks)) + "-p" + "-".join(map(str, ps))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapters", ADAPTERS, ids=_adapters_id)
def test_matches_oracle(dtype, adapters):
    # 70 rows: three 32-row blocks, the last partial; K = 130, N = 67 off the 16-lane vectors.
    spec = make_spec(*adapters)
    seeds = make_seeds(spec)
    args = make_stacked(70, 130, 67, spec.ranks, dtype)
    check_against_oracle(run_stacked(*args[:5], spec, seeds, args[5]), *args[:5], spec, seeds, args[5])


# (M, layout, bias, with_weight, compute_dx): rows fewer than a block, non-contiguous x, no bias,
# no weight (LoRA terms alone), no grad_x.
SHAPES = [
    (5, "contiguous", True, True, True),
    (37, "strided", True, True, True),
    (37, "transposed", False, True, True),
    (70, "contiguous", False, False, True),
    (33, "strided", True, False, True),
    (70, "contiguous", True, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,layout,bias,with_weight,compute_dx", SHAPES)
@pytest.mark.parametrize("ps", [(0.1, 0.0, 0.5), (0.0, 0.0, 0.0)], ids=["p-mixed", "p-zero"])
def test_layouts_and_options(dtype, m, layout, bias, with_weight, compute_dx, ps):
    spec = make_spec((4, 16, 7), ps)
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(m, 45, 37, spec.ranks, dtype, bias=bias, layout=layout)
    got = run_stacked(x, w if with_weight else None, b, A, B, spec, seeds, dy, compute_dx)
    assert (got[2].numel() > 0) == compute_dx
    check_against_oracle(got, x, w, b, A, B, spec, seeds, dy, with_weight=with_weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ps", [(0.5, 0.0, 0.3), (0.0, 0.0, 0.3)], ids=["p-mixed", "p-two-zero"])
def test_xa_columns_are_the_single_adapter_masks(dtype, ps):
    # Adapter t's xa columns equal a one-adapter fused_forward with seed seeds[t:t+1], bit for bit:
    # its mask is that adapter's own, not another's.
    spec = make_spec((4, 16, 7), ps)
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(70, 130, 67, spec.ranks, dtype)
    _, xa = OPS.fused_forward_stacked(x, w, b, A, B, list(spec.ranks), list(spec.scalings), list(spec.dropout_ps),
                                      seeds)
    for t, cols in enumerate(segments(spec)):
        seed = seeds[t : t + 1] if spec.dropout_ps[t] > 0 else None
        _, xa_t = OPS.fused_forward(x, None, None, A[cols], B[:, cols].contiguous(), spec.scalings[t],
                                    spec.dropout_ps[t], seed)
        assert torch.equal(xa[:, cols], xa_t), f"adapter {t}'s xa columns differ from its single-adapter call"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_one_adapter_is_the_single_adapter_op(dtype, p, layout):
    # T = 1 runs the same kernels as fused_forward/fused_backward: every output bit for bit.
    spec = make_spec((16,), (p,))
    seed = torch.tensor([5]) if p > 0 else None
    x, w, b, A, B, dy = make_stacked(70, 130, 67, spec.ranks, dtype, layout=layout)
    got = run_stacked(x, w, b, A, B, spec, seed, dy)
    y, xa = OPS.fused_forward(x, w, b, A, B, spec.scalings[0], p, seed)
    want = (y, xa, *OPS.fused_backward(dy, x, w, A, B, xa, spec.scalings[0], p, seed, True))
    for name, g, e in zip(("y", "xa", "grad_x", "grad_A", "grad_B"), got, want):
        assert torch.equal(g, e), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_weight,compute_dx", [(True, True), (False, True), (True, False)])
def test_composition_on_cpu_ops_matches_stacked_op(dtype, with_weight, compute_dx):
    # The cuda backend's composed form, run on the cpu single-adapter ops: the same xa (the same
    # masks) as the fused op, and both within tolerance of the oracle.
    spec = make_spec((4, 16, 7), (0.1, 0.0, 0.5))
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(70, 130, 67, spec.ranks, dtype)
    w_arg = w if with_weight else None
    composed = run_composed(OPS, x, w_arg, b, A, B, spec, seeds, dy, compute_dx)
    fused = run_stacked(x, w_arg, b, A, B, spec, seeds, dy, compute_dx)
    assert torch.equal(composed[1], fused[1]), "xa"
    assert composed[2].shape == fused[2].shape
    for got in (composed, fused):
        check_against_oracle(got, x, w, b, A, B, spec, seeds, dy, with_weight=with_weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_composition_on_emulated_cuda_ops(emu, dtype):  # noqa: F811
    # The same composition on the cuda kernels (emulated): their products sum in another order, so
    # xa is compared with the oracle (a wrong mask at p = 0.5 is far outside tolerance).
    spec = make_spec((4, 16, 7), (0.1, 0.0, 0.5))
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(37, 40, 45, spec.ranks, dtype)
    composed = run_composed(emu, x, w, b, A, B, spec, seeds, dy)
    check_against_oracle(composed, x, w, b, A, B, spec, seeds, dy)


@pytest.mark.parametrize("base_format", ["dense", "nf4"])
@pytest.mark.parametrize("compute_dx", [True, False])
def test_backend_functions(base_format, compute_dx):
    # compiled.forward_stacked/backward_stacked: a dense base fused into the ops, any other format
    # (weight None to the ops) through its own products.
    spec = make_spec((4, 16, 7), (0.1, 0.0, 0.5))
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(37, 64, 45, spec.ranks, torch.float32)
    base = make_base(base_format, w)
    weights = LoRAWeights(base, b, A, B)
    y, xa = compiled.forward_stacked(x, weights, spec, seeds)
    grads = compiled.backward_stacked(dy, x, weights, xa, spec, seeds, compute_dx)
    assert (grads.x is None) != compute_dx
    gx = grads.x if compute_dx else x.new_empty(0)
    check_against_oracle((y, xa, gx, grads.lora_A, grads.lora_B), x, base.dense(), b, A, B, spec, seeds, dy)


def test_nan_in_a_dropped_element_propagates():
    # The NaN contract: dropout is x * mask / (1 - p), so a NaN that adapter 1 drops still reaches
    # y (NaN * 0 = NaN), as in the oracle.
    spec = make_spec((4, 16, 7), (0.0, 0.5, 0.0))
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(37, 64, 45, spec.ranks, torch.float32)
    keep = dropout_keep_mask(SEEDS[1], 37, 64, 0.5)
    row, col = (~keep).nonzero()[0].tolist()
    x[row, col] = float("nan")
    y, xa = OPS.fused_forward_stacked(x, None, None, A, B, list(spec.ranks), list(spec.scalings),
                                      list(spec.dropout_ps), seeds)
    assert xa[row].isnan().all() and y[row].isnan().all()
    assert not y[row + 1].isnan().any()


@pytest.mark.parametrize("k", [64, 60], ids=["mask-as-loaded", "unaligned-rows"])
def test_nan_in_a_dropped_x_element_reaches_grad_a(k):
    # dA = gᵀ·D(x): D(x) is x multiplied by the mask (NaN · 0 = NaN), whether the mask is applied
    # as dA's loop loads x (K % 8 == 0) or to a dropped copy of the block.
    spec = make_spec((4, 16, 7), (0.0, 0.5, 0.0))
    seeds = make_seeds(spec)
    x, _, _, A, B, dy = make_stacked(37, k, 45, spec.ranks, torch.float32)
    keep = dropout_keep_mask(SEEDS[1], 37, k, 0.5)
    row, col = (~keep).nonzero()[0].tolist()
    x[row, col] = float("nan")
    _, xa = OPS.fused_forward_stacked(x, None, None, A, B, list(spec.ranks), list(spec.scalings),
                                      list(spec.dropout_ps), seeds)
    _, grad_a, _ = OPS.fused_backward_stacked(dy, x, None, A, B, xa, list(spec.ranks), list(spec.scalings),
                                              list(spec.dropout_ps), seeds, False)
    assert grad_a[4:20, col].isnan().all()  # adapter 1 drops it: NaN · 0
    assert grad_a[:4, col].isnan().all() and grad_a[20:, col].isnan().all()  # the others keep x as is
    assert not grad_a[:, col + 1].isnan().any()


@pytest.mark.parametrize("k", [64, 60], ids=["mask-in-epilogue", "unaligned-rows"])
def test_nan_in_a_dropped_grad_x_element_propagates(k):
    # Backward's dX term s·D⊙(g·A) multiplies by the mask (Inf · 0 = NaN, as torch's dropout
    # backward), whether the mask is applied in the product's epilogue (K % 8 == 0: every row
    # starts a keep byte) or in a pass of its own.
    spec = make_spec((4, 16, 7), (0.0, 0.5, 0.0))
    seeds = make_seeds(spec)
    x, _, _, A, B, dy = make_stacked(37, k, 45, spec.ranks, torch.float32)
    col = 5
    A[4, col] = float("inf")  # adapter 1's first rank: its g·A is ±Inf in column col
    _, xa = OPS.fused_forward_stacked(x, None, None, A, B, list(spec.ranks), list(spec.scalings),
                                      list(spec.dropout_ps), seeds)
    grad_x, _, _ = OPS.fused_backward_stacked(dy, x, None, A, B, xa, list(spec.ranks), list(spec.scalings),
                                              list(spec.dropout_ps), seeds, True)
    dropped = ~dropout_keep_mask(SEEDS[1], 37, k, 0.5)[:, col]
    assert dropped.any() and (~dropped).any()
    assert torch.equal(grad_x[:, col].isnan(), dropped)  # Inf · 0 where dropped, ±Inf where kept
    assert grad_x[~dropped, col].isinf().all()
    assert torch.isfinite(grad_x[:, col + 1]).all()


def test_opcheck():
    spec = make_spec((4, 16, 7), (0.1, 0.0, 0.5))
    seeds = make_seeds(spec)
    x, w, b, A, B, dy = make_stacked(37, 40, 45, spec.ranks, torch.float32)
    lists = (list(spec.ranks), list(spec.scalings), list(spec.dropout_ps), seeds)
    torch.library.opcheck(OPS.fused_forward_stacked.default, (x, w, b, A, B, *lists))
    xa = OPS.fused_forward_stacked(x, w, b, A, B, *lists)[1]
    for compute_dx in (True, False):
        torch.library.opcheck(OPS.fused_backward_stacked.default, (dy, x, w, A, B, xa, *lists, compute_dx))


def test_backend_record_declares_the_variant():
    assert "stacked" in compiled.backend("cpu").variants and "stacked" in compiled.backend("cuda").variants


def _bad_calls():
    """(id, call, message): every check names its argument (and the adapter where there is one)."""
    x, w, b, A, B, dy = make_stacked(4, 8, 6, (2, 3), torch.float32)
    good = dict(ranks=[2, 3], scalings=[1.0, 0.5], dropout_ps=[0.1, 0.2], seeds=torch.tensor([1, 2]))

    def fwd(**kw):
        a = {**good, **kw}
        return lambda: OPS.fused_forward_stacked(x, w, b, A, B, a["ranks"], a["scalings"], a["dropout_ps"],
                                                 a["seeds"])

    def bwd(xa=None, **kw):
        a = {**good, **kw}
        xa = torch.zeros(4, 5) if xa is None else xa
        return lambda: OPS.fused_backward_stacked(dy, x, w, A, B, xa, a["ranks"], a["scalings"], a["dropout_ps"],
                                                  a["seeds"], True)

    count = r"one entry per adapter \(at least one\), got"
    return [
        ("no-adapters", fwd(ranks=[], scalings=[], dropout_ps=[]), count + r" 0, 0 and 0"),
        ("scalings-length", fwd(scalings=[1.0]), count + r" 2, 1 and 2"),
        ("dropout_ps-length", bwd(dropout_ps=[0.1, 0.2, 0.3]), count + r" 2, 2 and 3"),
        ("rank-zero", fwd(ranks=[0, 5]), r"ranks\[0\] must be >= 1, got 0"),
        ("ranks-sum", fwd(ranks=[2, 2]), r"sum\(ranks\) = 4 must equal R = 5"),
        ("ranks-sum-bwd", bwd(ranks=[3, 3]), r"sum\(ranks\) = 6 must equal R = 5"),
        ("p-one", fwd(dropout_ps=[0.1, 1.0]), r"dropout_ps\[1\] must be in \[0, 1\), got 1"),
        ("p-negative", bwd(dropout_ps=[-0.1, 0.2]), r"dropout_ps\[0\] must be in \[0, 1\), got -0.1"),
        ("p-nan", fwd(dropout_ps=[0.1, float("nan")]), r"dropout_ps\[1\] must be in \[0, 1\), got nan"),
        ("p-rounds-to-one", fwd(dropout_ps=[0.1, 0.999995]), r"dropout_ps\[1\] = 0.999995 drops every element"),
        ("p-bad-without-seeds", fwd(dropout_ps=[0.1, 1.5], seeds=None), r"dropout_ps\[1\] must be in \[0, 1\)"),
        ("seeds-shape", fwd(seeds=torch.tensor([1])), r"seeds must be an int64 CPU tensor of shape \(T=2,\), got "
                                                      r"Long \[1\]"),
        ("seeds-dtype", bwd(seeds=torch.tensor([1, 2], dtype=torch.int32)), r"seeds must be an int64 CPU tensor "
                                                                            r"of shape \(T=2,\), got Int"),
        ("xa-shape", bwd(xa=torch.zeros(4, 4)), r"xa must be \(M=4, r=5\), got \[4, 4\]"),
        ("lora_B-rank", lambda: OPS.fused_forward_stacked(x, w, b, A, B[:, :4], [2, 3], [1.0, 1.0], [0.0, 0.0],
                                                          None), r"lora_B must be \(N=6, r=5\)"),
    ]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in _bad_calls()])
def test_checks_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ps", [(0.1, 0.0, 0.5), (0.0, 0.0, 0.0)], ids=["p-mixed", "p-zero"])
def test_nothing_m_by_k_besides_grad_x(dtype, ps):
    # tests/test_memory.py's bound on a tall shape (M ≫ N, so an M×K temporary stands out): beyond
    # what each pass returns, at most ¼ byte per element of x, one fp32 M×N and two fp32 M×R (g = dY·B
    # and, for 16-bit, xa in fp32). One thread, so the profiler sees every allocation.
    from test_memory import peak_bytes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = make_spec((4, 16, 7), ps)
        seeds = make_seeds(spec)
        m, k, n = 1024, 512, 32
        x, w, b, A, B, dy = make_stacked(m, k, n, spec.ranks, dtype)
        lists = (list(spec.ranks), list(spec.scalings), list(spec.dropout_ps), seeds)
        allowance = m * k // 4 + m * n * 4 + 2 * m * spec.total_rank * 4
        out = {}
        passes = [
            ("forward", lambda: out.update(fwd=OPS.fused_forward_stacked(x, w, b, A, B, *lists)), "fwd"),
            ("backward", lambda: out.update(bwd=OPS.fused_backward_stacked(dy, x, w, A, B, out["fwd"][1], *lists,
                                                                           True)), "bwd"),
        ]
        for name, fn, key in passes:
            peak = peak_bytes(fn)
            returned = sum(t.untyped_storage().nbytes() for t in out[key])
            assert peak - returned <= allowance, f"{name}: {peak - returned} B beyond its outputs, allowed {allowance}"
    finally:
        torch.set_num_threads(threads)


def test_portable_loops_match_the_oracle():
    # LORA_KERNELS_NO_AVX512=1 (read once per process, so in a child) forces the portable paths
    # (ATen products, the scalar masked multiply and its accumulate): the oracle and mask tests in fp32.
    env = dict(os.environ, LORA_KERNELS_NO_AVX512="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    select = "float32 and (test_matches_oracle or test_xa_columns or test_one_adapter)"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                           "-k", select], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
