# SPDX-License-Identifier: Apache-2.0
"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``), served on the plain fused op.

PEFT's maths (peft 0.21 ``DoraLinearLayer.forward`` / ``DoraLinearVariant.forward``): with a
magnitude m (N,) and the row norm ``‖W₀ + s·B·A‖`` taken per output row and *detached*,

    c = m / ‖W₀ + s·B·A‖                                             (N,)
    y = x·W₀ᵀ + b + (c − 1)⊙(x′·W₀ᵀ) + c⊙s·(x′·Aᵀ)·Bᵀ

where x′ = x at p = 0 or in eval, and x′ = dropout(x) in training with p > 0 (the mask of
`lora_kernels.dropout`, shared by both x′ terms). Gradients flow to x, A, B, m (and bias if it
requires grad); W₀ is frozen.

The served form never builds the N x K matrix W₀ + s·B·A that PEFT builds every forward:

    ‖W₀ₙ + s·BₙA‖² = ‖W₀ₙ‖² + 2s·Bₙ·(A·W₀ₙᵀ) + s²·Bₙ(A·Aᵀ)Bₙᵀ

costs one r x K by K x N product (`BaseWeight.matmul_into` on A's r rows) with ‖W₀ₙ‖² cached per
base weight, and the norm itself cached while A, B and W₀ are unchanged (`_TensorCache`: eval, and
the micro-batches of gradient accumulation). Then, on any backend's plain fused op (the custom op
``lora_kernels::lora_linear`` and its backward):

* p = 0 or eval: y = c⊙z + b with z = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ from one fused call; backward hands
  the op c⊙dY and reduces dm from dY⊙z. Saved: x, xa (M x r), z (M x N).
* p > 0: u = x·W₀ᵀ + b + s·(x′·Aᵀ)·(c⊙B)ᵀ from one fused call with the seed, w = x′·W₀ᵀ in row
  chunks whose mask is regenerated from the same seed (never an M x K mask or x′), y = u + (c−1)⊙w.
  Backward: the op's backward on dY (with c⊙B), plus dX += D⊙(((c−1)⊙dY)·W₀) in row chunks.
  Saved: x, xa, w (M x N), the seed. Four GEMMs of M·N·K are inherent here (two inputs x, x′
  forward; two backward), as in PEFT.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_kernels import _extension
from lora_kernels.backends import resolve
from lora_kernels.base_weights import BaseWeight, DenseWeight, as_base_weight
from lora_kernels.dropout import (
    DROP_ALL_THRESHOLD,
    LANES_PER_CALL,
    dropout_multiplier,
    dropout_threshold,
    philox4x32,
)
from lora_kernels.ops import (
    call_seed,
    check_inputs,
    effective_dropout,
    lora_linear,
    lora_linear_backward_op,
    lora_linear_op,
    no_autocast,
)
from lora_kernels.variants.base import Variant, register_variant

# Rows per chunk of the p > 0 passes (x′ rows, their mask and one block of the masked base product
# live at once): about 2^21 elements of the wider of K and N, but at least 256 rows. Each chunk's
# BLAS call re-packs W₀: measured on this CPU (2 threads, loaded), a 2048³ product in 256/512/1024-row
# chunks took 1.5x/1.3x/1.1x the time of one call.
CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ROWS = 256


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the norm ‖W₀ + s·B·A‖ per output row, without the N x K matrix ------------------------------


