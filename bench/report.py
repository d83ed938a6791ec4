# SPDX-License-Identifier: Apache-2.0
"""From per-round samples to what a reader needs: medians, ratios with their spread over rounds, a
fixed-width table and warnings for ratios that can only be noise."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional

MIB = 2**20


def quartiles(xs: List[float]) -> Dict[str, float]:
    """median, p25, p75 (and p20, p80 for older readers) of a sample."""
    if len(xs) == 1:
        return {"median": xs[0], "p25": xs[0], "p75": xs[0], "p20": xs[0], "p80": xs[0]}
    q4 = statistics.quantiles(xs, n=4)
    q5 = statistics.quantiles(xs, n=5)
    return {"median": statistics.median(xs), "p25": q4[0], "p75": q4[2], "p20": q5[0], "p80": q5[3]}


def summarize_times(samples: Dict[str, List[float]]) -> Dict[str, dict]:
    """name -> {median_ms, p20_ms, p80_ms, p25_ms, p75_ms, samples_ms}."""
    out = {}
    for name, xs in samples.items():
        q = quartiles(xs)
        out[name] = {f"{k}_ms": v for k, v in q.items()} | {"samples_ms": [round(x, 5) for x in xs]}
    return out


def ratio_stats(samples: Dict[str, List[float]], against: str, skip=()) -> Dict[str, dict]:
    """name -> quartiles of the per-round ratio samples[name][i] / samples[against][i], for every
    name but `against` and `skip` (empty if `against` was not timed)."""
    if against not in samples:
        return {}
    den = samples[against]
    return {
        name: quartiles([a / b for a, b in zip(xs, den)])
        for name, xs in samples.items()
        if name != against and name not in skip
    }


def fused_names(row: dict) -> List[str]:
    return [name for name in row["times"] if name.startswith("fused:")]


def row_ratio(row: dict, name: str, against: str = "base") -> Optional[dict]:
    """Quartiles of name ÷ against for a results row; rows written before per-round samples were
    kept (the committed bench/results file) give the ratio of medians, with no spread."""
    stats = row.get("ratios", {}).get(f"vs_{against}", {}).get(name)
    if stats is not None:
        return stats
    times = row["times"]
    if name not in times or against not in times:
        return None
    r = times[name]["median_ms"] / times[against]["median_ms"]
    return {"median": r, "p25": r, "p75": r}


def peft_over(row: dict, name: str) -> Optional[dict]:
    """PEFT ÷ `name` (the speed-up over PEFT) from the per-round `name` ÷ PEFT ratios: the
    quartiles of 1/x are 1/(the quartiles of x), swapped."""
    stats = row_ratio(row, name, against="peft")
    if stats is None:
        return None
    return {"median": 1 / stats["median"], "p25": 1 / stats["p75"], "p75": 1 / stats["p25"]}


def _fmt_ratio(stats: Optional[dict]) -> str:
    if stats is None:
        return "-"
    flag = "!" if stats["median"] < 1.0 else " "
    return f"{stats['median']:.3f}{flag}({stats['p25']:.2f}-{stats['p75']:.2f})"


RATIO_WIDTH = 18


def table_header(row_names: List[str]) -> str:
    """The table's header for providers `row_names` (as in results rows: base, peft, fused:...)."""
    cols = [f"{'shape MxKxN':<17}", f"{'r':>3}", f"{'p':>4}", f"{'pass':<7}", f"{'base ms':>9}"]
    fused = [n for n in row_names if n.startswith("fused:")]
    if "peft" in row_names:
        cols.append(f"{'peft/base':<{RATIO_WIDTH}}")
    for name in fused:
        cols.append(f"{name[6:] + '/base':<{RATIO_WIDTH}}")
    if "peft" in row_names:
        cols += [f"{'peft/' + name[6:]:<{RATIO_WIDTH}}" for name in fused]
    saved_names = [n.replace("fused:", "") for n in row_names if n != "base"]
    cols.append(f"saved beyond x, MiB ({' / '.join(saved_names)})")
    lines = [
        "ratios: median (p25-p75) of the per-round ratios; '!' marks a ratio below 1.0 (noise: see the warnings)",
        " ".join(cols),
    ]
    return "\n".join(lines)


def table_row(row: dict) -> str:
    """One fixed-width line for a results row."""
    names = list(row["times"])
    fused = fused_names(row)
    shape = f"{row['m']}x{row['k']}x{row['n']}"
    cols = [
        f"{shape:<17}",
        f"{row['r']:>3}",
        f"{row['p']:>4}",
        f"{row['mode']:<7}",
        f"{row['times']['base']['median_ms']:>9.3f}",
    ]
    if "peft" in names:
        cols.append(f"{_fmt_ratio(row_ratio(row, 'peft')):<{RATIO_WIDTH}}")
    for name in fused:
        cols.append(f"{_fmt_ratio(row_ratio(row, name)):<{RATIO_WIDTH}}")
    if "peft" in names:
        for name in fused:
            cols.append(f"{_fmt_ratio(peft_over(row, name)):<{RATIO_WIDTH}}".replace("!", " "))
    saved = row.get("saved_bytes", {})
    cols.append(" / ".join(f"{saved[n]['beyond_input'] / MIB:.2f}" for n in names if n in saved and n != "base"))
    return " ".join(cols)


def below_one_warnings(rows: List[dict]) -> List[str]:
    """Lines for the provider ratios vs base whose median is below 1.0: every provider does the
    base layer's work and more, so such a ratio is noise (other load, clock changes), not a
    speed-up. Empty when there are none."""
    found = []
    for row in rows:
        for name in list(row["times"]):
            stats = row_ratio(row, name) if name != "base" else None
            if stats is not None and stats["median"] < 1.0:
                found.append(f"  {name} / base = {stats['median']:.3f}x  {row['case']} {row['mode']}")
    if not found:
        return []
    return [
        f"warning: {len(found)} ratio(s) vs base below 1.0 (marked '!'). A LoRA layer does the base layer's "
        "work and more, so these are noise (other load on the machine, clock changes): rerun on a quiet "
        "machine or with more --reps before reading anything into them."
    ] + found


def peak_note(case: str, peaks: Dict[str, int], weight_bytes: int) -> str:
    """One line: each provider's peak allocation over one forward+backward, next to the size of
    an N x K temporary (the weight), which PEFT's DoRA builds every forward."""
    shown = " / ".join(f"{name.replace('fused:', '')} {peak / MIB:.1f}" for name, peak in peaks.items())
    return f"  {case} peak MiB allocated during one fwd+bwd: {shown} (an N x K temporary: {weight_bytes / MIB:.1f})"


def peak_line(peaks: dict, dequantized_bytes: int) -> str:
    """The peak-memory line of a QLoRA row: per provider, the peak of one fwd+bwd beyond its
    outputs (y and grad_x), against 1/8 of the dequantized base weight."""
    shown = " / ".join(f"{name} {p['extra'] / MIB:.2f}" for name, p in peaks.items())
    return (f"  peak extra MiB (fwd+bwd peak - y - grad_x; torch.profiler memory timeline): {shown}; "
            f"1/8 of the dequantized weight = {dequantized_bytes / 8 / MIB:.2f}")
