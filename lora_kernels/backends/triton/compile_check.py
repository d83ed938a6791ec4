# SPDX-License-Identifier: Apache-2.0
"""Compile the backend's kernels for NVIDIA GPUs without one (Triton -> PTX -> cubin, nothing is
run) and check what the compiled code says: the static report of issue 9.

    python -m lora_kernels.backends.triton.compile_check --report [--quick | --extremes] [--arch 80,86,90]
        [--dtype bf16,fp16,fp32] [--r-pad 16,32,64,128,256] [--jobs 2] [--json out.json]

For every kernel variant (each switch that changes code) x every config the pruning can select
for that arch (incl. the small-tile fallback) x dtype x R_PAD, it prints one row: shared memory
of the compiled kernel (`metadata.shared`) against the pruner's model and the arch's per-block
limit, registers and spill bytes (ptxas -v), SASS instructions in the innermost loop holding the
MMAs (per K step), and Philox `mul.hi.u32` per thread against one generation per element per pass.
It exits non-zero when a check fails:
  smem      compiled <= arch limit, and compiled <= the model the pruner used (so the pruner's
            "fits" is true on the GPU) — for every selectable config, fallbacks included;
  spill     no spill stores in any kernel for R_PAD <= 64;
  philox    mul.hi per thread <= 1.25 x 20 x (8-element groups of the pass per thread), for K % 8 == 0
            (aligned=True). The K % 8 != 0 variants are printed, not checked: each row's extra
            spill group is recomputed by every thread of the row (known, see the README);
  dequant   4-bit W variants ("4bit", W_FORMAT 1, blocksize 64): the innermost PTX loop holding
            the MMAs also holds the packed-byte loads and 4-byte table/scale gathers, and no
            global store (the W tile is dequantized in the main loop, never written out).
--dequant-evidence: compile a 4-bit forward and dX GEMM and their dense twins, compare the PTX.
--quick: the CI subset (sm80 + sm90, bf16, R_PAD 16 and 256, heaviest variants; the 4-bit W
forward (F2) and dX GEMMs at R_PAD 16). Without
--report, compiles the quick subset and prints one line per kernel (the old smoke test).
Arguments are specialised the way a launch on contiguous, 16-byte aligned tensors is (unit
strides constexpr 1, other ints and pointers divisible by 16). Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_kernels.backends.triton import bwd, configs, fwd

_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_xar", "stride_yn", "stride_dyn",
                 "stride_gr", "stride_dxk", "stride_dak", "stride_dbr", "stride_gpr"}
_NOT_DIVISIBLE = {"R", "scaling", "inv_keep", "threshold", "M_BUCKET", "ROW_CAP", "ROW_PROGRAMS", "CHUNK_N"}
_FP32_BUFFERS = {"db_ptr", "da_ptr", "g_ptr", "gp_ptr", "ws_ptr", "absmax_ptr", "code_ptr"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHILOX_MULHI_PER_CALL = 20  # Philox4x32-10: two 32x32->hi multiplies per round
PHILOX_SLACK = 1.25
# Every 32x32 -> high-half multiply counts (ptxas keeps the Philox constants in registers, so the
# operands do not identify them; the kernels have no other mul.hi.u32, so this over-counts at worst).
_MULHI = re.compile(r"\bmul\.hi\.u32\b")


def _fn(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def compile_kernel(kernel, constexprs: dict, config, arch: int, dtype: str = "bf16"):
    """Compile one kernel (JITFunction or Autotuner) with `constexprs` and `config` for sm`arch`."""
    fn = _fn(kernel)
    consts = dict(constexprs, **config.kwargs)
    # Parameters left out take their defaults, as in a launch that omits them: constexprs their
    # value, None-default pointers (the dX kernel's several-adapter tables) a constexpr None.
    for param in fn.params:
        if param.name not in consts and param.has_default and (param.is_constexpr or param.default is None):
            consts[param.name] = param.default
    consts.update({name: 1 for name in fn.arg_names if name in _UNIT_STRIDES})
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_BUFFERS else f"*{dtype}"
            if name == "w_ptr" and consts.get("W_FORMAT"):
                signature[name] = "*u8"
        elif name in ("scaling", "inv_keep"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and name not in _NOT_DIVISIBLE}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill store bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={sm}", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_MMA = re.compile(r"\b(HMMA|HGMMA|IMMA|FFMA|DMMA)")


def sass_loop_instructions(cubin: bytes) -> int:
    """SASS instructions in the innermost loop (backward branch) that contains MMA/FMA work: the
    main loop, one K step (0 when there is none)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    instrs = [(int(a, 16), text) for a, text in _SASS_LINE.findall(out)]
    best = 0
    for addr, text in instrs:
        hit = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)`|0x([0-9a-f]+))", text)
        if not hit or not hit.group(1):
            continue
        target = int(hit.group(1), 16)
        if target >= addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr]
        if any(_MMA.search(t) for t in body) and (best == 0 or len(body) < best):
            best = len(body)
    return best


_PTX_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_PTX_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_PTX_MMA = re.compile(r"\b(mma\.sync|wgmma\.mma_async|fma\.rn\.f32)\b")
_PTX_BYTE_LOAD = re.compile(r"\bld\.global(?:\.\w+)*\.[bu]8\b")
_PTX_WORD_GATHER = re.compile(r"\bld\.global(?:\.\w+)*\.[bfu]32\b|\bcp\.async\.\w+\.shared\.global\b[^;]*\],\s*0x4\b")
_PTX_GLOBAL_STORE = re.compile(r"\b(st\.global|red\.global|atom\.global)")


def main_loop_ptx(ptx: str) -> list:
    """Lines of the innermost PTX loop (label ... backward branch to it) holding MMA/FMA work."""
    lines = ptx.splitlines()
    labels = {}
    best = []
    for i, line in enumerate(lines):
        hit = _PTX_LABEL.match(line.strip())
        if hit:
            labels[hit.group(1)] = i
        bra = _PTX_BRA.search(line)
        if bra and bra.group(1) in labels:
            body = lines[labels[bra.group(1)]:i + 1]
            if any(_PTX_MMA.search(t) for t in body) and (not best or len(body) < len(best)):
                best = body
    return best


def dequant_in_main_loop(ptx: str) -> dict:
    """What the main loop of a 4-bit W kernel issues: byte loads, 4-byte gathers, global stores."""
    body = main_loop_ptx(ptx)
    return {"loop_lines": len(body), "byte_loads": sum(bool(_PTX_BYTE_LOAD.search(t)) for t in body),
            "word_gathers": sum(bool(_PTX_WORD_GATHER.search(t)) for t in body),
            "global_stores": sum(bool(_PTX_GLOBAL_STORE.search(t)) for t in body)}


def global_stores(ptx: str) -> int:
    """Global store/reduction instructions in the whole kernel."""
    return len(_PTX_GLOBAL_STORE.findall(ptx))


def philox_mulhi(ptx: str) -> int:
    """Philox multiplies (mul.hi.u32 by its two constants) in the kernel's PTX."""
    return len(_MULHI.findall(ptx))


# --- what can be selected ------------------------------------------------------------------------
M_BUCKETS = (16, 8192)  # decode and large-M pruning paths
SPLITK_M = (1, 32, 64)  # every decode row of the split-K tiles


def _meta(dtype):
    return torch.empty(0, dtype=_DTYPES[dtype])


def _unique(cfgs):
    seen, out = set(), []
    for c in cfgs:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def variants(arch: int, dtype: str, r_pad: int, limit: int, quick: bool = False, extremes: bool = False):
    """(kernel name, variant, constexprs, config, smem model of it) to compile."""
    cap = (arch // 10, arch % 10)
    elem = _DTYPES[dtype].itemsize
    w = _meta(dtype)
    prec = "ieee"
    gemm = configs.gemm_configs(interpret=False, capability=cap)
    dxc = configs.dx_configs(interpret=False, capability=cap)

    def named(b, wf, compute):  # a 4-bit W is uint8: the compute dtype comes from x / dY
        return {"M_BUCKET": b, "w_ptr": torch.empty(0, dtype=torch.uint8) if wf else w, compute: w}

    def fwd_sel(fused, drop, aligned=True, wf=0):
        return _unique([c for b in M_BUCKETS for c in configs.prune_fwd(
            gemm, named(b, wf, "x_ptr"), R_PAD=r_pad, FUSE_XA=fused, HAS_DROPOUT=drop, K_ALIGNED=aligned,
            SMEM_LIMIT=limit, W_FORMAT=wf)])

    def fwd_model(fused, wf=0):
        return lambda c: configs.smem_fwd(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                          c.num_stages, elem, r_pad, fused, wf)

    def dx_sel(drop, aligned, wf=0):  # every autotune survivor; the pinned (deterministic) config is the first
        return _unique([c for b in M_BUCKETS for c in configs.prune_dx(
            dxc, named(b, wf, "dy_ptr"), R_PAD=r_pad, HAS_DROPOUT=drop, K_ALIGNED=aligned, SMEM_LIMIT=limit,
            W_FORMAT=wf)])

    def dx_model(wf=0):
        return lambda c: configs.smem_dx(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"],
                                         c.num_stages, elem, r_pad, wf)

    out = []
    # W_FORMAT 0 (dense W) and 1 (4-bit, `nf4.W_4BIT`, at bitsandbytes' default blocksize 64).
    # --quick checks the 4-bit GEMMs at R_PAD <= 64 only (spills are checked there; the full report
    # covers every R_PAD).
    formats = ((0, ""), (1, " 4bit")) if not quick or r_pad <= configs.F1_MAX_R_PAD else ((0, ""),)
    for wf, tag in formats:
        w_flags = dict(W_FORMAT=wf, QBLOCK=64 if wf else 1)
        if r_pad <= configs.F1_MAX_R_PAD:
            for drop, aligned in ((True, True), (True, False), (False, True)):
                if quick and (wf or not (drop and not aligned)):
                    continue
                consts = dict(HAS_BIAS=True, HAS_DROPOUT=drop, FUSE_XA=True, K_ALIGNED=aligned, R_PAD=r_pad,
                              DOT_PRECISION=prec, SPLIT_MODE=0, **w_flags)
                out.append(("fwd", f"F1 dropout={drop} aligned={aligned}{tag}", fwd._lora_fwd_kernel, consts,
                            fwd_sel(True, drop, aligned, wf), fwd_model(True, wf)))
        f2 = dict(HAS_BIAS=True, HAS_DROPOUT=False, FUSE_XA=False, K_ALIGNED=True, R_PAD=r_pad, DOT_PRECISION=prec,
                  **w_flags)
        out.append(("fwd", f"F2{tag}", fwd._lora_fwd_kernel, dict(f2, SPLIT_MODE=0), fwd_sel(False, False, True, wf),
                    fwd_model(False, wf)))
        # Decode split-K (fixed tiles by M, `configs.splitk_config`).
        splitk_sel = _unique([c for m in SPLITK_M
                              if (c := configs.splitk_config(m, elem, r_pad, limit, interpret=False, w_format=wf))])
        for mode, label in ((1, "ordered"), (2, "atomic"))[:1 if quick else 2]:
            if splitk_sel and not (quick and wf):
                out.append(("fwd", f"F2 split-K {label}{tag}", fwd._lora_fwd_kernel, dict(f2, SPLIT_MODE=mode),
                            splitk_sel, fwd_model(False, wf)))
    out.append(("red", "split-K", fwd._splitk_reduce_kernel, {},
                [triton.Config({"BLOCK": configs.SPLITK_REDUCE_BLOCK}, num_warps=4, num_stages=3)],
                lambda c: configs.SMEM_SLACK))
    xa_sel = _unique([c for b in M_BUCKETS for c in configs.prune_stream(
        configs.xa_configs(interpret=False), {"M_BUCKET": b, "x_ptr": w}, R_PAD=r_pad, SMEM_LIMIT=limit)])
    for drop in ((True,) if quick else (True, False)):
        out.append(("xa", f"dropout={drop}", fwd._lora_fwd_xa_kernel,
                    dict(HAS_DROPOUT=drop, K_ALIGNED=True, R_PAD=r_pad, DOT_PRECISION=prec), xa_sel,
                    lambda c: configs.smem_xa(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, r_pad)))
    gdb_sel = _unique([configs.gdb_config(m, elem, r_pad, limit, interpret=False) for m in M_BUCKETS])
    for det in ((True,) if quick else (True, False)):
        out.append(("gdb", f"deterministic={det}", bwd._lora_bwd_gdb_kernel,
                    dict(R_PAD=r_pad, DETERMINISTIC=det, DOT_PRECISION=prec), gdb_sel,
                    lambda c: configs.smem_gdb(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, elem, r_pad)))
    da_sel = _unique([configs.da_config(m, elem, r_pad, limit, interpret=False) for m in M_BUCKETS])
    da_variants = [(True, True, True), (True, False, False), (False, True, True)]
    for drop, det, aligned in (da_variants[:1] if quick else da_variants):
        out.append(("da", f"dropout={drop} deterministic={det} aligned={aligned}", bwd._lora_bwd_da_kernel,
                    dict(HAS_DROPOUT=drop, DETERMINISTIC=det, K_ALIGNED=aligned, R_PAD=r_pad, DOT_PRECISION=prec),
                    da_sel,
                    lambda c: configs.smem_da(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, r_pad)))
    dx_variants = [(True, True), (True, False), (False, True)]
    for wf, tag in formats:
        for drop, aligned in (dx_variants[:1] if quick else dx_variants):
            consts = dict(HAS_DROPOUT=drop, K_ALIGNED=aligned, R_PAD=r_pad, DOT_PRECISION=prec, W_FORMAT=wf,
                          QBLOCK=64 if wf else 1)
            out.append(("dx", f"dropout={drop} aligned={aligned}{tag}", bwd._lora_bwd_dx_kernel, consts,
                        dx_sel(drop, aligned, wf), dx_model(wf)))
    for name, variant, _kernel, consts, cfgs, model in out:
        if not consts.get("HAS_DROPOUT", True):
            consts["seed_ptr"] = None
        if consts.get("W_FORMAT") == 0:
            consts.update(absmax_ptr=None, code_ptr=None)
        if quick or extremes:  # the largest selectable tile and the smallest (the fallback)
            cfgs = _unique([max(cfgs, key=model), min(cfgs, key=model)])
        for c in cfgs:
            yield name, variant, consts, c, model(c)


def _groups_per_thread(name, consts, c):
    """8-element groups one pass generates per thread (a K step for F1/xa, a tile for dX/dA)."""
    kw = c.kwargs
    cols = kw["BLOCK_K"]
    groups = kw["BLOCK_M"] * cols // 8
    if not consts.get("K_ALIGNED", True):
        groups += kw["BLOCK_M"]  # the spill group of each row
    threads = 32 * c.num_warps
    return max(1, -(-groups // threads))


_KERNELS = {"fwd": fwd._lora_fwd_kernel, "xa": fwd._lora_fwd_xa_kernel, "gdb": bwd._lora_bwd_gdb_kernel,
            "da": bwd._lora_bwd_da_kernel, "dx": bwd._lora_bwd_dx_kernel, "red": fwd._splitk_reduce_kernel}


def _row(job):
    arch, dtype, r_pad, limit, name, variant, consts, (kwargs, warps, stages), model = job
    c = triton.Config(kwargs, num_warps=warps, num_stages=stages)
    kernel = _KERNELS[name]
    row = {"arch": arch, "dtype": dtype, "r_pad": r_pad, "kernel": name, "variant": variant,
           "config": dict(c.kwargs), "warps": c.num_warps, "stages": c.num_stages, "smem_model": model,
           "smem_limit": limit}
    try:
        k = compile_kernel(kernel, consts, c, arch, dtype)
    except Exception as exc:  # a config that does not lower is a failure of the report
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return row
    ptx = k.asm["ptx"]
    row["smem"] = k.metadata.shared
    row["regs"], row["spill"] = ptxas_usage(ptx, arch)
    row["sass_per_kstep"] = sass_loop_instructions(k.asm["cubin"])
    mulhi = philox_mulhi(ptx)
    row["philox_mulhi"] = mulhi
    if consts.get("W_FORMAT"):
        row["dequant"] = dequant_in_main_loop(ptx)
    if consts.get("HAS_DROPOUT"):
        row["philox_ratio"] = round(mulhi / (PHILOX_MULHI_PER_CALL * _groups_per_thread(name, consts, c)), 3)
    return row


def violations(row) -> list:
    """The checks of the report that `row` fails."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    bad = []
    if row["smem"] > row["smem_limit"]:
        bad.append(f"smem {row['smem']} > sm{row['arch']} limit {row['smem_limit']}")
    if row["smem"] > row["smem_model"]:
        bad.append(f"smem {row['smem']} > pruner's model {row['smem_model']}")
    if row["r_pad"] <= 64 and row["spill"] != 0:
        bad.append(f"{row['spill']} bytes spilled at R_PAD {row['r_pad']}")
    if row.get("philox_ratio", 0) > PHILOX_SLACK and "aligned=False" not in row["variant"]:
        bad.append(f"Philox x{row['philox_ratio']} of one generation per element per pass")
    deq = row.get("dequant")
    if deq is not None and not (deq["byte_loads"] and deq["word_gathers"] and not deq["global_stores"]):
        bad.append(f"4-bit W not dequantized inside the main loop: {deq}")
    return bad


def _fmt(row) -> str:
    kw = row["config"]
    tiles = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    cfg = f"{tiles}/w{row['warps']}s{row['stages']}"
    if "error" in row:
        return f"sm{row['arch']} {row['dtype']:4} R{row['r_pad']:<3} {row['kernel']:3} {row['variant']:44} {cfg:18} ERROR"
    ratio = row.get("philox_ratio")
    return (f"sm{row['arch']} {row['dtype']:4} R{row['r_pad']:<3} {row['kernel']:3} {row['variant']:44} {cfg:18} "
            f"smem {row['smem']:6}/{row['smem_model']:6}/{row['smem_limit']:6} regs {row['regs']:3} "
            f"spill {row['spill']:5} sass/kstep {row['sass_per_kstep']:4} mul.hi {row['philox_mulhi']:4}"
            + (f" x{ratio:.2f}" if ratio is not None else "")
            + (" loop: u8 loads {byte_loads} 4B gathers {word_gathers} st.global {global_stores}".format(**row["dequant"])
               if "dequant" in row else ""))


def report(archs, dtypes, r_pads, quick=False, jobs=1, out=sys.stdout, extremes=False, only=None) -> list:
    """Compile every case (whose variant contains `only`, when given), print the table, return the
    rows (each with its 'violations')."""
    job_list = []
    for arch in archs:
        limit = configs.SMEM_LIMIT_BY_ARCH[arch]
        for dtype in dtypes:
            for rp in r_pads:
                for name, variant, consts, c, model in variants(arch, dtype, rp, limit, quick, extremes):
                    if only and only not in variant:
                        continue
                    job_list.append((arch, dtype, rp, limit, name, variant, consts,
                                     (dict(c.kwargs), c.num_warps, c.num_stages), model))
    print(f"# {len(job_list)} kernels to compile; smem columns: compiled/model/limit (bytes)", file=out, flush=True)
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_row, job_list))
    else:
        rows = [_row(j) for j in job_list]
    for row in rows:
        row["violations"] = violations(row)
        print(("FAIL " if row["violations"] else "ok   ") + _fmt(row)
              + ("  <- " + "; ".join(row["violations"]) if row["violations"] else ""), file=out, flush=True)
    return rows


def summary(rows) -> list:
    """Per (arch, kernel, variant): worst smem share of the limit, max regs/spill, SASS per K step
    range, worst Philox ratio."""
    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["arch"], r["kernel"], r["variant"]), []).append(r)
    lines = []
    for (arch, kernel, variant), rs in sorted(groups.items()):
        smem = max(r["smem"] / r["smem_limit"] for r in rs)
        sass = sorted(r["sass_per_kstep"] for r in rs)
        ratio = max((r.get("philox_ratio", 0) for r in rs), default=0)
        low_r = [r["spill"] for r in rs if r["r_pad"] <= 64]
        lines.append(f"sm{arch} {kernel:3} {variant:44} configs {len(rs):3} max smem {smem:5.0%} of limit "
                     f"max regs {max(r['regs'] for r in rs):3} spill(R<=64) {max(low_r, default=0):5} "
                     f"sass/kstep {sass[0]}-{sass[-1]} philox x{ratio:.2f}")
    return lines


def dequant_evidence(out=sys.stdout) -> int:
    """Compile the 4-bit forward (F2, sm80 row) and dX GEMM (dropout, sm90 row) and their dense
    twins (bf16, R_PAD 16); print what each main loop issues. Returns the number of failed checks:
    the 4-bit loop must issue byte loads and 4-byte gathers and no global store, the 4-bit kernel
    exactly the global stores of its dense twin (its output tile: no dequantized W written out),
    and the dense twin's loop no byte load."""
    cases = [
        ("fwd F2", 80, fwd._lora_fwd_kernel, configs._config(*configs._W4_SM80[0]),
         dict(HAS_BIAS=True, HAS_DROPOUT=False, FUSE_XA=False, K_ALIGNED=True, R_PAD=16, DOT_PRECISION="ieee",
              SPLIT_MODE=0, seed_ptr=None)),
        ("dx dropout", 90, bwd._lora_bwd_dx_kernel, configs._dx_config(*configs._W4_SM90[0]),
         dict(HAS_DROPOUT=True, K_ALIGNED=True, R_PAD=16, DOT_PRECISION="ieee")),
    ]
    failures = 0
    for label, arch, kernel, cfg, consts in cases:
        four = compile_kernel(kernel, dict(consts, W_FORMAT=1, QBLOCK=64), cfg, arch).asm["ptx"]
        dense = compile_kernel(kernel, dict(consts, W_FORMAT=0, QBLOCK=1, absmax_ptr=None, code_ptr=None), cfg,
                               arch).asm["ptx"]
        loop, dense_loop = dequant_in_main_loop(four), dequant_in_main_loop(dense)
        stores = (global_stores(four), global_stores(dense))
        ok = (loop["byte_loads"] > 0 and loop["word_gathers"] > 0 and loop["global_stores"] == 0
              and stores[0] == stores[1] and dense_loop["byte_loads"] == 0)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} sm{arch} {label:10} 4bit loop {loop} | dense loop {dense_loop} | "
              f"global stores 4bit/dense {stores[0]}/{stores[1]}", file=out, flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="the static report (table + checks)")
    parser.add_argument("--quick", action="store_true", help="the CI subset")
    parser.add_argument("--extremes", action="store_true",
                        help="every variant, but only the largest and smallest selectable config of each")
    parser.add_argument("--arch", default=None, help="comma-separated SM versions (default 80,86,90; quick 80,90)")
    parser.add_argument("--dtype", default=None, help="comma-separated (default bf16,fp16,fp32; quick bf16)")
    parser.add_argument("--r-pad", default=None, help="comma-separated R_PAD (default 16..256; quick 16,256)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiles")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--only", default=None, help="only the variants whose name contains this (e.g. 4bit)")
    parser.add_argument("--dequant-evidence", action="store_true",
                        help="only the PTX check that 4-bit W tiles are dequantized inside the main loops")
    args = parser.parse_args(argv)
    if configs.INTERPRET:
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    if args.dequant_evidence:
        return 1 if dequant_evidence() else 0
    quick = args.quick or not args.report
    archs = [int(a) for a in (args.arch or ("80,90" if quick else "80,86,90")).split(",")]
    dtypes = (args.dtype or ("bf16" if quick else "bf16,fp16,fp32")).split(",")
    r_pads = [int(r) for r in (args.r_pad or ("16,256" if quick else "16,32,64,128,256")).split(",")]
    rows = report(archs, dtypes, r_pads, quick=quick, jobs=args.jobs, extremes=args.extremes, only=args.only)
    print("\n# summary per kernel variant")
    for line in summary(rows):
        print(line)
    failed = [r for r in rows if r["violations"]]
    print(f"\n# {len(rows)} compiled, {len(failed)} failing a check")
    if args.json:
        meta = {"triton": triton.__version__, "torch": torch.__version__, "archs": archs, "dtypes": dtypes,
                "r_pads": r_pads, "quick": quick, "extremes": args.extremes}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
