# SPDX-License-Identifier: Apache-2.0
"""The benchmark CLI: `python -m bench` (or `make bench`).

Per shape, rank and dropout rate, times forward and forward+backward of the frozen base linear,
PEFT's lora.Linear and lora_linear on every usable backend, interleaved in one run (call order
shuffled each round); prints a table of ratios vs the base layer and vs PEFT (median and
quartiles of the per-round ratios) and the saved-activation bytes; writes JSON after every row
and, with --plot, a PNG of the ratios (`python -m bench.plot <json>` redraws it).

Sets (--set): cpu (default on a CPU: ~2 min on 2 cores), cpu-full (--full: the README's table,
~30 min), gpu (default on a GPU: Llama-8B-sized layers and decode, r = 16/64, bf16), quick, dora
(PEFT's DoRA layer vs dora_linear, with each provider's peak allocation over one fwd+bwd), qlora
(PEFT's 4-bit QLoRA layer: base = the frozen NF4 layer, peft, patched; plus the peak memory of
one fwd+bwd, `peak_fwd_bwd_bytes` and `peak_extra_bytes` in the JSON), and the many-adapter sets of
bench/multi.py: multi (3 adapters active at once, each with dropout, training), mixed (a mixed batch
of 8 adapters and base rows, PEFT's adapter_names, eval forward) and decode (64 tokens over 32 adapters).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import re

import torch

import lora_kernels
from bench import multi, qlora
from bench.cases import SETS, BenchSet, Case, parse_shape, providers
from bench.harness import device_name, peak_allocated_bytes, saved_activation_bytes, time_interleaved, versions
from bench.progress import Progress
from bench.report import below_one_warnings, peak_line, peak_note, ratio_stats, summarize_times, table_header, table_row

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REFERENCE_SETS = ("cpu-full", "gpu")
PROVIDERS = {
    "lora": providers,
    "dora": functools.partial(providers, variant="dora"),
    "qlora": qlora.providers,
    "multi": multi.training_providers,
    "mixed": multi.serving_providers,
}  # BenchSet.kind -> its providers  # their JSON keeps the plain <device>-<type>-<dtype>.json name


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("--set", choices=SETS, default=None, help="default: cpu on a CPU, gpu on a GPU")
    ap.add_argument("--full", action="store_true", help="the long set: cpu-full on a CPU, gpu on a GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: the set's (fp32 cpu, bf16 gpu)")
    ap.add_argument("--shapes", nargs="+", default=None, help="MxKxN shapes instead of the set's")
    ap.add_argument("--rank", type=int, nargs="+", default=None, help="ranks instead of the set's")
    ap.add_argument("--dropout", type=float, nargs="+", default=None, help="dropout rates instead of the set's")
    ap.add_argument("--backends", nargs="+", default=None, help="default: every usable backend but reference")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per row instead of the set's")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(BENCH_DIR, "out"),
                    help="where the JSON (and PNG) go (default: bench/out/, not committed; "
                    "bench/results/ holds committed runs)")
    ap.add_argument("--out", default=None, help="the JSON path itself (overrides --out-dir)")
    ap.add_argument("--plot", action="store_true", help="also write a PNG of the ratios next to the JSON")
    return ap.parse_args(argv)


def choose_set(args, device: torch.device) -> BenchSet:
    """The set the arguments ask for, with any per-option overrides applied."""
    name = args.set or ("gpu" if device.type == "cuda" else ("cpu-full" if args.full else "cpu"))
    if args.full and args.set is None and device.type == "cuda":
        name = "gpu"
    chosen = SETS[name]
    overrides = {}
    if args.shapes:
        overrides["shapes"] = tuple(parse_shape(s) for s in args.shapes)
        overrides["name"] = "custom"
    if args.rank:
        overrides["ranks"] = tuple(args.rank)
    if args.dropout:
        overrides["dropouts"] = tuple(args.dropout)
    if args.reps:
        overrides["reps"] = overrides["small_reps"] = args.reps
    if args.dtype:
        overrides["dtype"] = args.dtype
    return dataclasses.replace(chosen, **overrides)


def _file_stem(name: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor': a file name without shell-hostile characters."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")


def output_path(args, bench_set: BenchSet, device: torch.device, dtype: torch.dtype) -> str:
    """<out-dir>/<device>-<type>-<dtype>[-<set>].json, e.g. nvidia-h100-80gb-hbm3-cuda-bfloat16.json."""
    if args.out:
        return args.out
    suffix = "" if bench_set.name in REFERENCE_SETS else f"-{bench_set.name}"
    name = f"{_file_stem(device_name(device))}-{device.type}-{str(dtype)[6:]}{suffix}.json"
    return os.path.join(args.out_dir, name)


def write_json(path: str, result: dict) -> None:
    """Atomically (a reader or an interrupted run never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    bench_set = choose_set(args, device)
    dtype = DTYPES[bench_set.dtype]
    backends = args.backends or [b for b in lora_kernels.available_backends(device) if b != "reference"]
    cases = [
        Case(m, k, n, r, p, dtype, device, bench_set.adapters, bench_set.seq_len, bench_set.base_rows)
        for (m, k, n) in bench_set.shapes
        for r in bench_set.ranks
        for p in bench_set.dropouts
    ]
    threads = f" cpu x{torch.get_num_threads()} threads" if device.type == "cpu" else ""
    meta = {
        "device": device_name(device) + threads, "dtype": str(dtype), "set": bench_set.name,
        "ranks": list(bench_set.ranks), "reps": bench_set.reps, "small_reps": bench_set.small_reps,
        "backends": backends,
        "order": "interleaved, shuffled each round (seed 0); ratios per round, then median and quartiles",
        "timer": "CUDA events, L2 flushed before each call" if device.type == "cuda" else "perf_counter",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), **versions("triton", "peft"),
    }
    out = output_path(args, bench_set, device, dtype)
    print(f"# set {bench_set.name}: {bench_set.about}")
    print(f"# {meta['device']} | {dtype} | torch {meta['torch']} | commit {meta['commit']} | backends: "
          f"{', '.join(backends)} | {len(cases)} cases x {len(bench_set.modes)} passes -> {out}", flush=True)

    result = {"meta": meta, "rows": []}
    progress = Progress(sum(len(bench_set.modes) * bench_set.reps_for(c.m) for c in cases))
    header_printed = False
    for case in cases:
        reps = bench_set.reps_for(case.m)
        progress.set_label(f"{case.name} set-up")
        provs = PROVIDERS[bench_set.kind](case, backends, with_peft=not args.no_peft)
        if not provs:
            print(f"# {case.name}: skipped, the {bench_set.kind} providers need packages not installed here")
            continue
        saved = {name: saved_activation_bytes(pv.forward, pv.params, pv.shared_input) for name, pv in provs.items()}
        peaks = None
        if bench_set.kind == "qlora":
            peaks = {name: qlora.peak_memory(pv) for name, pv in provs.items()}
        elif bench_set.kind == "dora" and device.type == "cpu":
            peaks = {name: peak_allocated_bytes(pv.forward_backward) for name, pv in provs.items()}
        for mode in bench_set.modes:
            progress.set_label(f"{case.name} {mode}")
            fns = {name: (pv.forward if mode == "fwd" else pv.forward_backward) for name, pv in provs.items()}
            samples = time_interleaved(fns, device, reps, on_round=progress.advance)
            row = {
                "case": case.name, "adapters": case.adapters, "m": case.m, "k": case.k, "n": case.n, "r": case.r, "p": case.p, "mode": mode,
                "reps": reps, "times": summarize_times(samples),
                "ratios": {"vs_base": ratio_stats(samples, "base"), "vs_peft": ratio_stats(samples, "peft", skip=("base",))},
                "saved_bytes": saved,
            }
            if peaks is not None:
                if bench_set.kind == "qlora":
                    row["peak_fwd_bwd_bytes"] = {name: peak["peak"] for name, peak in peaks.items()}
                    row["peak_extra_bytes"] = {name: peak["extra"] for name, peak in peaks.items()}
                    row["dequantized_weight_bytes"] = qlora.dequantized_bytes(case)
                else:
                    row["peak_fwd_bwd_bytes"] = peaks
            result["rows"].append(row)
            write_json(out, result)
            if not header_printed:
                progress.note(table_header(list(row["times"])))
                header_printed = True
            progress.note(table_row(row))
            if peaks is not None and mode == "fwd+bwd":
                progress.note(peak_line(peaks, row["dequantized_weight_bytes"]) if bench_set.kind == "qlora"
                              else peak_note(row["case"], peaks, case.n * case.k * case.dtype.itemsize))
        del provs, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    for line in below_one_warnings(result["rows"]):
        print(line)
    print(f"# wrote {out}")
    if args.plot:
        from bench.plot import plot

        print(f"# wrote {plot(out)}")
    return result


if __name__ == "__main__":
    main()
