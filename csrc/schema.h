// SPDX-License-Identifier: Apache-2.0
// The torch.library schemas of the compiled ops, written once: csrc/ops.cpp defines them in the
// `lora_kernels` library (kernels: csrc/cpu, csrc/cuda) and the CPU emulation of the cuda backend
// (csrc/cuda/emulation/emulated_ops.cpp) in `lora_kernels_emu`, so the two cannot drift apart.
// The Python side (lora_kernels/backends/compiled.py) calls them and registers their fake kernels;
// the maths is docs/design.md §1, the dropout rule §4.
#pragma once

namespace lora_kernels {
namespace schema {

// x (M, K) any strides; weight (N, K) or None, bias (N,) or None, lora_A (r, K), lora_B (N, r)
// contiguous, one dtype. Dropout is on iff seed (int64, shape (1,), x's device) is given.
// Returns y (M, N) and xa = dropout(x)·lora_Aᵀ (M, r), where
//   y = x·weightᵀ + bias + scaling·xa·lora_Bᵀ   with a weight (the base GEMM fused: it accumulates
//                                                onto the LoRA term),
//   y = bias + scaling·xa·lora_Bᵀ               without (the caller adds its own base product,
//                                                lora_kernels/base_weights); N is lora_B's rows.
constexpr const char* kFusedForward =
    "fused_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed) -> (Tensor, Tensor)";

// grad_y (M, N) contiguous. Returns grad_x (M, K) (empty unless compute_grad_x), grad_A (r, K),
// grad_B (N, r); the dropout mask is regenerated from the seed, never stored. grad_x is
// grad_y·weight + scaling·D⊙(g·lora_A) with a weight, the LoRA term alone without.
constexpr const char* kFusedBackward =
    "fused_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
    "float scaling, float dropout_p, Tensor? seed, bool compute_grad_x) -> (Tensor, Tensor, Tensor)";

// A mixed batch (docs/design.md §10): row m of x (M, K) uses adapter ids[m] (-1: base only),
// given grouped: `order` (M,) int64 the rows sorted by adapter, `starts` (T+2,) int64 where the
// base rows are order[starts[0]:starts[1]] and adapter t's order[starts[t+1]:starts[t+2]]
// (lora_kernels.contract.group_rows). lora_A (T, r, K), lora_B (T, N, r) contiguous; scalings: T
// values. Returns y (M, N) = x·weightᵀ (when given) + bias + s_t·xa·B_tᵀ per row and
// xa (M, r) = x·A_tᵀ per row (zero on base rows). CPU only (the cuda backend composes it).
constexpr const char* kPerRowForward =
    "per_row_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float[] scalings, "
    "Tensor order, Tensor starts) -> (Tensor, Tensor)";

// The rows of a mixed batch grouped by adapter (lora_kernels.contract.group_rows): ids (M,) int32
// or int64, each in [-1, count) (else a ValueError naming adapter_ids and the row) -> order (M,)
// int64, the rows sorted by id (stable), and starts (count + 2,) int64. One counting pass, no
// sort and no parallel region: a decode step's grouping costs microseconds. CPU only.
constexpr const char* kGroupRows = "group_rows(Tensor ids, int count) -> (Tensor, Tensor)";

// Several adapters summed in one layer (lora_kernels.contract.StackedSpec): lora_A (R, K) and
// lora_B (N, R) are the T adapters' weights concatenated along the rank, adapter t owning the
// ranks[t] columns after those of adapters 0..t-1 (sum(ranks) = R), with scaling scalings[t] and
// rate dropout_ps[t]. seeds: int64 (T,) on x's device, or None (no dropout anywhere); adapter t
// drops iff seeds is given and dropout_ps[t] > 0, with the mask fused_forward draws from the seed
// seeds[t:t+1]. Otherwise as fused_forward: returns y = [x·weightᵀ +] bias + Σₜ sₜ·xa[:, segₜ]·
// lora_B[:, segₜ]ᵀ (M, N) and xa (M, R) with xa[:, segₜ] = Dₜ(x)·lora_A[segₜ]ᵀ.
constexpr const char* kFusedForwardStacked =
    "fused_forward_stacked(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, int[] ranks, "
    "float[] scalings, float[] dropout_ps, Tensor? seeds) -> (Tensor, Tensor)";

// As fused_backward, per adapter: grad_x = [grad_y·weight +] Σₜ sₜ·Dₜ⊙(g[:, segₜ]·lora_A[segₜ])
// (empty unless compute_grad_x), grad_A[segₜ] = sₜ·g[:, segₜ]ᵀ·Dₜ(x) (R, K),
// grad_B[:, segₜ] = sₜ·grad_yᵀ·xa[:, segₜ] (N, R), with g = grad_y·lora_B.
constexpr const char* kFusedBackwardStacked =
    "fused_backward_stacked(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
    "int[] ranks, float[] scalings, float[] dropout_ps, Tensor? seeds, bool compute_grad_x) -> "
    "(Tensor, Tensor, Tensor)";

// The keep-mask (rows, cols) of the shared generator, on seed's device: for bit-exact tests.
constexpr const char* kDropoutKeepMask = "dropout_keep_mask(Tensor seed, int rows, int cols, float dropout_p) -> Tensor";

// uint8 (count,): byte i holds the keep bits (bit j: lane j) of Philox group first_group + i; for
// tests of counters past 2**32 without a tensor that large. CPU only (not in the emulation).
constexpr const char* kDropoutKeepBits =
    "dropout_keep_bits(Tensor seed, int first_group, int count, float dropout_p) -> Tensor";

// Decodes a bitsandbytes 4-bit weight (lora_kernels/base_weights/nf4.py: packed uint8 (N*K/2,),
// two codes per byte, high nibble first; absmax float32 per run of `blocksize` flat elements;
// code float32 (16,)) into out (R, C) contiguous, float32/float16/bfloat16: out[r][c] =
// code[q(i)] * absmax[i / blocksize] rounded once to out's dtype, i = first + r*row_stride + c.
// A row tile of W₀ is row_stride = C = K; a column slab is C < K. CPU only.
constexpr const char* kDecode4bit =
    "decode_4bit(Tensor packed, Tensor absmax, Tensor code, int first, int row_stride, int blocksize, "
    "Tensor(a!) out) -> ()";

}  // namespace schema
}  // namespace lora_kernels
