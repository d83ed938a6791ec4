// SPDX-License-Identifier: Apache-2.0
#include "cpu/thin_matmul.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lora_kernels {
namespace cpu {

#if defined(__x86_64__)
namespace {

// gcc 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm512_undefined_* helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

constexpr int kLanes = 16;    // fp32 lanes in a zmm register
constexpr int kMaxVecs = 4;   // column vectors per register tile: 64 columns

// Lanes [0, n) of a vector, n in [1, 16].
inline __mmask16 lanes_below(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Vectors covering `cols` columns from `col`, capped at kMaxVecs, and the last one's lanes.
inline int vecs_at(int64_t col, int64_t cols) {
  return static_cast<int>(std::min<int64_t>(kMaxVecs, (cols - col + kLanes - 1) / kLanes));
}
inline __mmask16 last_lanes(int64_t col, int64_t cols, int vecs) {
  return lanes_below(std::min<int64_t>(kLanes, cols - col - static_cast<int64_t>(kLanes) * (vecs - 1)));
}

// Loads/stores vector v of a tile of V vectors, the last one through `last`.
template <int V>
__attribute__((target("avx512f"))) inline __m512 load_vec(const float* p, int v, __mmask16 last) {
  return v + 1 < V ? _mm512_loadu_ps(p + kLanes * v) : _mm512_maskz_loadu_ps(last, p + kLanes * v);
}
template <int V>
__attribute__((target("avx512f"))) inline void store_vec(float* p, int v, __mmask16 last, __m512 x) {
  if (v + 1 < V) {
    _mm512_storeu_ps(p + kLanes * v, x);
  } else {
    _mm512_mask_storeu_ps(p + kLanes * v, last, x);
  }
}

// The register tile of R x V vectors, zeroed.
template <int R, int V>
__attribute__((target("avx512f"))) inline void zero_tile(__m512 (&acc)[R][V]) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) acc[i][c] = _mm512_setzero_ps();
}

// acc[i][c] += s[i * stride] · vec[c] for i < R, c < V: R scalars broadcast against V vectors.
template <int R, int V>
__attribute__((target("avx512f"))) inline void broadcast_fma(__m512 (&acc)[R][V], const float* s, int64_t stride,
                                                            const __m512 (&vec)[V]) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const __m512 si = _mm512_set1_ps(s[i * stride]);
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) acc[i][c] = _mm512_fmadd_ps(si, vec[c], acc[i][c]);
  }
}

// The epilogue's keep bits (thin_matmul_masked): row i's bit for column c at keep[i * ld][c / 8],
// bit c % 8; none (nullptr) for the plain product.
struct KeepBits {
  const uint8_t* bits;
  int64_t ld;
};

// out[R rows, V vectors] = bias + alpha · u[R rows, :inner] · v[:inner, V vectors] (+ out's old
// value with kAccumulate): each element of u broadcast against a row of v. With kMasked the
// epilogue is masked_scale's instead: (u·v) · (keep bit ? alpha : 0), plus out's old value with
// kAccumulate (bias unused), the same operations in the same order.
template <int R, int V, bool kAccumulate, bool kMasked = false>
__attribute__((target("avx512f"))) void matmul_tile(int64_t inner, const float* u, int64_t ldu, const float* v,
                                                   int64_t ldv, float alpha, const float* bias, __mmask16 last,
                                                   float* out, int64_t ldo, KeepBits keep = {nullptr, 0}) {
  __m512 acc[R][V];
  zero_tile(acc);
  for (int64_t j = 0; j < inner; ++j) {
    __m512 vv[V];
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) vv[c] = load_vec<V>(v + j * ldv, c, last);
    broadcast_fma(acc, u + j, ldu, vv);
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  if constexpr (kMasked) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int c = 0; c < V; ++c) {
        uint16_t bits;  // columns 16c .. 16c + 15 of this tile: two whole bytes (the tile starts a byte)
        std::memcpy(&bits, keep.bits + i * keep.ld + 2 * c, sizeof(bits));
        __m512 term = _mm512_mul_ps(acc[i][c], _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), scale));
        if (kAccumulate) term = _mm512_add_ps(load_vec<V>(out + i * ldo, c, last), term);
        store_vec<V>(out + i * ldo, c, last, term);
      }
    return;
  }
  __m512 bv[V];