class _TensorCache:
    """Values computed from some tensors, reused while those tensors are unchanged.

    Entries are keyed by the first tensor (the anchor) and hold a weak reference to it, so they
    die with it. An entry is valid while every tensor has the same data pointer, shape, strides
    and version counter, and the same extra key: an in-place write through a tensor
    (``load_state_dict``, ``copy_`` under no_grad, an optimizer step) bumps its version, replacing
    ``param.data`` changes its pointer. Writes through ``param.data`` (a tensor with its own
    version counter) are not seen: call `clear_norm_cache` after them. Inference tensors (no
    version counter) and torch.compile tracing are not cached."""

    def __init__(self):
        self._entries: Dict[int, Tuple[weakref.ref, tuple, Tensor]] = {}

    def get(self, tensors, extra: tuple, compute: Callable[[], Tensor]) -> Tensor:
        if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return compute()
        anchor = tensors[0]
        key = extra + tuple((t.data_ptr(), tuple(t.shape), t.stride(), t._version) for t in tensors)
        entry = self._entries.get(id(anchor))
        if entry is not None and entry[0]() is anchor and entry[1] == key:
            return entry[2]
        value = compute()
        ident = id(anchor)

        def forget(ref, ident=ident, entries=self._entries):
            if ident in entries and entries[ident][0] is ref:
                del entries[ident]

        self._entries[ident] = (weakref.ref(anchor, forget), key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


# ‖W₀ₙ‖² per base weight (keyed by its flattened tensors): one pass over W₀ while it is unchanged.
_ROW_NORMS = _TensorCache()
# ‖W₀ + s·B·A‖ per (lora_A, lora_B, base, s): recomputed after each optimizer step, reused by the
# micro-batches of gradient accumulation and by every call in eval (where A·W₀ᵀ, r·N·K
# multiply-adds, is a quarter of a 64-row layer's base product).
_NORMS = _TensorCache()


def clear_norm_cache() -> None:
    """Forget every cached norm (needed only after writing a base weight or lora_A/lora_B through ``.data``)."""
    _ROW_NORMS.clear()
    _NORMS.clear()


def weight_norm(weight: Union[Tensor, BaseWeight], lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W₀ + s·B·A‖ per output row (N,), detached, in W₀'s compute dtype (PEFT's rounding), from
    ‖W₀ₙ‖² (cached), A·W₀ᵀ (r x N) and A·Aᵀ (r x r): O(N·K·r), no N x K temporary."""
    return _cached_norm(as_base_weight(weight), lora_A, lora_B, scaling).clone()


def _cached_norm(base: BaseWeight, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """weight_norm, served from `_NORMS` while A, B and W₀ are unchanged (read-only: it is shared)."""
    tensors, meta = base.flatten()
    extra = (base.format, tuple(meta), float(scaling))
    return _NORMS.get([lora_A, lora_B, *tensors], extra, lambda: _weight_norm(base, lora_A, lora_B, scaling))


def _weight_norm(base: BaseWeight, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    acc = _accumulate_dtype(base.dtype)
    tensors, meta = base.flatten()
    with torch.no_grad():
        a, b = lora_A.detach(), lora_B.detach()
        aw = a.new_zeros(a.shape[0], base.shape[0])  # A·W₀ᵀ (r, N)
        base.matmul_into(aw, a)
        a_acc, b_acc = a.to(acc), b.to(acc)
        cross = (b_acc * aw.t().to(acc)).sum(1)  # Bₙ·(A·W₀ₙᵀ)
        quad = ((b_acc @ (a_acc @ a_acc.t())) * b_acc).sum(1)  # Bₙ(A·Aᵀ)Bₙᵀ = ‖BₙA‖²
        row_sq = _ROW_NORMS.get(tensors, (base.format, tuple(meta), acc), lambda: base.row_norms_sq(acc))
        norm_sq = row_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad
        # ≥ 0 in exact arithmetic; rounding can push a near-zero row below it
        return norm_sq.clamp_min_(0.0).sqrt_().to(base.dtype)


# --- the dropout multiplier of a block of rows ----------------------------------------------------


def _has_keep_bits(device: torch.device) -> bool:
    return device.type == "cpu" and _extension.has_op("dropout_keep_bits", "cpu")


def _bit_table(p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(256, 8): row v holds the multipliers of a byte v of keep bits (bit j: element j)."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return bits.to(dtype) * (1.0 / (1.0 - p))


def _multiplier_rows(seed: Tensor, row0: int, rows: int, k: int, p: float, dtype: torch.dtype,
                     table: Optional[Tensor]) -> Tensor:
    """D (rows, K) in `dtype` for rows row0.. of the flattened input: the op's mask (same seed, same
    flat indices m·K + k) times 1/(1 - p). `table` is `_bit_table` where the compiled generator
    serves x's device, else None (the Python mirror of the generator, on any device)."""
    first, count = row0 * k, rows * k
    group0, lead = divmod(first, LANES_PER_CALL)
    groups = (lead + count + LANES_PER_CALL - 1) // LANES_PER_CALL
    if table is not None:
        bits = torch.ops.lora_kernels.dropout_keep_bits(seed, group0, groups, p)
        flat = F.embedding(bits.int(), table).view(-1)
    else:
        counter = torch.arange(group0, group0 + groups, dtype=torch.int64, device=seed.device)
        words = torch.stack(philox4x32(counter, int(seed.item())), dim=1)
        lanes = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=2).reshape(-1)
        flat = (lanes >= dropout_threshold(p)).to(dtype) * (1.0 / (1.0 - p))
    return flat[lead:lead + count].view(rows, k)


