# SPDX-License-Identifier: Apache-2.0
"""Plot a results JSON: `python -m bench.plot <json> [-o out.png]`.

One panel per pass (fwd, fwd+bwd); for every case (shape, r, p) a bar per provider giving its time
÷ the frozen base layer's (median of the per-round ratios, whiskers p25-p75); the line at 1.0 is
the base layer itself. Reads every results file the bench has written, including the older ones
without per-round ratios (bench/results/intel-xeon-processor-cpu-float32.json: ratio of medians,
no whiskers).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

from bench.report import row_ratio

COLORS = {"peft": "tab:grey", "fused:cpu": "tab:blue", "fused:triton": "tab:orange", "fused:cuda": "tab:green",
          "fused:reference": "tab:purple"}


def _case_label(row: dict) -> str:
    r = row.get("r")
    if r is None:  # older files: r only in the case name and meta
        r = int(row["case"].split("-r")[1].split("-")[0])
    return f"{row['m']}x{row['k']}x{row['n']}\nr={r} p={row['p']}"


def plot(json_path: str, out: Optional[str] = None) -> str:
    """Write the PNG (default: next to the JSON) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        result = json.load(f)
    rows = result["rows"]
    meta = result["meta"]
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    names: List[str] = []
    for row in rows:
        names += [n for n in row["times"] if n != "base" and n not in names]
    labels = list(dict.fromkeys(_case_label(r) for r in rows))
    width = 0.8 / max(1, len(names))

    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.1 * len(labels) * max(1, len(names)) * 0.45 + 2), 3.8 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mode_rows = {_case_label(r): r for r in rows if r["mode"] == mode}
        for i, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, label in enumerate(labels):
                stats = row_ratio(mode_rows[label], name) if label in mode_rows else None
                if stats is None:
                    continue
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(stats["median"])
                lo.append(stats["median"] - stats["p25"])
                hi.append(stats["p75"] - stats["median"])
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name.replace("fused:", "fused "),
                          color=COLORS.get(name))
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("time ÷ base layer")
        ax.set_title(f"{mode}: ratio to the frozen base layer (lower is better; 1.0 = the base layer alone)")
        top = max([b.get_height() for b in ax.patches] + [1.0])
        ax.set_ylim(0.9, top * 1.12)
        ax.legend(fontsize=8, ncol=len(names))
    fig.suptitle(f"{meta['device']} | {meta['dtype']} | torch {meta.get('torch')} | commit {meta.get('commit')}",
                 fontsize=10)
    fig.tight_layout()
    out = out or os.path.splitext(json_path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a results file written by python -m bench")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: the JSON's path with .png)")
    args = ap.parse_args(argv)
    print(plot(args.json, args.out))


if __name__ == "__main__":
    main()