#pragma GCC unroll 8
  for (int c = 0; c < V; ++c) bv[c] = bias != nullptr ? load_vec<V>(bias, c, last) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) {
      const __m512 base = kAccumulate ? _mm512_add_ps(load_vec<V>(out + i * ldo, c, last), bv[c]) : bv[c];
      store_vec<V>(out + i * ldo, c, last, _mm512_fmadd_ps(acc[i][c], scale, base));
    }
}

// Rows per tile: ~24 accumulators of the 32 zmm registers (10 loads per 24 FMAs at V = 4), and at
// most 8 rows, so that rows of u 2^k floats apart (one L1 set) plus v's line fit the set's 12 ways.
template <int V>
constexpr int matmul_tile_rows() {
  return V <= 2 ? 8 : 6;
}

template <int V, bool kAccumulate, bool kMasked = false>
__attribute__((target("avx512f"))) void matmul_cols(int64_t rows, int64_t inner, const float* u, int64_t ldu,
                                                   const float* v, int64_t ldv, float alpha, const float* bias,
                                                   __mmask16 last, float* out, int64_t ldo,
                                                   KeepBits keep = {nullptr, 0}) {
  constexpr int R = matmul_tile_rows<V>();
  int64_t i = 0;
  auto rows_keep = [&](int64_t row) { return KeepBits{kMasked ? keep.bits + row * keep.ld : nullptr, keep.ld}; };
  for (; i + R <= rows; i += R) {
    matmul_tile<R, V, kAccumulate, kMasked>(inner, u + i * ldu, ldu, v, ldv, alpha, bias, last, out + i * ldo, ldo,
                                            rows_keep(i));
  }
  for (; i < rows; ++i) {
    matmul_tile<1, V, kAccumulate, kMasked>(inner, u + i * ldu, ldu, v, ldv, alpha, bias, last, out + i * ldo, ldo,
                                            rows_keep(i));
  }
}

// acc[J rows, V vectors] += u[:rows, J cols]ᵀ · a[:rows, V vectors]. With kPack the rows of a
// are also copied to `pack` (ld kPackLd), so the caller's next tiles read them from there: the
// rows of a user tensor are often 2^k floats apart and then share one L1 set, which 32 of them
// overflow.
constexpr int kPackRows = 32;
constexpr int64_t kPackLd = kLanes * kMaxVecs;

// With kMasked (the pass that reads a from its source), each element of a is multiplied as it is
// loaded by (keep bit ? mult : 0), masked_scale's operation: a is dropout(x) without a copy.
struct MaskedSource {
  const uint8_t* bits;  // unused without kMasked
  int64_t ld;
  float mult;
};

template <int J, int V, bool kPack, bool kMasked>
__attribute__((target("avx512f"))) void t_times_tile(int64_t rows, const float* u, int64_t ldu, const float* a,
                                                    int64_t lda, __mmask16 last, float* pack, float* acc,
                                                    int64_t ld_acc, MaskedSource mask) {
  __m512 sum[J][V];
  zero_tile(sum);
  const __m512 mult = _mm512_set1_ps(mask.mult);
  for (int64_t i = 0; i < rows; ++i) {
    __m512 av[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      av[v] = load_vec<V>(a + i * lda, v, last);
      if constexpr (kMasked) {
        uint16_t bits;  // the strip starts a keep byte: vector v's bits are bytes 2v, 2v + 1
        std::memcpy(&bits, mask.bits + i * mask.ld + 2 * v, sizeof(bits));
        av[v] = _mm512_mul_ps(av[v], _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), mult));
      }
      if (kPack) _mm512_store_ps(pack + i * kPackLd + kLanes * v, av[v]);
    }
    broadcast_fma(sum, u + i * ldu, 1, av);
  }
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      float* p = acc + j * ld_acc;
      store_vec<V>(p, v, last, _mm512_add_ps(load_vec<V>(p, v, last), sum[j][v]));
    }
}