def _row_chunks(m: int, width: int) -> Iterator[Tuple[int, int]]:
    """(m0, m1) row ranges of [0, m), each about CHUNK_ELEMENTS / `width` rows, at least MIN_CHUNK_ROWS."""
    step = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(width, 1), 1)
    for m0 in range(0, m, step):
        yield m0, min(m0 + step, m)


# --- the served form ------------------------------------------------------------------------------


class _DoRALinear(torch.autograd.Function):
    """DoRA on the plain fused op (the module docstring's two schedules). x is (..., K); the
    flattened (M, K) / (M, N) views are used for the row chunks only."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, bias, base, norm, spec, seed, backend):
        tensors, meta = base.flatten()
        c = magnitude / norm
        with no_autocast(x):
            if seed is None:
                z, xa = lora_linear_op(x, tensors, base.format, meta, None, lora_A, lora_B, spec.scaling, 0.0, None,
                                       backend)
                y = torch.addcmul(bias, z, c) if bias is not None else z * c
                kept = z
            else:
                y, xa = lora_linear_op(x, tensors, base.format, meta, bias, lora_A, lora_B * c[:, None],
                                       spec.scaling, spec.dropout_p, seed, backend)
                kept = _masked_base_into_output(x, y, c - 1, base, spec.dropout_p, seed)
        ctx.save_for_backward(x, lora_A, lora_B, xa, kept, c, norm, seed)
        ctx.base, ctx.spec, ctx.backend = base, spec, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, xa, kept, c, norm, seed = ctx.saved_tensors
        base, spec, backend = ctx.base, ctx.spec, ctx.backend
        needs_x, _, _, needs_m, needs_bias = ctx.needs_input_grad[:5]
        n, k = base.shape
        tensors, meta = base.flatten()
        dy = grad_y.contiguous().view(-1, n)
        kept2d = kept.view(-1, n)
        acc = _accumulate_dtype(c.dtype)
        dc = torch.zeros(n, dtype=acc, device=c.device)
        with no_autocast(x):
            if seed is None:
                dz = torch.empty_like(dy)
                # dz = c⊙dY and dc = Σ dY⊙z by chunks: the dY⊙z temporary is a chunk's, not M x N. Few
                # large chunks: each op is a parallel region, and on a loaded machine each region waits
                # for its slowest thread (64-row chunks measured far slower there)
                for m0, m1 in _row_chunks(dy.shape[0], n):
                    torch.mul(dy[m0:m1], c, out=dz[m0:m1])
                    dc += (dy[m0:m1] * kept2d[m0:m1]).sum(0, dtype=acc)
                grad_x, grad_a, grad_b = lora_linear_backward_op(
                    dz.view(grad_y.shape), x, tensors, base.format, meta, lora_A, lora_B, xa, spec.scaling, 0.0,
                    None, backend, needs_x)
            else:
                grad_x, grad_a, grad_b_eff = lora_linear_backward_op(
                    dy.view(grad_y.shape), x, tensors, base.format, meta, lora_A, lora_B * c[:, None], xa,
                    spec.scaling, spec.dropout_p, seed, backend, needs_x)
                grad_b = grad_b_eff * c[:, None]
                dc += (lora_B.to(acc) * grad_b_eff.to(acc)).sum(1)
                dc += _masked_base_backward(x, grad_x if needs_x else None, dy, kept2d, c - 1, base,
                                            spec.dropout_p, seed)
        grad_m = (dc / norm.to(acc)).to(c.dtype) if needs_m else None
        grad_bias = dy.sum(0) if needs_bias else None
        return (grad_x if needs_x else None), grad_a, grad_b, grad_m, grad_bias, None, None, None, None, None


def _base_product(base: BaseWeight, a: Tensor, out: Tensor, grad_input: bool = False) -> Tensor:
    """out = a·W₀ᵀ (or a·W₀ with `grad_input`), overwritten. A dense W₀ writes it in one BLAS call;
    other formats accumulate onto zeros through their own products (the interface has no
    overwriting product, and zeroing an M x N chunk first cost ~2% of the p > 0 step here)."""
    if isinstance(base, DenseWeight):
        return torch.mm(a, base.weight if grad_input else base.weight.t(), out=out)
    out.zero_()
    (base.grad_input_into if grad_input else base.matmul_into)(out, a)
    return out


def _masked_base_into_output(x, y, c_minus_1, base: BaseWeight, p: float, seed) -> Tensor:
    """w = x′·W₀ᵀ (shape of y) by row chunks, x′ = D⊙x with the op's mask; y += (c − 1)⊙w in place."""
    n, k = base.shape
    x2d, y2d = x.reshape(-1, k), y.view(-1, n)
    w = torch.empty_like(y2d)
    table = _bit_table(p, _accumulate_dtype(x.dtype), x.device) if _has_keep_bits(x.device) else None
    for m0, m1 in _row_chunks(x2d.shape[0], max(k, n)):
        d = _multiplier_rows(seed, m0, m1 - m0, k, p, _accumulate_dtype(x.dtype), table)
        x_dropped = d.mul_(x2d[m0:m1]).to(x.dtype)  # multiplied, not selected: NaN/Inf propagate
        _base_product(base, x_dropped, w[m0:m1])
        y2d[m0:m1].addcmul_(w[m0:m1], c_minus_1)
    return w.view(y.shape)


