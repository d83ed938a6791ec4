# SPDX-License-Identifier: Apache-2.0
"""One timer and one saved-activation meter for every provider, so ratios are side by side; and
the device and version facts a results file records."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

import lora_kernels
from lora_kernels.memory import SavedActivationMeter


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (the architecture if unreadable)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def versions(*packages: str) -> dict:
    """Versions of torch, python, lora_kernels and `packages` (None if not installed), and the
    git commit of this checkout (None outside one): what a results file records."""
    out = {"torch": torch.__version__, "python": platform.python_version(), "lora_kernels": lora_kernels.__version__}
    for name in packages:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = None
    return out


class _L2Flush:
    """On a GPU, overwrite a buffer larger than L2 before each timed call (outside the timed span),
    as triton.testing.do_bench does: otherwise a decode-sized layer's weights stay in L2 between
    calls and every provider looks faster than in a model, where other layers evict them."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def _time_once(fn: Callable[[], object], device: torch.device, flush: _L2Flush) -> float:
    """Milliseconds for one call: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    reps: int,
    warmup: int = 2,
    seed: int = 0,
    on_round: Optional[Callable[[], None]] = None,
) -> Dict[str, List[float]]:
    """Milliseconds per call, per name, one sample per round (sample i of every name comes from
    round i, so per-round ratios compare calls made moments apart). Every round calls each name
    once, in an order shuffled per round (seeded): drift (thermal, other load) hits every provider
    alike, and no provider always runs right after the same one (whose dirty cache lines and freed
    memory the next call inherits: on the CPU that alone moved a ratio by ~1%). `on_round` is
    called after each round (progress)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    flush = _L2Flush(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            samples[name].append(_time_once(fns[name], device, flush))
        if on_round is not None:
            on_round()
    return samples


def saved_activation_bytes(forward: Callable[[], torch.Tensor], params, shared_input) -> dict:
    """Bytes autograd saves for backward in one forward, by unique storage, parameters excluded:
    `total` and `beyond_input` (without the layer input x, which the caller holds anyway)."""
    with SavedActivationMeter(exclude=params) as meter:
        y = forward()
    del y
    return {"total": meter.bytes, "beyond_input": meter.bytes_excluding(shared_input)}


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The peak, over one call of `fn`, of the bytes torch allocated during it and had not yet
    freed (tensors alive before the call excluded), from torch.profiler's memory timeline (the
    data behind `export_memory_timeline`: every allocation and free of torch's allocator, inside
    ops too; buffers a BLAS or bitsandbytes allocates itself are not seen)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak
