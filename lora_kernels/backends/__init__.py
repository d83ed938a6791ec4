# SPDX-License-Identifier: Apache-2.0
"""The backend table: every backend implements the same `forward` / `backward` (see
`lora_kernels.reference` for their contract), so dispatch is a lookup, not a chain of ifs."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from lora_kernels import _extension


def _always(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return None


def _compiled_reason(device_type: str) -> Callable[..., Optional[str]]:
    def reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        if device.type != device_type:
            return f"it runs on {device_type} tensors, got {device.type}"
        if _extension.load_error() is not None:
            return _extension.load_error()
        if not _extension.has_kernel(device_type):
            return f"lora_kernels._C was built without {device_type} kernels"
        return None

    return reason


# The Triton kernels accumulate in fp32 and use tensor-core dots: fp64 is left to the others.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"the triton backend supports float16, bfloat16 and float32, got {dtype}"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return f"it runs on cuda tensors (cpu tensors only under TRITON_INTERPRET=1), got {device.type}"
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # implements forward(...) and backward(...)
    # (device, dtype or None) -> why this backend cannot serve such tensors, or None if it can
    unavailable_reason: Callable[..., Optional[str]]

    def impl(self):
        return importlib.import_module(self.module)


BACKENDS = {
    b.name: b
    for b in (
        Backend("reference", "lora_kernels.reference", _always),
        Backend("cpu", "lora_kernels.backends.compiled", _compiled_reason("cpu")),
        Backend("cuda", "lora_kernels.backends.compiled", _compiled_reason("cuda")),
        Backend("triton", "lora_kernels.backends.triton", _triton_reason),
    )
}

# `backend="auto"`: the first usable entry for the tensors' device type.
AUTO_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def resolve(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend for `name` ("auto" or a backend name) for tensors of `device` (and
    `dtype`, if given); ValueError if `name` cannot serve them."""
    return _resolve(name, device.type, device.index, dtype)


# Constant for a given machine: torch.compile evaluates it once instead of tracing the imports.
@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: Optional[int], dtype: Optional[torch.dtype]) -> str:
    device = torch.device(device_type, device_index)
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ("reference",)):
            if BACKENDS[candidate].unavailable_reason(device, dtype) is None:
                return candidate
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    reason = BACKENDS[name].unavailable_reason(device, dtype)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot serve {device.type} tensors here: {reason}")
    return name


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends usable here: for `device` if given, else for cpu or any visible GPU."""
    if device is not None:
        devices: Tuple[torch.device, ...] = (torch.device(device),)
    else:
        devices = (torch.device("cpu"),) + ((torch.device("cuda"),) if torch.cuda.is_available() else ())
    return [n for n, b in BACKENDS.items() if any(b.unavailable_reason(d) is None for d in devices)]
