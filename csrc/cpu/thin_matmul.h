// fp32 products with one thin (rank r) side, on one row block at a time: the LoRA halves of
// forward and backward. BLAS repacks the shared operand (A or B) on every call, which on a 32-row
// block costs about as much as the product; these AVX-512 loops read it in place from L1/L2.
//
// All matrices are row-major fp32 with a unit inner stride and the given leading dimension.
// `v` and `acc` below are streamed row-parallel: give them a leading dimension that is not a
// multiple of 1024 floats, or their rows share one L1 set (the callers pad their own copies).
// Callers check thin_matmul_enabled() first and use ATen otherwise.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"

namespace lora_kernels {
namespace cpu {

inline bool thin_matmul_enabled() { return cpu_has_avx512(); }

// out (rows, r) = a (rows, k) · b (k, r).
void matmul_to_thin(int64_t rows, int64_t k, int64_t r, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* out, int64_t ldo);

// out (rows, n) = bias (n; none if null) + alpha · u (rows, r) · v (r, n).
void matmul_from_thin(int64_t rows, int64_t r, int64_t n, const float* u, int64_t ldu, const float* v, int64_t ldv,
                      float alpha, const float* bias, float* out, int64_t ldo);

// acc (r, n) += uᵀ (r, rows) · a (rows, n), with u (rows, r).
void accumulate_thin_t_times(int64_t rows, int64_t r, int64_t n, const float* u, int64_t ldu, const float* a,
                             int64_t lda, float* acc, int64_t ld_acc);

}  // namespace cpu
}  // namespace lora_kernels
