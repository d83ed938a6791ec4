# SPDX-License-Identifier: Apache-2.0
"""`LoRALinear`: an nn.Module holding a frozen base linear and a LoRA adapter, computed by the
fused `lora_linear` op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels.ops import lora_linear


class LoRALinear(nn.Module):
    """y = x·weightᵀ + bias + scaling·lora_B(lora_A(dropout(x))), scaling = alpha/r (alpha/√r with rsLoRA).

    x: (..., in_features) -> y: (..., out_features). `weight` (out, in) and `bias` (out,) are
    frozen (requires_grad=False); `lora_A` (r, in) starts kaiming-uniform and `lora_B` (out, r)
    at zero, as in PEFT, so a fresh layer equals its base linear.

    state_dict keys: ``weight``, ``bias`` (when bias=True), ``lora_A``, ``lora_B``.
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
        for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha, self.dropout, self.use_rslora, self.backend = float(alpha), float(dropout), use_rslora, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.merged = False
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base; PEFT's for the adapter (A kaiming-uniform, B zero)."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            dropout_p=self.dropout, training=self.training, backend=self.backend,
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into weight for inference (weight += scaling·B·A); idempotent."""
        if not self.merged:
            self.weight += self._delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (up to rounding in low-precision weights); idempotent."""
        if self.merged:
            self.weight -= self._delta_weight()
            self.merged = False

    def _delta_weight(self) -> torch.Tensor:
        """scaling·B·A (out, in), computed in at least fp32 and cast to weight's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout}, bias={self.bias is not None}, use_rslora={self.use_rslora}, "
            f"merged={self.merged}, backend={self.backend!r}"
        )
