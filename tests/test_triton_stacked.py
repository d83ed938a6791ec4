# SPDX-License-Identifier: Apache-2.0
"""The triton backend's stacked variant (several adapters summed, one dropout mask each;
`lora_kernels.backends.triton.stacked`) against the fp64 oracle
`reference.lora_linear_stacked_eager`: forward y, xa and every gradient, T = 1..3 adapters of
differing ranks, dropout mixes, bias/None, non-contiguous x, compute_dx off, both backward
reduction modes; each adapter's xa columns and dA bit-identical to a one-adapter triton call with
seeds[t:t+1]; and the static evidence for the dX kernel's segment epilogue (compiled for
sm80/sm90 bf16/fp16 without a GPU: no spills; the single-adapter kernel's PTX untouched).

Runs under the Triton interpreter on CPU tensors (fp32/fp16; the interpreter has no bf16
tl.dot), with tests/test_triton.py's interpreter setup and fixture.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.test_triton import DEVICE, INTERPRET, _interpreter_env, _triton_env, triton_backend  # noqa: F401  (autouse fixture)

with _interpreter_env():
    from lora_kernels.backends.triton import fwd as _fwd
    from lora_kernels.backends.triton import stacked

    if stacked.launch_xa is not _fwd.launch_xa:  # imported before test_triton re-decorated the kernels
        stacked = importlib.reload(stacked)

from lora_kernels.base_weights import as_base_weight  # noqa: E402
from lora_kernels.contract import LoRASpec, LoRAWeights, StackedSpec  # noqa: E402
from lora_kernels.reference import lora_linear_stacked_eager  # noqa: E402
from tests.helpers import assert_close, run_compiled  # noqa: E402

DTYPES = [torch.float32, torch.float16]

# (M, K, N, ranks, dropout ps, bias, seeds given). Interpreter tiles are 32 wide, so M = 40 has two
# row blocks and N/K ragged edges; K = 37 (K % 8 != 0) straddles mask groups across rows.
CASES = [
    pytest.param(40, 37, 45, (4,), (0.1,), True, True, id="T1-p.1"),
    pytest.param(40, 64, 45, (4, 16), (0.0, 0.5), False, True, id="T2-p0,.5"),
    pytest.param(40, 37, 33, (4, 16, 8), (0.1, 0.0, 0.5), True, True, id="T3-mix"),
    pytest.param(33, 48, 40, (4, 16, 8), (0.0, 0.0, 0.1), True, True, id="T3-run-of-two"),
    pytest.param(40, 37, 45, (4, 16, 8), (0.0, 0.0, 0.0), True, False, id="T3-nodrop-seedsNone"),
    pytest.param(9, 40, 24, (16, 8), (0.5, 0.1), False, True, id="T2-both-drop"),
]
SCALINGS = (2.0, 0.5, 1.25)


def _make(m, k, n, ranks, dtype, bias, seed=0, non_contiguous=False):
    """x (M, K) (a strided view when `non_contiguous`), W (N, K), b, A (R, K), B (N, R), dy (M, N)."""
    g = torch.Generator().manual_seed(seed)
    big_r = sum(ranks)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rand(k, m).t() if non_contiguous else rand(m, k)  # column-major: stride (1, M)
    w = rand(n, k, scale=k**-0.5)
    b = rand(n) if bias else None
    a = rand(big_r, k, scale=k**-0.5)
    bb = rand(n, big_r, scale=max(ranks) ** -0.5)
    dy = rand(m, n)
    return x, w, b, a, bb, dy


def _spec(ranks, ps):
    return StackedSpec(tuple(LoRASpec(SCALINGS[t], ps[t]) for t in range(len(ranks))), tuple(ranks))


def _seeds(ranks, given):
    return torch.tensor([1234 + 977 * t for t in range(len(ranks))], dtype=torch.int64) if given else None


def _oracle(x, w, b, a, bb, dy, spec, seeds):
    """fp64 y and (dx, dA, dB) by autograd through the oracle (A/B views of one leaf each)."""
    x64, a64, bb64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb))
    offs = spec.offsets
    As = [a64[o : o + r] for o, r in zip(offs, spec.ranks)]
    Bs = [bb64[:, o : o + r] for o, r in zip(offs, spec.ranks)]
    y = lora_linear_stacked_eager(x64, w.double(), None if b is None else b.double(), As, Bs, spec.scalings,
                                  spec.dropout_ps, seeds)
    y.backward(dy.double())
    return y.detach(), x64.grad, a64.grad, bb64.grad


def _run(x, w, b, a, bb, dy, spec, seeds, compute_dx=True, deterministic=None):
    weights = LoRAWeights(as_base_weight(w), b, a, bb)
    y, xa = triton_backend.forward_stacked(x, weights, spec, seeds)
    grads = triton_backend.backward_stacked(dy, x, weights, xa, spec, seeds, compute_dx, deterministic=deterministic)
    return y, xa, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,ranks,ps,bias,seeded", CASES)
def test_stacked_matches_oracle(m, k, n, ranks, ps, bias, seeded, dtype):
    """y, xa (column slice t = Dₜ(x)·Aₜᵀ), dX, dA, dB against fp64 autograd through the oracle
    (tolerances: tests.helpers.TOLERANCES, fp32 2e-4, fp16 2e-2 abs/rel)."""
    spec, seeds = _spec(ranks, ps), _seeds(ranks, seeded)
    x, w, b, a, bb, dy = _make(m, k, n, ranks, dtype, bias)
    y, xa, grads = _run(x, w, b, a, bb, dy, spec, seeds)
    y64, dx64, da64, db64 = _oracle(x, w, b, a, bb, dy, spec, seeds)
    assert_close(y, y64, dtype, "y")
    xa64 = torch.cat([_masked_x(x, spec, seeds, t) @ a[o : o + r].double().t()
                      for t, (o, r) in enumerate(zip(spec.offsets, spec.ranks))], dim=1)
    assert_close(xa, xa64, dtype, "xa")
    assert_close(grads.x, dx64, dtype, "grad_x")
    assert_close(grads.lora_A, da64, dtype, "grad_A")
    assert_close(grads.lora_B, db64, dtype, "grad_B")
    assert grads.lora_A.dtype == grads.lora_B.dtype == grads.x.dtype == dtype


def _masked_x(x, spec, seeds, t):
    """Dₜ(x) in fp64 by the Python mirror of the dropout rule."""
    from lora_kernels.dropout import dropout_multiplier

    x64 = x.double()
    p = spec.dropout_ps[t]
    if seeds is None or p == 0.0:
        return x64
    return x64 * dropout_multiplier(int(seeds[t]), x.shape[0], x.shape[1], p, torch.float64, x.device)


@pytest.mark.parametrize("deterministic", [True, False])
def test_noncontiguous_x_no_dx_and_reduction_modes(deterministic):
    """Column-major x, compute_dx=False (no dX, the rest unchanged), both reduction modes (atomics
    / pinned configs) against the oracle, fp32."""
    ranks, ps = (4, 16, 8), (0.1, 0.0, 0.5)
    spec, seeds = _spec(ranks, ps), _seeds(ranks, True)
    x, w, b, a, bb, dy = _make(40, 37, 45, ranks, torch.float32, True, seed=5, non_contiguous=True)
    assert not x.is_contiguous()
    y, _, grads = _run(x, w, b, a, bb, dy, spec, seeds, compute_dx=False, deterministic=deterministic)
    y64, _, da64, db64 = _oracle(x, w, b, a, bb, dy, spec, seeds)
    assert grads.x is None
    assert_close(y, y64, torch.float32, "y")
    assert_close(grads.lora_A, da64, torch.float32, "grad_A")
    assert_close(grads.lora_B, db64, torch.float32, "grad_B")
    _, _, with_dx = _run(x, w, b, a, bb, dy, spec, seeds, compute_dx=True, deterministic=deterministic)
    _, dx64, _, _ = _oracle(x, w, b, a, bb, dy, spec, seeds)
    assert_close(with_dx.x, dx64, torch.float32, "grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_adapter_is_a_one_adapter_call(dtype):
    """Mask identity: adapter t's xa columns and its dA are the bits of a one-adapter triton call
    (F2 schedule) with seeds[t:t+1], lora_A[segₜ], lora_B[:, segₜ] and its own scaling/rate."""
    ranks, ps = (4, 16, 8), (0.1, 0.0, 0.5)
    spec, seeds = _spec(ranks, ps), _seeds(ranks, True)
    x, w, b, a, bb, dy = _make(40, 37, 45, ranks, dtype, True, seed=2)
    _, xa, grads = _run(x, w, b, a, bb, dy, spec, seeds)
    for t, (o, r) in enumerate(zip(spec.offsets, ranks)):
        single = LoRAWeights(as_base_weight(w), b, a[o : o + r].contiguous(), bb[:, o : o + r].contiguous())
        seed = seeds[t : t + 1] if ps[t] > 0 else None
        one = LoRASpec(SCALINGS[t], ps[t])
        _, xa_t = triton_backend.forward(x, single, one, seed, schedule="F2")
        assert torch.equal(xa[:, o : o + r], xa_t), f"adapter {t}: xa columns differ from a one-adapter call"
        g_t = triton_backend.backward(dy, x, single, xa_t, one, seed, False)
        assert torch.equal(grads.lora_A[o : o + r], g_t.lora_A), f"adapter {t}: dA differs from a one-adapter call"


def test_masks_are_independent_per_adapter():
    """Two dropping adapters with equal weights but different seeds get different xa columns (each
    its own mask); swapping the seeds swaps them."""
    ranks, ps = (8, 8), (0.5, 0.5)
    spec = _spec(ranks, ps)
    x, w, b, a, bb, _ = _make(16, 40, 24, ranks, torch.float32, False)
    a = torch.cat([a[:8], a[:8]])
    weights = LoRAWeights(as_base_weight(w), b, a, bb)
    seeds = torch.tensor([11, 22], dtype=torch.int64)
    _, xa = triton_backend.forward_stacked(x, weights, spec, seeds)
    _, xa_swapped = triton_backend.forward_stacked(x, weights, spec, seeds.flip(0))
    assert not torch.equal(xa[:, :8], xa[:, 8:])
    assert torch.equal(xa[:, :8], xa_swapped[:, 8:]) and torch.equal(xa[:, 8:], xa_swapped[:, :8])


def test_empty_batch_and_bad_seeds():
    ranks, ps = (4, 8), (0.1, 0.0)
    spec = _spec(ranks, ps)
    x, w, b, a, bb, dy = _make(0, 16, 8, ranks, torch.float32, True)
    y, xa, grads = _run(x, w, b, a, bb, dy, spec, _seeds(ranks, True))
    assert y.shape == (0, 8) and xa.shape == (0, 12) and grads.x.shape == (0, 16)
    assert not grads.lora_A.any() and not grads.lora_B.any()
    weights = LoRAWeights(as_base_weight(w), b, a, bb)
    with pytest.raises(ValueError, match=r"seeds must be an int64 tensor of shape \(2,\)"):
        triton_backend.forward_stacked(x, weights, spec, torch.tensor([1], dtype=torch.int64))
    with pytest.raises(ValueError, match="seeds must be an int64"):
        triton_backend.forward_stacked(x, weights, spec, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_base(fmt):
    """An NF4/FP4 base W₀ goes through the same kernels (read packed, never dequantized on the
    host) against the oracle on the dequantized weight, fp32, two adapters (one dropping)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from tests.test_triton_nf4 import _weight

    ranks, ps = (4, 8), (0.1, 0.0)
    spec, seeds = _spec(ranks, ps), _seeds(ranks, True)
    x, _, b, a, bb, dy = _make(33, 128, 40, ranks, torch.float32, True, seed=7)
    base = _weight(40, 128, fmt, 64, torch.float32)
    weights = LoRAWeights(base, b, a, bb)
    y, xa = triton_backend.forward_stacked(x, weights, spec, seeds)
    grads = triton_backend.backward_stacked(dy, x, weights, xa, spec, seeds, True)
    assert base.dense_calls == 0
    y64, dx64, da64, db64 = _oracle(x, base.dense(), b, a, bb, dy, spec, seeds)
    for name, got, want in (("y", y, y64), ("grad_x", grads.x, dx64), ("grad_A", grads.lora_A, da64),
                            ("grad_B", grads.lora_B, db64)):
        assert_close(got, want, torch.float32, name)


