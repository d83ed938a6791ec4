# SPDX-License-Identifier: Apache-2.0
"""Regressions of issue 9 in the cuda backend (csrc/cuda), checked through the CPU emulation and the
launch plans: g = dY·B kept in fp32 (fp16 loss-scaled gradients), the dropout NaN contract, the
dynamic shared-memory attribute only ever raised, one-wave plans, PTX in the built module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
from test_cuda_backend import emu  # noqa: F401  (the emulated-backend fixture)

from lora_kernels import _extension
from lora_kernels import dropout as dropout_rule
from lora_kernels.backends import reference as reference_backend
from helpers import flat_forward, make_inputs, oracle


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp16_loss_scaled_gradients_do_not_overflow_g(emu, p):
    # dY scaled like a loss-scaled fp16 backward: g = dY·B exceeds fp16's 65504, while dX, dA, dB fit.
    # Rounding g to fp16 (the old kernels) made dX and dA inf.
    M, K, N, r, s = 64, 40, 300, 16, 0.02
    x, w, b, A, B = make_inputs((M,), K, N, r, torch.float16, requires_grad=False)
    w = (w.double() * 0.01).half()
    grad_y = (torch.randn(M, N, dtype=torch.float64) * 8192).half()
    g = grad_y.double() @ B.double()
    assert g.abs().max() > 65504, "the case must overflow g in fp16 to test anything"
    seed = torch.tensor([3]) if p > 0 else None
    y, xa = emu.fused_forward(x, w, b, A, B, s, p, seed)
    gx, gA, gB = emu.fused_backward(grad_y, x, w, A, B, xa, s, p, seed, True)
    _, (gx_ref, gA_ref, gB_ref) = oracle(x, w, b, A, B, s, p, seed, grad_y)
    for name, got, want in (("grad_x", gx, gx_ref), ("grad_A", gA, gA_ref), ("grad_B", gB, gB_ref)):
        assert torch.isfinite(got).all(), f"{name} has inf/NaN"
        assert _rel_err(got, want) < 2e-3, f"{name}: relative error {_rel_err(got, want)}"


def test_unfused_dx_prefill_keeps_g_fp32(emu):
    # r = 80 > 64: the dX prefill runs in lora_expand.cu (rank chunks), with the same overflow case.
    M, K, N, r, s = 40, 48, 256, 80, 0.01
    x, w, b, A, B = make_inputs((M,), K, N, r, torch.float16, requires_grad=False)
    w, B = (w.double() * 0.01).half(), (B.double() * 3).half()
    grad_y = (torch.randn(M, N, dtype=torch.float64) * 8192).half()
    assert (grad_y.double() @ B.double()).abs().max() > 65504
    y, xa = emu.fused_forward(x, w, b, A, B, s, 0.1, torch.tensor([4]))
    gx, gA, _ = emu.fused_backward(grad_y, x, w, A, B, xa, s, 0.1, torch.tensor([4]), True)
    _, (gx_ref, gA_ref, _) = oracle(x, w, b, A, B, s, 0.1, torch.tensor([4]), grad_y)
    assert torch.isfinite(gx).all() and _rel_err(gx, gx_ref) < 2e-3
    assert torch.isfinite(gA).all() and _rel_err(gA, gA_ref) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dropped_nan_propagates(emu, dtype):
    # x·mask·scale as torch: a NaN in a dropped element of x makes its row of xa and dA's column NaN.
    M, K, N, r, p, seed = 9, 24, 16, 4, 0.5, 11
    x, w, b, A, B = make_inputs((M,), K, N, r, dtype, requires_grad=False)
    keep = dropout_rule.dropout_keep_mask(seed, M, K, p)
    m, k = (int(i) for i in (~keep).nonzero()[0])
    x[m, k] = float("nan")
    seed_t = torch.tensor([seed])
    y, xa = emu.fused_forward(x, w, b, A, B, 0.5, p, seed_t)
    _, xa_ref = flat_forward(reference_backend, x.double(), w.double(), None, A.double(), B.double(), 0.5, p, seed_t)
    assert torch.equal(xa.isnan(), xa_ref.isnan()) and xa[m].isnan().all()
    gy = torch.randn(M, N).to(dtype)
    _, gA, _ = emu.fused_backward(gy, x, w, A, B, xa.nan_to_num(), 0.5, p, seed_t, True)
    assert gA[:, k].isnan().all() and not gA[:, [c for c in range(K) if c != k]].isnan().any()


def _attributes(emu):
    flat = emu.smem_attributes()
    return dict(zip(flat[::2], flat[1::2]))


def test_smem_attribute_is_only_raised(emu, monkeypatch):
    # Another thread's (or a graph capture's) smaller launch must not lower the attribute under a
    # launch that needs more: after a wide x pass, a narrow one leaves every attribute as it was.
    monkeypatch.setenv("LORA_KERNELS_CUDA_DY_PASS", "fused")
    def run(K):
        x, w, b, A, B = make_inputs((130,), K, 64, 32, torch.float16, requires_grad=False)
        y, xa = emu.fused_forward(x, w, b, A, B, 1.0, 0.1, torch.tensor([1]))
        emu.fused_backward(torch.randn(130, 64).half(), x, w, A, B, xa, 1.0, 0.1, torch.tensor([1]), True)
    run(1024)
    wide = _attributes(emu)
    assert wide and max(wide.values()) > 48 * 1024, "the case must need the opt-in"
    run(64)  # the x pass of r = 32: ~90 KiB of shared memory at K = 1024, ~63 KiB at K = 64
    narrow = _attributes(emu)
    assert all(narrow[k] >= v for k, v in wide.items()), f"lowered: {wide} -> {narrow}"


# (num_sms, smem per SM, opt-in per block) of the GPUs the plans are checked on.
H100 = (132, 228 * 1024, 227 * 1024)
A100 = (108, 164 * 1024, 163 * 1024)


@pytest.mark.parametrize("gpu", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("M,K,N", [(8192, 4096, 4096), (8192, 14336, 4096), (64, 4096, 4096)])
def test_plans_fill_at_most_one_wave(emu, gpu, r, M, K, N):
    # A split-K A-projection of 320 blocks for 264 slots (H100, M = 8192) ran in two waves.
    plan = emu.plan_on_device(M, K, N, r, torch.bfloat16, *gpu)
    for i, name in enumerate(["project", "dy pass", "x pass"]):
        grid, smem, per_sm, _ = plan[4 * i : 4 * i + 4]
        assert smem <= gpu[2], f"{name}: {smem} bytes of shared memory"
        if name == "project":
            assert grid <= gpu[0] * per_sm or grid == (M + 127) // 128, f"{name}: {grid} blocks for {gpu[0] * per_sm} slots"
        else:  # span grids: at most one wave, unless the column spans alone exceed it
            assert grid <= gpu[0] * per_sm, f"{name}: {grid} blocks for {gpu[0] * per_sm} slots"


def _find_cuobjdump():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for cand in [os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]:
        if cand and os.path.exists(cand):
            return cand
    try:  # triton ships one
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return cand if os.path.exists(cand) else None
    except ImportError:
        return None


@pytest.mark.skipif(
    _extension.load_error() is not None or not _extension.has_kernel("cuda"),
    reason="lora_kernels._C is not built with the CUDA kernels (LORA_KERNELS_CUDA=1)",
)
@pytest.mark.skipif(_find_cuobjdump() is None, reason="cuobjdump not found (CUDA toolkit or triton)")
def test_built_module_embeds_ptx_for_the_newest_arch():
    # SASS only (sm_80..sm_90) cannot run on a newer GPU (Blackwell): PTX of the newest arch is
    # JIT-compiled there. setup.py's default TORCH_CUDA_ARCH_LIST ends in "+PTX".
    import lora_kernels._C as ext

    tool = _find_cuobjdump()
    ptx = subprocess.run([tool, "--list-ptx", ext.__file__], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "--list-elf", ext.__file__], capture_output=True, text=True).stdout
    ptx_archs = [int(a) for a in re.findall(r"sm_(\d+)", ptx)]
    sass_archs = [int(a) for a in re.findall(r"sm_(\d+)", sass)]
    assert sass_archs, f"no SASS in {ext.__file__}"
    assert ptx_archs and max(ptx_archs) >= max(sass_archs), (
        f"{ext.__file__} embeds PTX for {sorted(set(ptx_archs))}, SASS for {sorted(set(sass_archs))}: build with "
        "a TORCH_CUDA_ARCH_LIST whose newest entry ends in +PTX (setup.py's default does)"
    )
