# SPDX-License-Identifier: Apache-2.0
"""The backend registry: each backend declares what it serves (devices, dtypes, base-weight
formats, variants it fuses itself) and, when it cannot serve some tensors, says why. Dispatch is a
lookup, not a chain of ifs; `available_backends`, `resolve` and the parity tests read the same table."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lora_kernels.contract import LoRAGrads, LoRASpec, LoRAWeights, PerRowSpec, StackedSpec

# Variants that are a backend's own entry points (`forward_<name>` / `backward_<name>`): a backend
# serves them only if it lists them in `Backend.variants`; every other variant (DoRA) composes on
# any backend's plain op.
BACKEND_VARIANTS = ("stacked", "per_row")


def _always(device: torch.device) -> Optional[str]:
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Backend:
    """One backend. `module` implements `forward`/`backward` of `lora_kernels.contract` and is
    imported on first use (triton's import is slow and may be missing)."""

    name: str
    module: str
    device_types: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    # Base-weight formats it reads itself; None: any registered format, through the format's own
    # products (`BaseWeight.matmul_into` / `grad_input_into`) around the backend's LoRA kernels.
    base_formats: Optional[Tuple[str, ...]] = None
    # Variants it serves itself: the plain op, and those of BACKEND_VARIANTS it implements (several
    # adapters summed: `forward_stacked`/`backward_stacked`; a mixed batch by per-row adapter ids:
    # `forward_per_row`/`backward_per_row`). Other variants compose on this backend's plain op.
    variants: Tuple[str, ...] = ("lora",)
    # device -> why the backend cannot run here (extension not built, triton missing, ...), or None
    availability: Callable[[torch.device], Optional[str]] = _always

    def not_supported_reasons(
        self, device: torch.device, dtype: Optional[torch.dtype] = None, base_format: str = "dense",
        variant: str = "lora",
    ) -> List[str]:
        """Why this backend cannot serve `variant` for tensors of `device`/`dtype` on a `base_format`
        base ([] if it can)."""
        reasons = []
        if variant in BACKEND_VARIANTS and variant not in self.variants:
            reasons.append(f"it does not implement the {variant!r} variant")
        if device.type not in self.device_types:
            reasons.append(f"it runs on {' or '.join(self.device_types)} tensors, got {device.type}")
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            reasons.append(f"it supports {names}, got {_dtype_name(dtype)}")
        if self.base_formats is not None and base_format not in self.base_formats:
            reasons.append(f"it reads base weights in {', '.join(self.base_formats)} format, got {base_format!r}")
        if not reasons:
            reason = self.availability(device)
            if reason is not None:
                reasons.append(reason)
        return reasons

    def unavailable_reason(self, device: torch.device, dtype: Optional[torch.dtype] = None,
                           base_format: str = "dense", variant: str = "lora") -> Optional[str]:
        """The reasons of `not_supported_reasons` as one string, or None if the backend can serve."""
        reasons = self.not_supported_reasons(device, dtype, base_format, variant)
        return "; ".join(reasons) if reasons else None

    def impl(self):
        return importlib.import_module(self.module)

    def forward(self, x2d, weights: LoRAWeights, spec: LoRASpec, seed):
        """x2d (M, K) -> (y (M, N), xa (M, r)); see `lora_kernels.contract`."""
        return self.impl().forward(x2d, weights, spec, seed)

    def backward(self, dy, x2d, weights: LoRAWeights, xa, spec: LoRASpec, seed, compute_dx: bool) -> LoRAGrads:
        """dy (M, N) -> LoRAGrads(x (M, K) or None, lora_A (r, K), lora_B (N, r))."""
        return LoRAGrads(*self.impl().backward(dy, x2d, weights, xa, spec, seed, compute_dx))

    def forward_stacked(self, x2d, weights: LoRAWeights, spec: StackedSpec, seeds):
        """Several adapters summed: x2d (M, K) -> (y (M, N), xa (M, R)); see `contract.StackedSpec`."""
        return self.impl().forward_stacked(x2d, weights, spec, seeds)

    def backward_stacked(self, dy, x2d, weights: LoRAWeights, xa, spec: StackedSpec, seeds,
                         compute_dx: bool) -> LoRAGrads:
        """dy (M, N) -> LoRAGrads(x (M, K) or None, lora_A (R, K), lora_B (N, R))."""
        return LoRAGrads(*self.impl().backward_stacked(dy, x2d, weights, xa, spec, seeds, compute_dx))

    def forward_per_row(self, x2d, weights: LoRAWeights, spec: PerRowSpec):
        """A mixed batch: x2d (M, K) -> (y (M, N), xa (M, r)); see `contract.PerRowSpec`."""
        return self.impl().forward_per_row(x2d, weights, spec)

    def backward_per_row(self, dy, x2d, weights: LoRAWeights, xa, spec: PerRowSpec, compute_dx: bool) -> LoRAGrads:
        """dy (M, N) -> LoRAGrads(x (M, K) or None, lora_A (T, r, K), lora_B (T, N, r))."""
        return LoRAGrads(*self.impl().backward_per_row(dy, x2d, weights, xa, spec, compute_dx))


BACKENDS: Dict[str, Backend] = {}

# `backend="auto"`: the first entry that can serve, per device type.
AUTO_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def register(backend: Backend) -> Backend:
    """Add `backend` to the table; a second registration of a name must come from the same module
    (a reloaded backend package re-registers itself)."""
    known = BACKENDS.get(backend.name)
    if known is not None and known.module != backend.module:
        raise ValueError(f"backend {backend.name!r} is already registered by {known.module}")
    BACKENDS[backend.name] = backend
    return backend


def resolve(name: str, device: torch.device, dtype: Optional[torch.dtype] = None, base_format: str = "dense",
            variant: str = "lora") -> str:
    """The concrete backend for `name` ("auto" or a backend name) serving `variant` for tensors of
    `device` (and `dtype`, if given) on a `base_format` base; ValueError naming the reasons if
    `name` cannot serve them."""
    return _resolve(name, device.type, device.index, dtype, base_format, variant)


# Constant for a given machine: torch.compile evaluates it once instead of tracing the imports.
@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: Optional[int], dtype: Optional[torch.dtype],
             base_format: str, variant: str) -> str:
    device = torch.device(device_type, device_index)
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ("reference",)):
            if not BACKENDS[candidate].not_supported_reasons(device, dtype, base_format, variant):
                return candidate
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    reason = BACKENDS[name].unavailable_reason(device, dtype, base_format, variant)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot serve {device.type} tensors here: {reason}")
    return name


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends usable here: for `device` if given, else for cpu or any visible GPU."""
    if device is not None:
        devices: Tuple[torch.device, ...] = (torch.device(device),)
    else:
        devices = (torch.device("cpu"),) + ((torch.device("cuda"),) if torch.cuda.is_available() else ())
    return [n for n, b in BACKENDS.items() if any(not b.not_supported_reasons(d) for d in devices)]
