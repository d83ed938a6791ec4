"""Loads the compiled module `lora_kernels._C` if it was built; the package works without it."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """None when `lora_kernels._C` is loaded (its ops registered under torch.ops.lora_kernels),
    else why not (not built, or built against another torch/python)."""
    if importlib.util.find_spec("lora_kernels._C") is None:
        return "lora_kernels._C is not built (pip install --no-build-isolation -e .)"
    try:
        importlib.import_module("lora_kernels._C")  # importing registers the ops
        importlib.import_module("lora_kernels.compiled")  # and their fake kernels
    except ImportError as exc:
        reason = f"lora_kernels._C failed to load, likely built for another torch/python: {exc}"
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return reason
    return None


def has_kernel(device_type: str) -> bool:
    """Whether `lora_kernels._C` registered fused kernels for `device_type` ("cpu"/"cuda")."""
    if load_error() is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::fused_forward", key)