// The tile of rows [j, j + 4) of acc (fewer at the end of r).
template <int V, bool kPack, bool kMasked>
__attribute__((target("avx512f"))) void t_times_tile_at(int64_t j, int64_t r, int64_t rows, const float* u,
                                                       int64_t ldu, const float* a, int64_t lda, __mmask16 last,
                                                       float* pack, float* acc, int64_t ld_acc, MaskedSource mask) {
  u += j;
  acc += j * ld_acc;
  switch (std::min<int64_t>(4, r - j)) {
    case 4: return t_times_tile<4, V, kPack, kMasked>(rows, u, ldu, a, lda, last, pack, acc, ld_acc, mask);
    case 3: return t_times_tile<3, V, kPack, kMasked>(rows, u, ldu, a, lda, last, pack, acc, ld_acc, mask);
    case 2: return t_times_tile<2, V, kPack, kMasked>(rows, u, ldu, a, lda, last, pack, acc, ld_acc, mask);
    default: return t_times_tile<1, V, kPack, kMasked>(rows, u, ldu, a, lda, last, pack, acc, ld_acc, mask);
  }
}

// Up to kPackRows rows: the first tile reads a (masked, with keep bits) and packs it, the others
// read the pack.
template <int V, bool kMasked>
__attribute__((target("avx512f"))) void t_times_rows(int64_t rows, int64_t r, const float* u, int64_t ldu,
                                                    const float* a, int64_t lda, __mmask16 last, float* acc,
                                                    int64_t ld_acc, MaskedSource mask) {
  if (r <= 4) {  // one tile
    return t_times_tile_at<V, false, kMasked>(0, r, rows, u, ldu, a, lda, last, nullptr, acc, ld_acc, mask);
  }
  alignas(64) float pack[kPackRows * kPackLd];
  t_times_tile_at<V, true, kMasked>(0, r, rows, u, ldu, a, lda, last, pack, acc, ld_acc, mask);
  for (int64_t j = 4; j < r; j += 4) {  // the pack holds a already masked
    t_times_tile_at<V, false, false>(j, r, rows, u, ldu, pack, kPackLd, last, nullptr, acc, ld_acc, mask);
  }
}

template <int V, bool kMasked>
__attribute__((target("avx512f"))) void t_times_cols(int64_t rows, int64_t r, const float* u, int64_t ldu,
                                                    const float* a, int64_t lda, __mmask16 last, float* acc,
                                                    int64_t ld_acc, MaskedSource mask) {
  for (int64_t i = 0; i < rows; i += kPackRows) {
    MaskedSource block = mask;
    if (kMasked) block.bits += i * block.ld;
    t_times_rows<V, kMasked>(std::min<int64_t>(kPackRows, rows - i), r, u + i * ldu, ldu, a + i * lda, lda, last, acc,
                             ld_acc, block);
  }
}

// Calls cols_fn<V>(col, last) for each strip of up to kMaxVecs vectors of [0, cols).
template <typename Fn>
void for_column_strips(int64_t cols, const Fn& cols_fn) {
  for (int64_t col = 0; col < cols; col += kLanes * kMaxVecs) {
    const int vecs = vecs_at(col, cols);
    const __mmask16 last = last_lanes(col, cols, vecs);
    switch (vecs) {
      case 1: cols_fn(std::integral_constant<int, 1>{}, col, last); break;
      case 2: cols_fn(std::integral_constant<int, 2>{}, col, last); break;
      case 3: cols_fn(std::integral_constant<int, 3>{}, col, last); break;
      default: cols_fn(std::integral_constant<int, 4>{}, col, last); break;
    }
  }
}

#pragma GCC diagnostic pop
}  // namespace