def _masked_base_backward(x, grad_x, dy, w, c_minus_1, base: BaseWeight, p: float, seed) -> Tensor:
    """The (c − 1)⊙w term's backward by row chunks: returns dc (N,) = Σ dY⊙w and, when grad_x is
    given, adds D⊙(((c − 1)⊙dY)·W₀) to it in place."""
    n, k = base.shape
    acc = _accumulate_dtype(dy.dtype)
    dc = torch.zeros(n, dtype=acc, device=dy.device)
    grad_x2d = grad_x.view(-1, k) if grad_x is not None else None
    table = _bit_table(p, acc, x.device) if grad_x is not None and _has_keep_bits(x.device) else None
    for m0, m1 in _row_chunks(dy.shape[0], max(k, n)):
        dc += (dy[m0:m1] * w[m0:m1]).sum(0, dtype=acc)
        if grad_x2d is None:
            continue
        dx_dropped = _base_product(base, dy[m0:m1] * c_minus_1, dy.new_empty(m1 - m0, k), grad_input=True)
        grad_x2d[m0:m1].addcmul_(dx_dropped, _multiplier_rows(seed, m0, m1 - m0, k, p, acc, table))
    return dc


# --- public API -----------------------------------------------------------------------------------


def check_magnitude(magnitude, n: int, x: Tensor) -> None:
    """The DoRA magnitude must be a (N,) tensor of x's dtype on x's device."""
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor (N,), got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (n,):
        raise ValueError(f"magnitude must be (N,) = ({n},), got {tuple(magnitude.shape)}")
    if magnitude.dtype != x.dtype:
        raise TypeError(f"magnitude must have x's dtype {x.dtype}, got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude must be on x's device {x.device}, got {magnitude.device}")


