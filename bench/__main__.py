"""The benchmark CLI: `python -m bench` (or `make bench`).

Per shape and dropout rate, times forward and forward+backward of the frozen base linear,
PEFT's lora.Linear and lora_linear on every usable backend, interleaved in one run; prints a
table of medians and ratios and the saved-activation bytes; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from typing import List

import torch

import lora_kernels
from bench.cases import SHAPES, Case, parse_shape, providers
from bench.harness import device_name, saved_activation_bytes, time_interleaved, versions

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIB = 2**20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="MxKxN shapes or a preset (cpu, gpu, quick); default: the device's preset")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--backends", nargs="+", default=None, help="default: every usable backend but reference")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 30 cpu, 50 cuda)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<dtype>.json)")
    return ap.parse_args(argv)


def _shapes(args, device) -> List[tuple]:
    names = args.shapes or (["gpu"] if device.type == "cuda" else ["cpu"])
    out = []
    for name in names:
        out += SHAPES[name] if name in SHAPES else [parse_shape(name)]
    return out


def _file_stem(name: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor': a file name without shell-hostile characters."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    backends = args.backends or [b for b in lora_kernels.available_backends(device) if b != "reference"]
    reps = args.reps or (50 if device.type == "cuda" else 30)
    threads = f" cpu x{torch.get_num_threads()} threads" if device.type == "cpu" else ""
    meta = {"device": device_name(device) + threads, "dtype": str(dtype), "rank": args.rank, "reps": reps,
            "order": "interleaved, shuffled each round (seed 0)",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **versions("triton", "peft")}
    print(f"# {meta['device']} | {dtype} | r={args.rank} | torch {meta['torch']} | commit {meta['commit']}")
    print(f"# backends: {', '.join(backends)} | medians of {reps} interleaved calls (order shuffled each round); "
          "ratios from the same run")
    rows = []
    for m, k, n in _shapes(args, device):
        for p in args.dropout:
            case = Case(m, k, n, args.rank, p, dtype, device)
            provs = providers(case, backends, with_peft=not args.no_peft)
            saved = {name: saved_activation_bytes(pv.forward, pv.params, pv.shared_input) for name, pv in provs.items()}
            for mode in ("fwd", "fwd+bwd"):
                fns = {name: (pv.forward if mode == "fwd" else pv.forward_backward) for name, pv in provs.items()}
                times = time_interleaved(fns, device, reps)
                rows.append({"case": case.name, "m": m, "k": k, "n": n, "p": p, "mode": mode, "times": times,
                             "saved_bytes": saved})
                _print_row(rows[-1], backends)
            del provs
    result = {"meta": meta, "rows": rows}
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"{_file_stem(meta['device'].split(' cpu x')[0])}-{device.type}-{str(dtype)[6:]}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"# wrote {out}")
    return result


def _print_row(row, backends) -> None:
    t = {name: v["median_ms"] for name, v in row["times"].items()}
    base = t["base"]
    parts = [f"{row['case']:<28} {row['mode']:<8} base {base:8.2f} ms"]
    if "peft" in t:
        parts.append(f"peft {t['peft']:8.2f} ms ({t['peft'] / base:5.3f}x)")
    for b in backends:
        f = t[f"fused:{b}"]
        ratio = f"{f / base:5.3f}x base" + (f", peft/fused {t['peft'] / f:5.2f}x" if "peft" in t else "")
        parts.append(f"{b} {f:8.2f} ms ({ratio})")
    if row["mode"] == "fwd":
        s = row["saved_bytes"]
        mem = " ".join(f"{name}={v['beyond_input'] / MIB:.2f}" for name, v in s.items())
        parts.append(f"saved beyond x, MiB: {mem}")
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