void thin_matmul(int64_t rows, int64_t inner, int64_t cols, const float* u, int64_t ldu, const float* v, int64_t ldv,
                 float alpha, const float* bias, float* out, int64_t ldo, bool accumulate) {
  TORCH_CHECK(cpu_has_avx512(), "lora_kernels: thin_matmul needs AVX-512");
  for_column_strips(cols, [&](auto vecs, int64_t col, __mmask16 last) {
    constexpr int V = decltype(vecs)::value;
    const float* bias_cols = bias == nullptr ? nullptr : bias + col;
    if (accumulate) {
      matmul_cols<V, true>(rows, inner, u, ldu, v + col, ldv, alpha, bias_cols, last, out + col, ldo);
    } else {
      matmul_cols<V, false>(rows, inner, u, ldu, v + col, ldv, alpha, bias_cols, last, out + col, ldo);
    }
  });
}

void thin_matmul_masked(int64_t rows, int64_t inner, int64_t cols, const float* u, int64_t ldu, const float* v,
                        int64_t ldv, const uint8_t* keep, int64_t ld_keep, float mult, float* out, int64_t ldo,
                        bool accumulate) {
  TORCH_CHECK(cpu_has_avx512(), "lora_kernels: thin_matmul_masked needs AVX-512");
  for_column_strips(cols, [&](auto vecs, int64_t col, __mmask16 last) {
    constexpr int V = decltype(vecs)::value;
    const KeepBits strip{keep + col / 8, ld_keep};  // a strip starts at a multiple of 64 columns
    if (accumulate) {
      matmul_cols<V, true, true>(rows, inner, u, ldu, v + col, ldv, mult, nullptr, last, out + col, ldo, strip);
    } else {
      matmul_cols<V, false, true>(rows, inner, u, ldu, v + col, ldv, mult, nullptr, last, out + col, ldo, strip);
    }
  });
}

void thin_matmul_t_accumulate(int64_t rows, int64_t r, int64_t n, const float* u, int64_t ldu, const float* a,
                              int64_t lda, float* acc, int64_t ld_acc) {
  TORCH_CHECK(cpu_has_avx512(), "lora_kernels: thin_matmul_t_accumulate needs AVX-512");
  for_column_strips(n, [&](auto vecs, int64_t col, __mmask16 last) {
    t_times_cols<decltype(vecs)::value, false>(rows, r, u, ldu, a + col, lda, last, acc + col, ld_acc,
                                               {nullptr, 0, 0.0f});
  });
}

void thin_matmul_t_accumulate_masked(int64_t rows, int64_t r, int64_t n, const float* u, int64_t ldu, const float* a,
                                     int64_t lda, const uint8_t* keep, int64_t ld_keep, float mult, float* acc,
                                     int64_t ld_acc) {
  TORCH_CHECK(cpu_has_avx512(), "lora_kernels: thin_matmul_t_accumulate_masked needs AVX-512");
  for_column_strips(n, [&](auto vecs, int64_t col, __mmask16 last) {
    t_times_cols<decltype(vecs)::value, true>(rows, r, u, ldu, a + col, lda, last, acc + col, ld_acc,
                                              {keep + col / 8, ld_keep, mult});  // a strip starts a keep byte
  });
}

#else  // no x86: thin_matmul_enabled() is false and callers use ATen

void thin_matmul(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float, const float*, float*,
                 int64_t, bool) {
  TORCH_CHECK(false, "lora_kernels: thin_matmul needs AVX-512");
}
void thin_matmul_masked(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, const uint8_t*,
                        int64_t, float, float*, int64_t, bool) {
  TORCH_CHECK(false, "lora_kernels: thin_matmul_masked needs AVX-512");
}
void thin_matmul_t_accumulate(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                              int64_t) {
  TORCH_CHECK(false, "lora_kernels: thin_matmul_t_accumulate needs AVX-512");
}
void thin_matmul_t_accumulate_masked(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                                     const uint8_t*, int64_t, float, float*, int64_t) {
  TORCH_CHECK(false, "lora_kernels: thin_matmul_t_accumulate_masked needs AVX-512");
}

#endif

}  // namespace cpu
}  // namespace lora_kernels