def dora_linear(
    x: Tensor,
    weight: Union[Tensor, BaseWeight],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    *,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """A DoRA linear layer (PEFT's ``use_dora=True``): x (..., K) -> y (..., N).

    ``y = x·W₀ᵀ + b + (c − 1)⊙(x′·W₀ᵀ) + c⊙s·(x′·Aᵀ)·Bᵀ``, ``c = magnitude / ‖W₀ + s·B·A‖``
    (row norms, detached), x′ = dropout(x) in training with p > 0, else x. Arguments as
    `lora_kernels.lora_linear` (weight (N, K) tensor or BaseWeight, frozen; bias (N,) or None;
    lora_A (r, K); lora_B (N, r); `seed` shares the dropout mask) plus magnitude (N,), x's dtype
    and device. Served on `backend`'s plain fused op; gradients flow to x, lora_A, lora_B,
    magnitude (and bias if it requires grad), never to weight."""
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    base = as_base_weight(weight.contiguous() if isinstance(weight, Tensor) else weight)
    n = base.shape[0]
    check_magnitude(magnitude, n, x)
    if isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must be frozen (requires_grad=False): dora_linear gives the base weight no gradient")
    norm = _cached_norm(base, lora_A, lora_B, scaling)
    spec = effective_dropout(dropout_p, scaling, training)
    if training and dropout_p > 0.0 and spec.dropout_p == 0.0:
        # every element dropped: x′ = 0, y is the base layer's output; lora_linear serves that
        # (A, B and, through c⊙B, the magnitude get zero gradients, as under PEFT).
        return lora_linear(x, base, bias, lora_A, lora_B * (magnitude / norm)[:, None], scaling, dropout_p,
                           training, backend)
    name = resolve(backend, x.device, x.dtype, base.format)
    seed = call_seed(seed, spec, x)
    bias = bias.contiguous() if bias is not None else None
    return _DoRALinear.apply(x, lora_A.contiguous(), lora_B.contiguous(), magnitude, bias, base, norm, spec, seed,
                             name)


def dora_linear_eager(
    x: Tensor,
    weight: Union[Tensor, BaseWeight],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """The oracle, PEFT's formula by plain autograd (materializes W₀ + s·B·A, as PEFT does).
    `dropout_p` > 0 means training with dropout (then `seed` is required; the mask is
    `lora_kernels.dropout`'s); p >= 1 - 2^-17 drops everything."""
    w0 = weight.dense() if isinstance(weight, BaseWeight) else weight
    lora_weight = (lora_B @ lora_A).detach()
    norm = torch.linalg.norm(w0 + scaling * lora_weight, dim=1).to(w0.dtype).detach()
    c = magnitude / norm
    result = F.linear(x, w0, bias)
    if dropout_p > 0.0:
        if dropout_threshold(dropout_p) >= DROP_ALL_THRESHOLD:
            x = torch.zeros_like(x)
        else:
            k = x.shape[-1]
            d = dropout_multiplier(int(seed.reshape(-1)[0].item()), x.numel() // k, k, dropout_p, x.dtype, x.device)
            x = x * d.reshape(x.shape)
        base_result = F.linear(x, w0)
    else:
        base_result = result if bias is None else result - bias
    return result + (c - 1) * base_result + c * scaling * F.linear(F.linear(x, lora_A), lora_B)


def init_magnitude(weight: Union[Tensor, BaseWeight], lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """PEFT's initial magnitude: ‖W₀ + s·B·A‖ per row (N,) in W₀'s compute dtype, not a Parameter."""
    return weight_norm(weight, lora_A, lora_B, scaling)


def _apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend="auto", *, seed=None,
           magnitude):
    return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend, seed=seed)


def _oracle(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None, *, magnitude):
    return dora_linear_eager(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)


DORA = register_variant(Variant(
    name="dora", apply=_apply, oracle=_oracle, extra_params=("magnitude",),
    init_extra=lambda weight, lora_A, lora_B, scaling: {"magnitude": init_magnitude(weight, lora_A, lora_B, scaling)},
))
