# SPDX-License-Identifier: Apache-2.0
"""The triton backend's host-side choices (pure Python, no GPU, no interpreter) and its static
report: configs within each arch's shared memory, the TF32 switch in every state of torch's two
APIs, partial buffers bounded by the grid, pinned deterministic configs. The report compiles
kernels for sm80/sm86/sm90 with Triton's own ptxas (issue 9)."""

from __future__ import annotations

import os
import types

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from lora_kernels.backends.triton import bwd as triton_bwd  # noqa: E402
from lora_kernels.backends.triton import configs  # noqa: E402
from helpers import run_compiled  # noqa: E402

ARCHS = {80: (8, 0), 86: (8, 6), 90: (9, 0)}
R_PADS = [16, 32, 64, 128, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _meta(dtype):
    return torch.empty(0, dtype=dtype)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_selectable_config_fits_the_arch(arch, dtype):
    """For every R_PAD up to 256, M bucket and switch, the pruners return only configs whose
    shared memory (the model that `compile_check --report` proves against the compiled kernels)
    fits the arch's per-block limit — never an unchecked fallback."""
    cap, limit, elem = ARCHS[arch], configs.SMEM_LIMIT_BY_ARCH[arch], dtype.itemsize
    gemm = configs.gemm_configs(interpret=False, capability=cap)
    dxc = configs.dx_configs(interpret=False, capability=cap)
    xac = configs.xa_configs(interpret=False)
    w = _meta(dtype)
    for rp in R_PADS:
        for bucket in (1, 16, 64, 256, 8192, 16384):
            named = {"M_BUCKET": bucket, "w_ptr": w, "x_ptr": w}
            for fused in ((True, False) if rp <= configs.F1_MAX_R_PAD else (False,)):
                for drop in (True, False):
                    for c in configs.prune_fwd(gemm, named, R_PAD=rp, FUSE_XA=fused, HAS_DROPOUT=drop,
                                               SMEM_LIMIT=limit):
                        kw = c.kwargs
                        assert configs.smem_fwd(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, elem, rp,
                                                fused) <= limit
            for drop in (True, False):
                kept = configs.prune_dx(dxc, named, R_PAD=rp, HAS_DROPOUT=drop, SMEM_LIMIT=limit)
                assert configs.pinned_dx_config(dxc, named, R_PAD=rp, HAS_DROPOUT=drop, SMEM_LIMIT=limit) is kept[0]
                for c in kept:
                    kw = c.kwargs
                    assert configs.smem_dx(kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"], c.num_stages, elem, rp) <= limit
            for c in configs.prune_stream(xac, named, R_PAD=rp, SMEM_LIMIT=limit):
                assert configs.smem_xa(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, rp) <= limit
            c = configs.gdb_config(bucket, elem, rp, limit, interpret=False)
            assert configs.smem_gdb(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, elem, rp) <= limit
            c = configs.da_config(bucket, elem, rp, limit, interpret=False)
            assert configs.smem_da(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, rp) <= limit


def test_no_config_is_a_clear_error():
    w = _meta(torch.float32)
    with pytest.raises(ValueError, match=r"rank r \(padded to 256\)"):
        configs.prune_dx(configs.dx_configs(interpret=False, capability=(8, 6)), {"M_BUCKET": 16, "w_ptr": w},
                         R_PAD=256, HAS_DROPOUT=True, SMEM_LIMIT=16 * 1024)
    with pytest.raises(ValueError, match="F1 supports r <= 64"):
        configs.resolve_schedule("F1", 8, r_pad=128)
    assert configs.resolve_schedule("auto", 8, r_pad=128) == "F2"


def test_smem_limit_is_read_from_the_device(monkeypatch):
    """On a GPU the per-block limit is the device's opt-in figure (99 KiB on sm86/sm89/sm120,
    where the old fixed 160 KiB let 128x128 pipelines through to an OutOfResources launch)."""
    props = types.SimpleNamespace(shared_memory_per_block_optin=99 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(configs, "_DEVICE_SMEM", {})
    dev = torch.device("cuda", 0)
    assert configs.device_smem_limit(dev) == 99 * 1024
    w = types.SimpleNamespace(device=dev, element_size=lambda: 2)
    gemm = configs.gemm_configs(interpret=False, capability=(8, 0))
    for c in configs.prune_fwd(gemm, {"M_BUCKET": 8192, "w_ptr": w}, R_PAD=16, FUSE_XA=False):
        kw = c.kwargs
        assert configs.smem_fwd(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, 2, 16, False) <= 99 * 1024
    assert configs.smem_limit((8, 6)) == configs.smem_limit((8, 9)) == configs.smem_limit((12, 0)) == 99 * 1024
    assert configs.smem_limit((8, 0)) == 163 * 1024 and configs.smem_limit((9, 0)) == 227 * 1024


@pytest.fixture
def restore_tf32():
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield matmul
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


def test_tf32_switch_in_every_api_state(restore_tf32):
    """The old `allow_tf32` flag and the new `fp32_precision` (global or per backend), alone and
    mixed: reading the legacy flag raises in mixed states, dot_precision must not."""
    matmul = restore_tf32
    states = [
        (lambda: setattr(matmul, "allow_tf32", False), "ieee"),
        (lambda: setattr(matmul, "allow_tf32", True), "tf32"),
        (lambda: setattr(matmul, "fp32_precision", "tf32"), "tf32"),
        (lambda: (setattr(matmul, "allow_tf32", True), setattr(matmul, "fp32_precision", "ieee")), "ieee"),
        (lambda: (setattr(matmul, "fp32_precision", "none"), setattr(torch.backends, "fp32_precision", "tf32")),
         "tf32"),
        (lambda: (setattr(torch.backends, "fp32_precision", "ieee"), setattr(matmul, "fp32_precision", "tf32")),
         "tf32"),
        (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
        (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    ]
    for set_state, want in states:
        torch.backends.fp32_precision = "none"
        matmul.fp32_precision = "none"
        set_state()
        assert configs.dot_precision(torch.float32) == want
        assert configs.dot_precision(torch.bfloat16) == "ieee"


def test_precision_is_an_autotune_key():
    from lora_kernels.backends.triton import fwd

    for kernel in (fwd._lora_fwd_kernel, fwd._lora_fwd_xa_kernel, triton_bwd._lora_bwd_dx_kernel):
        assert "DOT_PRECISION" in kernel.keys, kernel


@pytest.mark.parametrize("r", [16, 64])
def test_partial_buffers_bounded_by_the_grid(r):
    """One MLP backward at M = 65536, N = 14336: the dB/dA partials were cdiv(M, 64)·N·r fp32
    (896 MiB at r = 16, 3.5 GiB at r = 64); now each is within PARTIAL_BYTES (64 MiB), and the g
    partials are at most GDB_MAX_N_CHUNKS copies of the fp32 g itself."""
    m, n, k = 65536, 14336, 4096
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    w = torch.empty(n, k, dtype=torch.bfloat16, device="meta")
    for det in (True, False):
        plan = triton_bwd.plan_backward(m, n, k, r, x, w, True, True, det, smem_limit=227 * 1024)
        sizes = plan.partial_bytes(m, n, k, r)
        assert sizes["dB"] <= configs.PARTIAL_BYTES and sizes["dA"] <= configs.PARTIAL_BYTES, sizes
        assert sizes["g"] <= configs.GDB_MAX_N_CHUNKS * m * r * 4, sizes
        assert plan.gdb_rows * plan.g_chunks >= 132  # the dY pass still has work for every SM of an H100
    # decode: the N chunks fill the GPU although there is one row block
    plan = triton_bwd.plan_backward(16, n, k, r, x[:16], w, True, True, True, smem_limit=227 * 1024)
    assert plan.gdb_rows == 1 and plan.g_chunks == configs.GDB_MAX_N_CHUNKS


def test_deterministic_plan_is_a_pure_function():
    """Same shapes -> same configs and partial layout, whatever an autotuner has seen before."""
    x = torch.empty(5000, 4096, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    plans = [triton_bwd.plan_backward(5000, 4096, 4096, 16, x, w, True, True, True, smem_limit=227 * 1024)
             for _ in range(2)]
    assert plans[0].__dict__ == plans[1].__dict__


def _compile_check(*args, timeout=900):
    """lora_kernels.backends.triton.compile_check in a fresh interpreter without TRITON_INTERPRET."""
    return run_compiled(["-m", "lora_kernels.backends.triton.compile_check", *args], timeout)


def test_static_report_quick():
    """The CI subset of the static report: sm80 + sm90, bf16, R_PAD 16 and 256, the heaviest
    variant of each kernel at its largest and smallest selectable config, and the 4-bit W forward
    (F2) and dX GEMMs (dropout); every check holds (no spills, smem within model and limit, the
    4-bit W dequantized inside the main loop)."""
    proc = _compile_check("--report", "--quick", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\nok   sm") >= 20 and "FAIL" not in proc.stdout, proc.stdout
    for arch in (80, 90):  # the 4-bit forward and dX GEMMs are among the checked rows, on both archs
        for variant in ("F2 4bit", "dropout=True aligned=True 4bit"):
            assert f" {variant} " in "".join(line for line in proc.stdout.splitlines(True)
                                             if line.startswith(f"ok   sm{arch} ")), (arch, variant)


@pytest.mark.slow
def test_static_report_full(request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("every kernel x config x dtype x R_PAD for sm80/86/90 (hours on 2 cores); run with -m slow")
    proc = _compile_check("--report", "--jobs", str(os.cpu_count() or 1), timeout=None)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]


def _per_thread(c, rows, cols):
    return c.kwargs[rows] * c.kwargs[cols] // (32 * c.num_warps)


@pytest.mark.parametrize("arch", ARCHS)
def test_spilling_shapes_are_not_selected(arch):
    """The shapes ptxas spilled at R_PAD <= 64 in the static report of a036631 stay out of
    selection (the report proves the survivors spill-free; this pins the rules on the host):
    fp32 GEMMs <= 16 accumulators a thread and K steps of 32, fp32 streams small tiles; the dY
    pass on 8 warps for 128-column tiles at R_PAD 64; 16-bit dA tiles <= 64 x 64; the dX dropout
    epilogue <= 32 accumulators a thread when K % 8 != 0 or R_PAD 64; F1 <= 64 accumulators a
    thread, its mask groups counting each row's spill group when K % 8 != 0."""
    cap, limit = ARCHS[arch], configs.SMEM_LIMIT_BY_ARCH[arch]
    gemm = configs.gemm_configs(interpret=False, capability=cap)
    dxc = configs.dx_configs(interpret=False, capability=cap)
    xac = configs.xa_configs(interpret=False)
    for dtype in DTYPES:
        w, elem = _meta(dtype), dtype.itemsize
        for rp in (16, 32, 64):
            for bucket in (16, 8192):
                named = {"M_BUCKET": bucket, "w_ptr": w, "x_ptr": w}
                for aligned in (True, False):
                    for drop in (True, False):
                        flags = dict(R_PAD=rp, HAS_DROPOUT=drop, K_ALIGNED=aligned, SMEM_LIMIT=limit)
                        f1 = configs.prune_fwd(gemm, named, FUSE_XA=True, **flags)
                        f2 = configs.prune_fwd(gemm, named, FUSE_XA=False, **flags)
                        dx = configs.prune_dx(dxc, named, **flags)
                        if elem == 4:
                            for c in f1 + f2:
                                assert _per_thread(c, "BLOCK_M", "BLOCK_N") <= 16 and c.kwargs["BLOCK_K"] <= 32, c
                            for c in dx:
                                assert _per_thread(c, "BLOCK_M", "BLOCK_K") <= 16 and c.kwargs["BLOCK_N"] <= 32, c
                            continue
                        for c in f1:
                            assert _per_thread(c, "BLOCK_M", "BLOCK_N") <= 64, c
                            if drop:
                                groups = c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_K"] // 8 + (not aligned))
                                cap = configs.F1_MASK_GROUPS_PER_THREAD if aligned else 2
                                assert groups <= cap * 32 * c.num_warps or (len(f1) == 1 and c is f1[-1]), c
                        if drop and (not aligned or rp >= 64):
                            assert all(_per_thread(c, "BLOCK_M", "BLOCK_K") <= 32 for c in dx), dx
                xa = configs.prune_stream(xac, named, R_PAD=rp, SMEM_LIMIT=limit)
                gdb = configs.gdb_config(bucket, elem, rp, limit, interpret=False)
                da = configs.da_config(bucket, elem, rp, limit, interpret=False)
                if elem == 4:
                    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 32 * 64 for c in xa), xa
                    assert gdb.kwargs["BLOCK_M"] * gdb.kwargs["BLOCK_N"] <= (32 * 64 if rp <= 16 else 16 * 32), gdb
                    assert da.kwargs["BLOCK_M"] * da.kwargs["BLOCK_K"] <= 16 * 64, da
                else:
                    assert rp < 64 or gdb.kwargs["BLOCK_N"] < 128 or gdb.num_warps == 8, gdb
                    assert da.kwargs["BLOCK_M"] * da.kwargs["BLOCK_K"] <= 64 * 64, da


@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_splitk_fills_a_wave(arch, elem):
    """M = 16, K = N = 4096 on 132 SMs: the unsplit F2 GEMM had cdiv(16, BM)·cdiv(4096, BN) programs
    (32 at BN = 128), a quarter wave; the split-K plan launches >= 132, each split keeps >= 4 K steps,
    the fp32 workspace stays small, and M > 64 never splits."""
    limit = configs.SMEM_LIMIT_BY_ARCH[arch]
    m, n, k = 16, 4096, 4096
    cfg, split, k_per_split = configs.splitk_plan(m, n, k, 132, elem, 16, limit, interpret=False)
    kw = cfg.kwargs
    programs = triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]) * split
    assert programs >= 132, (kw, split)
    assert k_per_split % kw["BLOCK_K"] == 0 and k_per_split >= configs.SPLITK_MIN_K_STEPS * kw["BLOCK_K"]
    assert (split - 1) * k_per_split < k <= split * k_per_split  # no empty split
    assert split * m * n * 4 <= 4 * 2**20
    assert configs.splitk_plan(65, n, k, 132, elem, 16, limit, interpret=False) is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_configs_are_the_checked_rows(arch, dtype):
    """A 4-bit W (W_FORMAT 1) selects only the rows whose compiled kernels the static report found
    spill-free (`configs._W4_*`), within the arch's shared memory by the 4-bit model, at every
    R_PAD, M bucket and switch; the split-K plan too."""
    cap, limit, elem = ARCHS[arch], configs.SMEM_LIMIT_BY_ARCH[arch], dtype.itemsize
    gemm = configs.gemm_configs(interpret=False, capability=cap)
    dxc = configs.dx_configs(interpret=False, capability=cap)
    rows = configs._W4_FP32 if elem == 4 else configs._W4_SM80 + configs._W4_SM90 + configs._W4_SMALL
    u8, w = torch.empty(0, dtype=torch.uint8), _meta(dtype)
    for rp in R_PADS:
        for bucket in (16, 8192):
            flags = dict(R_PAD=rp, SMEM_LIMIT=limit, W_FORMAT=1)
            for drop in (True, False):
                for fused in ((True, False) if rp <= configs.F1_MAX_R_PAD else (False,)):
                    for c in configs.prune_fwd(gemm, {"M_BUCKET": bucket, "w_ptr": u8, "x_ptr": w}, FUSE_XA=fused,
                                               HAS_DROPOUT=drop, **flags):
                        kw = c.kwargs
                        assert configs._tiles(c, "BLOCK_N", "BLOCK_K") in rows, c
                        assert configs.smem_fwd(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, elem, rp,
                                                fused, 1) <= limit
                for c in configs.prune_dx(dxc, {"M_BUCKET": bucket, "w_ptr": u8, "dy_ptr": w}, HAS_DROPOUT=drop,
                                          **flags):
                    kw = c.kwargs
                    assert configs._tiles(c, "BLOCK_K", "BLOCK_N") in rows, c
                    assert configs.smem_dx(kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"], c.num_stages, elem, rp,
                                           1) <= limit
        plan = configs.splitk_plan(16, 4096, 4096, 132, elem, rp, limit, interpret=False, w_format=1)
        assert plan is None or configs._tiles(plan[0], "BLOCK_N", "BLOCK_K") in rows, plan


def test_4bit_main_loop_dequantizes_in_ptx():
    """Compiled evidence that the 4-bit forward and dX GEMMs dequantize inside their main loops
    (sm80 forward, sm90 dX, bf16): the innermost PTX loop with the MMAs issues the packed-byte
    loads and the 4-byte code/scale gathers and stores nothing to global memory, and the whole
    kernel has exactly the global stores of its dense twin (the output tile only: no dequantized
    W is written anywhere); the dense twin's loop has no byte load (the check can fail)."""
    proc = _compile_check("--dequant-evidence")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok   sm") == 2, proc.stdout
