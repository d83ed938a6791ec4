# SPDX-License-Identifier: Apache-2.0
"""`LoRALinear`: an nn.Module holding a frozen base linear and one or more LoRA adapters, computed
by the fused ops (`lora_linear`; several active adapters: `lora_linear_stacked`; per-row adapter
ids: `lora_linear_per_row`)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels.integrations._common import AdapterStackCache
from lora_kernels.ops import lora_linear
from lora_kernels.variants.per_row import lora_linear_per_row
from lora_kernels.variants.stacked import lora_linear_stacked, nn_dropout_rates

DEFAULT_ADAPTER = "default"


def _check_hyperparameters(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoRAAdapter(nn.Module):
    """An adapter added to a `LoRALinear` by `add_adapter`: lora_A (r, in_features) kaiming-uniform,
    lora_B (out_features, r) zero (PEFT's init), and its r, alpha, dropout and rsLoRA flag."""

    def __init__(self, in_features, out_features, r, alpha, dropout, use_rslora, device=None, dtype=None):
        super().__init__()
        _check_hyperparameters(r, alpha, dropout)
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return _scaling(self.alpha, self.r, self.use_rslora)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}"


class LoRALinear(nn.Module):
    """y = x·weightᵀ + bias + Σ over active adapters of scaling·lora_B(lora_A(dropout(x))),
    scaling = alpha/r (alpha/√r with rsLoRA).

    x: (..., in_features) -> y: (..., out_features). `weight` (out, in) and `bias` (out,) are
    frozen (requires_grad=False); `lora_A` (r, in) starts kaiming-uniform and `lora_B` (out, r)
    at zero, as in PEFT, so a fresh layer equals its base linear.

    The constructor's adapter is named "default" (parameters `lora_A`, `lora_B`; hyperparameters
    `r`, `alpha`, `dropout`, `use_rslora`). Further adapters (`add_adapter`) live in `adapters`
    (an nn.ModuleDict of `LoRAAdapter`). `set_adapter` picks the active ones: several active are
    summed by one `lora_linear_stacked` call, each with its own dropout mask. `forward(x,
    adapter_ids)` serves a mixed batch (each row its own adapter, as a multi-tenant server needs)
    by one `lora_linear_per_row` call; ids index `adapter_names` (insertion order, "default"
    first; `adapter_index(name)`), -1 = base only.

    state_dict keys: ``weight``, ``bias`` (when bias=True), ``lora_A``, ``lora_B``, and per added
    adapter ``adapters.<name>.lora_A`` / ``adapters.<name>.lora_B`` (add the adapter before loading).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        _check_hyperparameters(r, alpha, dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha, self.dropout, self.use_rslora, self.backend = float(alpha), float(dropout), use_rslora, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.adapters = nn.ModuleDict()
        self._active: List[str] = [DEFAULT_ADAPTER]
        self._merged_adapters: List[str] = []
        # the adapters stacked (T, r_max, in) / (T, out, r_max) for per-row calls that need no
        # gradient of them: a copy of every adapter's weights, rebuilt when one changes
        self._stacks = AdapterStackCache()
        self.merged = False
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        """The "default" adapter's scaling."""
        return _scaling(self.alpha, self.r, self.use_rslora)

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base; PEFT's for the "default" adapter (A kaiming-uniform, B zero)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ) -> LoRALinear:
        """Wrap an existing nn.Linear: its weight/bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
            bias=linear.bias is not None, use_rslora=use_rslora, backend=backend, device=w.device, dtype=w.dtype,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        return layer

    # --- several adapters ------------------------------------------------------------------------

    @property
    def adapter_names(self) -> List[str]:
        """Every adapter's name in insertion order ("default" first): what per-row ids index."""
        return [DEFAULT_ADAPTER, *self.adapters.keys()]

    @property
    def active_adapters(self) -> List[str]:
        """The adapters `forward(x)` sums, in `set_adapter` order."""
        return list(self._active)

    def adapter_index(self, name: str) -> int:
        """The per-row id of adapter `name` (its position in `adapter_names`; a delete shifts later ones)."""
        names = self.adapter_names
        if name not in names:
            raise ValueError(f"adapter_name: no adapter {name!r} (have {names})")
        return names.index(name)

    def add_adapter(
        self, name: str, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False
    ) -> LoRAAdapter:
        """Add adapter `name` (lora_A (r, in) kaiming-uniform, lora_B (out, r) zero, in lora_A's
        dtype and device), not active until `set_adapter`; returns it. Its per-row id is
        `len(adapter_names) - 1` after the call."""
        if not isinstance(name, str) or not name or "." in name or name == "__base__":
            raise ValueError(f"name must be a non-empty str without '.', not '__base__', got {name!r}")
        if name in self.adapter_names or hasattr(self.adapters, name):
            raise ValueError(f"name: adapter {name!r} already exists (or is a reserved name)")
        adapter = LoRAAdapter(
            self.in_features, self.out_features, r, alpha, dropout, use_rslora,
            device=self.lora_A.device, dtype=self.lora_A.dtype,
        )
        self.adapters[name] = adapter
        return adapter

    def set_adapter(self, names: Union[str, Sequence[str]]) -> None:
        """Make `names` (one name, or a list: summed) the active adapters of `forward(x)`."""
        names = [names] if isinstance(names, str) else list(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be one adapter name or a non-empty list without repeats, got {names!r}")
        for name in names:
            self.adapter_index(name)
        if self.merged:
            raise RuntimeError("set_adapter on a merged LoRALinear: call unmerge() first")
        self._active = names

    def delete_adapter(self, name: str) -> None:
        """Remove added adapter `name` (the "default" adapter cannot be deleted). If it was active
        it is dropped from the active ones ("default" becomes active if none is left); the per-row
        ids of later adapters shift down by one."""
        if name == DEFAULT_ADAPTER:
            raise ValueError("name: the 'default' adapter (the constructor's) cannot be deleted")
        self.adapter_index(name)
        if name in self._merged_adapters:
            raise RuntimeError(f"delete_adapter({name!r}): it is merged into weight, call unmerge() first")
        del self.adapters[name]
        self._active = [n for n in self._active if n != name] or [DEFAULT_ADAPTER]

    def _adapter(self, name: str) -> Tuple[torch.Tensor, torch.Tensor, float, float]:
        """(lora_A (r, in), lora_B (out, r), scaling, dropout) of adapter `name`."""
        if name == DEFAULT_ADAPTER:
            return self.lora_A, self.lora_B, self.scaling, self.dropout
        adapter = self.adapters[name]
        return adapter.lora_A, adapter.lora_B, adapter.scaling, adapter.dropout

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (..., in_features) -> y (..., out_features).

        adapter_ids: None — the active adapters for every row; or an int32/int64 tensor of
        M = prod(x.shape[:-1]) elements on x's device — row m uses adapter ``adapter_ids[m]``
        (an index into `adapter_names`, -1 = base only), whatever is active; no dropout on that
        path (so adapters with dropout > 0 need eval mode there). Gradients reach x and every
        adapter (zero for adapters no row uses); without grad the adapters' stack is cached."""
        if adapter_ids is not None:
            return self._per_row(x, adapter_ids)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if len(self._active) == 1:
            lora_A, lora_B, scaling, dropout = self._adapter(self._active[0])
            return lora_linear(
                x, self.weight, self.bias, lora_A, lora_B, scaling,
                dropout_p=dropout, training=self.training, backend=self.backend,
            )
        adapters = [self._adapter(name) for name in self._active]
        scalings, rates = nn_dropout_rates([a[2] for a in adapters], [a[3] for a in adapters], self.training)
        return lora_linear_stacked(
            x, self.weight, self.bias, [a[0] for a in adapters], [a[1] for a in adapters],
            scalings, dropout_p=rates, training=self.training, backend=self.backend,
        )

    def _per_row(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        if self.merged:
            raise RuntimeError("adapter_ids on a merged LoRALinear: call unmerge() first")
        adapters = [self._adapter(name) for name in self.adapter_names]
        if self.training and any(a[3] > 0.0 for a in adapters):
            raise ValueError(
                "adapter_ids: the per-row path applies no dropout, but an adapter has dropout > 0 in training "
                "mode (call eval(), or use adapters with dropout=0)"
            )
        lora_A, lora_B = self._stacks.get([a[0] for a in adapters], [a[1] for a in adapters], self.lora_A.dtype)
        return lora_linear_per_row(
            x, self.weight, self.bias, lora_A, lora_B, [a[2] for a in adapters], adapter_ids, backend=self.backend
        )

    # --- merging ---------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into weight for inference (weight += Σ scaling·B·A); idempotent."""
        if not self.merged:
            self._merged_adapters = list(self._active)
            self.weight += self._delta_weight(self._merged_adapters)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (up to rounding in low-precision weights); idempotent."""
        if self.merged:
            self.weight -= self._delta_weight(self._merged_adapters)
            self._merged_adapters = []
            self.merged = False

    def _delta_weight(self, names: Sequence[str]) -> torch.Tensor:
        """Σ scaling·B·A (out, in) over `names`, computed in at least fp32 and cast to weight's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = torch.zeros(self.weight.shape, dtype=dtype, device=self.weight.device)
        for name in names:
            lora_A, lora_B, scaling, _ = self._adapter(name)
            delta += scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
        return delta.to(self.weight.dtype)

    def extra_repr(self) -> str:
        active = "" if self._active == [DEFAULT_ADAPTER] else f", active={self._active}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout}, bias={self.bias is not None}, use_rslora={self.use_rslora}, "
            f"merged={self.merged}, backend={self.backend!r}{active}"
        )
