# SPDX-License-Identifier: Apache-2.0
"""Loads the compiled module `lora_kernels._C` if it was built (the package works without it), and
holds the one rule for whether a build includes the CUDA kernels.

setup.py loads this file by path, before torch may even be installed: keep it free of imports
from the rest of the package, and import torch only inside functions.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import subprocess
import warnings
from typing import Optional

CUDA_MODES = ("auto", "1", "0")


def cuda_mode() -> str:
    """LORA_KERNELS_CUDA: "auto" (default: build the CUDA kernels where a GPU is visible), "1"
    (always; an error if impossible) or "0" (never)."""
    mode = os.environ.get("LORA_KERNELS_CUDA", "auto").strip().lower()
    if mode not in CUDA_MODES:
        raise ValueError(f"LORA_KERNELS_CUDA must be one of {', '.join(CUDA_MODES)}; got {mode!r}")
    return mode


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root holding bin/nvcc (CUDA_HOME, CUDA_PATH, then /usr/local/cuda), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU: torch sees one, or `nvidia-smi -L` lists one (a
    build container can have the driver tools without torch seeing the device)."""
    import torch

    if torch.cuda.is_available():
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def cuda_build_reason() -> Optional[str]:
    """None when the build should include the CUDA kernels, else why not. Raises RuntimeError
    when LORA_KERNELS_CUDA=1 asks for them and they cannot be built (no CUDA torch or no nvcc)."""
    import torch

    mode = cuda_mode()
    if mode == "0":
        return "LORA_KERNELS_CUDA=0"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home() is None:
        missing.append("nvcc not found (set CUDA_HOME)")
    if mode == "1" and missing:
        raise RuntimeError("LORA_KERNELS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    if missing:
        return "; ".join(missing)
    if mode == "auto" and not gpu_visible():
        return "no GPU visible (LORA_KERNELS_CUDA=1 forces the build)"
    return None


def cuda_build_expected() -> bool:
    """What setup.py decides here: whether `lora_kernels._C` should carry the CUDA kernels."""
    try:
        return cuda_build_reason() is None
    except RuntimeError:
        return True  # forced: a build without them is a failure the tests should report


@functools.cache
def load_error() -> Optional[str]:
    """None when `lora_kernels._C` is loaded (its ops registered under torch.ops.lora_kernels),
    else why not (not built, or built against another torch/python)."""
    if importlib.util.find_spec("lora_kernels._C") is None:
        return "lora_kernels._C is not built (pip install --no-build-isolation -e .)"
    try:
        importlib.import_module("lora_kernels._C")  # importing registers the ops
        importlib.import_module("lora_kernels.backends.compiled_fakes")  # and their fake kernels
    except ImportError as exc:
        reason = f"lora_kernels._C failed to load, likely built for another torch/python: {exc}"
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return reason
    return None


def has_kernel(device_type: str) -> bool:
    """Whether `lora_kernels._C` registered fused kernels for `device_type` ("cpu"/"cuda")."""
    return has_op("fused_forward", device_type)


def has_op(name: str, device_type: str) -> bool:
    """Whether `lora_kernels._C` registered the op `name` with a kernel for `device_type`."""
    import torch

    if load_error() is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{name}", key)
