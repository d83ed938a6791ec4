# SPDX-License-Identifier: Apache-2.0
"""The pieces the integration adapter (`adapter.py`) and the framework modules use: the patch
report, the per-layer patch state and forward replacement, and the per-call checks (plain
nn.Linear weights, hooks, dropout modules, autocast)."""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from lora_kernels.variants.per_row import stack_adapters

_STATE_ATTR = "_lora_kernels_patch"
FUSABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what autocast would cast for a linear


class AdapterStackCache:
    """A layer's adapters stacked for the per-row (mixed batch) op, kept between calls.

    `get(lora_As, lora_Bs, dtype)` with T tensors (r_t, K) and (N, r_t) returns lora_A (T, r, K)
    and lora_B (T, N, r) in `dtype`, zero-padded to the largest rank r — what
    `lora_linear_per_row` takes. What is cached: that one stack, a copy of the adapters' weights
    (T·r·(K + N) elements of `dtype`), rebuilt when an adapter tensor is replaced, changes shape or
    storage, or is changed in place (its `_version`: optimizer steps, `load_state_dict`), or the
    dtype or set of adapters differs. Writes through `.data` (or a raw pointer) leave `_version`
    alone and are not seen: call `clear()` after them. A call that needs gradients of the adapters
    (grad mode on and any of them requiring grad) is not cached and drops the stack (training
    steps follow): it gets the (cast) tensors as lists, which the op pads itself and
    differentiates through. Inference tensors (made under torch.inference_mode) have no
    `_version`: their stack is built per call. Not pickled or deep-copied (a copy rebuilds it)."""

    def __init__(self):
        self._refs: Tuple = ()
        self._key: Optional[Tuple] = None
        self._stacks: Optional[Tuple[Tensor, Tensor]] = None

    def __reduce__(self):
        return (AdapterStackCache, ())

    def get(
        self, lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], dtype: torch.dtype
    ) -> Tuple[Union[Tensor, List[Tensor]], Union[Tensor, List[Tensor]]]:
        tensors = (*lora_As, *lora_Bs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            self.clear()
            return list(cast_all(dtype, lora_As)), list(cast_all(dtype, lora_Bs))
        with torch.no_grad():
            if any(t.is_inference() for t in tensors):
                return stack_adapters(cast_all(dtype, lora_As), 0), stack_adapters(cast_all(dtype, lora_Bs), 1)
            key = (dtype, tuple((t.data_ptr(), t._version, tuple(t.shape), t.device) for t in tensors))
            if self._stacks is not None and key == self._key and all(r() is t for r, t in zip(self._refs, tensors)):
                return self._stacks
            stacks = stack_adapters(cast_all(dtype, lora_As), 0), stack_adapters(cast_all(dtype, lora_Bs), 1)
        self._refs, self._key, self._stacks = tuple(weakref.ref(t) for t in tensors), key, stacks
        return self._stacks

    def clear(self) -> None:
        self.__init__()


@dataclass
class PatchState:
    """Stored on a patched layer: the class forward it replaced, the framework that reads the layer
    (`adapter.Framework.name`), the options of `patch`, and the layer's adapters stacked for mixed
    batches (`AdapterStackCache`; dropped by `unpatch`)."""

    original: Callable  # the class's forward function (called as original(module, x, ...))
    framework: str
    backend: str
    cast_adapters: bool = False
    stacks: AdapterStackCache = field(default_factory=AdapterStackCache, repr=False, compare=False)


@dataclass
class PatchReport:
    """What `patch` did: the layers now served by the fused ops, the layers that keep
    their own forward (`kept`, grouped by reason) and patched layers that are fused only under a
    condition (`conditional`, grouped by condition; otherwise their calls run the original forward).
    `str(report)` is a readable summary."""

    patched: List[str] = field(default_factory=list)
    kept: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    conditional: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    already_patched: int = 0  # of `patched`, how many were patched before this call
    backend: str = "auto"

    @property
    def num_patched(self) -> int:
        return len(self.patched)

    @property
    def num_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())

    def keep(self, name: str, reason: str) -> None:
        self.kept[reason].append(name)

    def note(self, name: str, condition: str) -> None:
        self.conditional[condition].append(name)

    def merge(self, other: PatchReport) -> PatchReport:
        self.patched += other.patched
        for reason, names in other.kept.items():
            self.kept[reason].extend(names)
        for condition, names in other.conditional.items():
            self.conditional[condition].extend(names)
        self.already_patched += other.already_patched
        return self

    def reasons(self) -> Dict[str, int]:
        """{reason: number of layers kept for it}."""
        return {reason: len(names) for reason, names in self.kept.items()}

    def __str__(self) -> str:
        again = f", {self.already_patched} of them already patched" if self.already_patched else ""
        lines = [
            f"lora_kernels.patch: {self.num_patched} LoRA layer(s) fused (backend={self.backend!r}{again}); "
            f"{self.num_kept} kept on their own forward"
        ]
        for label, groups in (("kept", self.kept), ("fused only", self.conditional)):
            for reason, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
                lines.append(f"  {label} {len(names)}: {reason}: {shown}")
        return "\n".join(lines)

    __repr__ = __str__


