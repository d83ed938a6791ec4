// SPDX-License-Identifier: Apache-2.0
// fp32 products with one thin (rank r) side, on one row block at a time: the LoRA halves of
// forward and backward. BLAS repacks the shared operand (A or B) on every call, which on a 32-row
// block costs about as much as the product; these AVX-512 loops read it in place from L1/L2.
//
// All matrices are row-major fp32 with a unit inner stride and the given leading dimension.
// A tile keeps every row of `v` (when inner is the rank) and of `acc` live at once: give those a
// leading dimension that is not a multiple of 1024 floats, or the rows share one L1 set (the
// callers pad their own copies).
// Callers check thin_matmul_enabled() first and use ATen otherwise.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"

namespace lora_kernels {
namespace cpu {

inline bool thin_matmul_enabled() { return cpu_has_avx512(); }

// out (rows, cols) = bias (cols; none if null) + alpha · u (rows, inner) · v (inner, cols), or
// out += that with `accumulate` (several adapters' terms summed into one grad_x block).
// One of inner and cols is the rank: xa = x·Aᵀ and g = dY·B (cols = r), or s·xa·Bᵀ and s·g·A
// (inner = r).
void thin_matmul(int64_t rows, int64_t inner, int64_t cols, const float* u, int64_t ldu, const float* v, int64_t ldv,
                 float alpha, const float* bias, float* out, int64_t ldo, bool accumulate);

// out (rows, cols) = (u · v) ⊙ multipliers, or out += that with `accumulate`: element (i, c) is
// multiplied by `mult` where bit c % 8 of keep[i * ld_keep + c / 8] is set and by 0 where not (a
// multiply: NaN/Inf propagate), the operations of masked_scale on u · v's exact products. The dX
// term of an adapter with dropout, s·D⊙(g·A), without a (rows, cols) temporary. Each keep row
// must hold 2·⌈cols / 16⌉ readable bytes.
void thin_matmul_masked(int64_t rows, int64_t inner, int64_t cols, const float* u, int64_t ldu, const float* v,
                        int64_t ldv, const uint8_t* keep, int64_t ld_keep, float mult, float* out, int64_t ldo,
                        bool accumulate);

// acc (r, n) += uᵀ (r, rows) · a (rows, n), with u (rows, r): dB and dA per row block.
void thin_matmul_t_accumulate(int64_t rows, int64_t r, int64_t n, const float* u, int64_t ldu, const float* a,
                              int64_t lda, float* acc, int64_t ld_acc);

// The same with a = dropout(x) read from x itself: element (i, c) of a multiplied by `mult` where
// bit c % 8 of keep[i * ld_keep + c / 8] is set, by 0 where not (masked_scale's operation), as it
// is loaded. dA of an adapter with dropout without its dropped rows in a buffer. Each keep row
// must hold 2·⌈n / 16⌉ readable bytes.
void thin_matmul_t_accumulate_masked(int64_t rows, int64_t r, int64_t n, const float* u, int64_t ldu, const float* a,
                                     int64_t lda, const uint8_t* keep, int64_t ld_keep, float mult, float* acc,
                                     int64_t ld_acc);

}  // namespace cpu
}  // namespace lora_kernels