def test_variant_is_registered():
    assert "stacked" in triton_backend.BACKEND.variants


# --- static evidence: compile the dX kernel's segment epilogue for sm80/sm90 (no GPU needed) -------

_COMPILE_SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton import bwd, compile_check, configs

def selectable(arch, dtype, segments, drop, aligned, rp, wf):
    # every config the dX pruner keeps over the M buckets (the pinned one is the first of each)
    w = torch.empty(0, dtype=torch.uint8) if wf else torch.empty(0, dtype=compile_check._DTYPES[dtype])
    out = {}
    for bucket in (1, 16, 64, 256, 8192):
        named = {"M_BUCKET": bucket, "w_ptr": w, "dy_ptr": torch.empty(0, dtype=compile_check._DTYPES[dtype])}
        for c in configs.prune_dx(configs.dx_configs(interpret=False, capability=(arch // 10, arch % 10)), named,
                                  R_PAD=rp, HAS_DROPOUT=drop, K_ALIGNED=aligned, NUM_SEGMENTS=segments,
                                  MASKED_SEGMENTS=2 if drop else 0, W_FORMAT=wf,
                                  SMEM_LIMIT=configs.SMEM_LIMIT_BY_ARCH[arch]):
            out[repr(c)] = c
    return list(out.values())

def compile_dx(job):
    arch, dtype, segments, drop, aligned, rp, wf, index = job
    cfg = selectable(arch, dtype, segments, drop, aligned, rp, wf)[index]
    fn = bwd._lora_bwd_dx_kernel.fn
    consts = dict(HAS_DROPOUT=drop, K_ALIGNED=aligned, R_PAD=rp, DOT_PRECISION="ieee", W_FORMAT=wf,
                  QBLOCK=64 if wf else 1, NUM_SEGMENTS=segments, MASKED_SEGMENTS=2 if drop else 0, **cfg.kwargs)
    if not wf:
        consts.update(absmax_ptr=None, code_ptr=None)
    consts.update({n: 1 for n in fn.arg_names if n in compile_check._UNIT_STRIDES})
    if not segments:
        consts.update(seg_ptr=None, seg_scale_ptr=None)  # as a launch without tables specialises them
    if not drop:
        consts.update(seed_ptr=None)
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("seed_ptr",):
            sig[n] = "*i64"
        elif n == "seg_ptr":
            sig[n] = "*i32"
        elif n in ("seg_scale_ptr", "g_ptr", "absmax_ptr", "code_ptr"):
            sig[n] = "*fp32"
        elif n == "w_ptr" and wf:
            sig[n] = "*u8"
        elif n.endswith("_ptr"):
            sig[n] = "*" + dtype
        elif n in ("scaling", "inv_keep"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in compile_check._NOT_DIVISIBLE}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    regs, spills = compile_check.ptxas_usage(k.asm["ptx"], arch)
    groups = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_K"] // 8 / (32 * cfg.num_warps)
    return dict(arch=arch, dtype=dtype, segments=segments, drop=drop, aligned=aligned, rp=rp, wf=wf,
                config=f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", regs=regs, spills=spills,
                shared=k.metadata.shared, mulhi=compile_check.philox_mulhi(k.asm["ptx"]), groups=groups)

if __name__ == "__main__":
    import os
    from concurrent.futures import ProcessPoolExecutor
    cases = [(arch, dtype, 3, drop, aligned, rp, wf) for arch in (80, 86, 90) for dtype in ("bf16", "fp16")
             for drop, aligned, rp in ((True, True, 16), (True, False, 16), (True, True, 64), (True, True, 256),
                                       (False, True, 16), (False, True, 256))
             for wf in (0, 1)]
    jobs = [case + (i,) for case in cases for i in range(len(selectable(*case)))]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        json.dump(list(pool.map(compile_dx, jobs, chunksize=4)), sys.stdout)
"""


def _compile_rows():
    proc = run_compiled(["-c", _COMPILE_SCRIPT], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    return json.loads(proc.stdout)


def test_segment_epilogue_compiles_without_spills():
    """The dX kernel with a 3-adapter segment table (2 dropping), compiled for sm80, sm86 and sm90
    (bf16, fp16; with dropout aligned/unaligned K and R_PAD 16/64/256, without dropout at R_PAD
    16/256; dense and 4-bit W₀) in every config the pruner keeps over the M buckets (the pinned
    one and the autotuned survivors, decode and large M): ptxas reports no spill stores, shared
    memory within the arch's limit, and the masked segments are a loop (one Philox generator in
    the code, not one per segment: mul.hi within the single-mask bound of compile_check)."""
    rows = _compile_rows()
    lines = [(f"sm{row['arch']} {row['dtype']} T=3 drop={row['drop']} aligned={row['aligned']} R_PAD={row['rp']} "
              f"W_FORMAT={row['wf']} "
              f"[{row['config']}]: regs {row['regs']} smem {row['shared']} spills {row['spills']} "
              f"mul.hi {row['mulhi']} (mask groups/thread {row['groups']:g})") for row in rows]
    print("\n".join(lines))
    for row, line in zip(rows, lines):
        # the documented limits (configs.SEGMENTS_SPILL_TILES, stacked.py): with dropout at R_PAD
        # 256 every tile spills; a 4-bit W₀ at R_PAD >= 64 keeps the 32x32x64 tile (8 bytes on
        # sm90) where it is the only survivor. The lines show them; every other row must not spill.
        only_survivor = row["wf"] and row["rp"] >= 64 and "'BLOCK_M': 32, 'BLOCK_N': 32, 'BLOCK_K': 64" in row["config"]
        assert row["spills"] == 0 or (row["drop"] and row["rp"] >= 256) or (only_survivor and row["spills"] <= 8), line
        assert 0 < row["regs"] <= 255, line
        assert row["shared"] <= {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}[row["arch"]], line
        if row["drop"] and row["aligned"]:  # one segment's Philox in the code (a loop, not T unrolled copies)
            assert row["mulhi"] <= 1.25 * 20 * max(1.0, row["groups"]), line