def strict_error(report: PatchReport) -> ValueError:
    detail = "\n".join(f"  {name}: {reason}" for reason, names in report.kept.items() for name in names)
    return ValueError(
        f"lora_kernels.patch(strict=True): {report.num_kept} LoRA layer(s) cannot be served by "
        f"lora_kernels.lora_linear (nothing was patched):\n{detail}"
    )


# --- forward replacement ------------------------------------------------------------------------


def patch_state(module: nn.Module) -> Optional[PatchState]:
    return module.__dict__.get(_STATE_ATTR)


def is_patched(module: nn.Module) -> bool:
    return patch_state(module) is not None


def foreign_forward(module: nn.Module) -> bool:
    """Whether something else (accelerate hooks, a user) already replaced this instance's forward."""
    return "forward" in module.__dict__ and not is_patched(module)


class BoundForward:
    """The forward stored on a patched layer instance: ``fn(module, *args, **kwargs)``.

    Like a bound method, but it pickles (`torch.save(model)`) and deep-copies along with its
    module (a bound method of a module-level function would not unpickle)."""

    __slots__ = ("fn", "module")

    def __init__(self, fn: Callable, module: nn.Module):
        self.fn, self.module = fn, module

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return (BoundForward, (self.fn, self.module))

    def __repr__(self) -> str:
        return f"<lora_kernels fused forward of {type(self.module).__name__}>"


def install(module: nn.Module, fused_forward: Callable, framework: str, backend: str, cast_adapters: bool) -> bool:
    """Set `fused_forward` as the instance's forward; True if it was already patched (options updated)."""
    state = patch_state(module)
    if state is not None:
        state.backend, state.cast_adapters = backend, cast_adapters
        return True
    module.__dict__[_STATE_ATTR] = PatchState(type(module).forward, framework, backend, cast_adapters)
    module.forward = BoundForward(fused_forward, module)
    return False


def uninstall(module: nn.Module) -> bool:
    """Restore the class forward of a patched layer; False if it was not patched."""
    if patch_state(module) is None:
        return False
    module.__dict__.pop("forward", None)
    del module.__dict__[_STATE_ATTR]
    return True


def device_mismatch_error(module: nn.Module, x: Tensor, weight: Tensor) -> RuntimeError:
    return RuntimeError(
        f"lora_kernels: patched {type(module).__name__} called with x on {x.device} but its weights are on "
        f"{weight.device}. nn.DataParallel replicas share the forward of the original patched layer: use "
        "DistributedDataParallel, or lora_kernels.unpatch(model) before wrapping the model in DataParallel."
    )


# --- per-call checks -----------------------------------------------------------------------------


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def has_hooks(*modules: nn.Module) -> bool:
    """Forward (pre-)hooks that the eager path would run on these submodules."""
    return any(bool(m._forward_hooks or m._forward_pre_hooks) for m in modules) or _global_hooks()


def plain_tensor(t: Optional[Tensor], fsdp2_shard_ok: bool = False) -> bool:
    """A dense, non-subclass (no DTensor, NF4, torchao or int8 wrapper) floating tensor, or None.
    `fsdp2_shard_ok`: a DTensor counts too (an FSDP2 shard, gathered into a plain tensor in forward)."""
    if t is None:
        return True
    kinds = (nn.Parameter, Tensor) + ((_dtensor_type(),) if fsdp2_shard_ok else ())
    return type(t) in kinds and t.layout == torch.strided and t.dtype in FUSABLE_DTYPES


def _dtensor_type() -> type:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return Tensor
    return DTensor


FSDP2_CONDITION = (
    "in forward, where FSDP2 (fully_shard) has gathered the DTensor-sharded weights into plain tensors "
    "(patch before or after fully_shard, either works)"
)


def fsdp2_managed(model: nn.Module, name: str) -> bool:
    """Whether submodule `name` of `model` is, or sits under, a `fully_shard` (FSDP2) module: its
    parameters are DTensor shards between calls and plain tensors during its forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    parts = name.split(".") if name else []
    return any(isinstance(model.get_submodule(".".join(parts[:i])), FSDPModule) for i in range(len(parts) + 1))


def sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a DTensor right now."""
    return any(type(p) is _dtensor_type() for p in module.parameters())


def plain_linear_reason(base: nn.Module, fsdp2: bool = False) -> Optional[str]:
    """Why `base` is not a plain nn.Linear the fused op can replace, or None. `fsdp2`: the layer is
    under fully_shard, so DTensor weights are fine here (plain in forward, checked per call)."""
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear (quantized, Conv, Embedding, …)"
    if not plain_tensor(base.weight, fsdp2) or not plain_tensor(base.bias, fsdp2):
        kind = type(base.weight).__name__
        return f"base weight is a {kind} ({base.weight.dtype}), not a dense float tensor (quantized or sharded)"
    return None


def dropout_p(dropout: nn.Module) -> Optional[float]:
    """The effective dropout rate of a LoRA dropout module (0 in eval mode), None if not nn.Dropout/Identity."""
    if type(dropout) is nn.Identity:
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p) if dropout.training else 0.0
    return None


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for x's device type, else None."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_all(dtype: torch.dtype, tensors: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """Differentiable casts (no copy when already `dtype`); None stays None."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
