// SPDX-License-Identifier: Apache-2.0
#include "cpu/dropout_cpu.h"

#include "cpu/cpu_features.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lora_kernels {
namespace cpu {

DropoutSpec make_dropout_spec(const c10::optional<at::Tensor>& seed, double dropout_p) {
  DropoutSpec spec;
  if (!seed.has_value()) return spec;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "lora_kernels: seed must be an int64 tensor of one element, got ", seed->scalar_type(), " with ",
              seed->numel(), " elements");
  TORCH_CHECK(seed->device().is_cpu(), "lora_kernels: seed must be on the CPU for the cpu kernels, got ",
              seed->device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_kernels: dropout_p must be in [0, 1), got ", dropout_p);
  spec.threshold = dropout_threshold(dropout_p);
  // Every lane is < 2^16: such p drops everything, which lora_linear serves as p = 1 in Python.
  TORCH_CHECK(spec.threshold < 65536, "lora_kernels: dropout_p = ", dropout_p,
              " drops every element (its 16-bit threshold rounds to 2^16); lora_linear serves it as p = 1");
  spec.active = true;
  spec.seed = static_cast<uint64_t>(seed->item<int64_t>());
  spec.scale = 1.0 / (1.0 - dropout_p);
  return spec;
}

namespace {

// One Philox call per group: the reference loop, and the tail of the vector ones.
void keep_bytes_scalar(uint64_t seed, uint64_t first, int64_t count, uint32_t threshold, uint8_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<uint8_t>(keep_bits8(seed, first + static_cast<uint64_t>(i), threshold));
  }
}

#if defined(__x86_64__)
// gcc 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm512_undefined_* helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// (lo, hi) 32-bit halves of a * c for 16 lanes (a broadcast).
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i c, __m512i& lo, __m512i& hi) {
  // vpmuludq multiplies the even lanes (64-bit products); the odd lanes are swapped down first.
  // Lane swaps (p5) instead of 64-bit shifts (p0, where vpmuludq runs) keep the two ports even.
  const __m512i even = _mm512_mul_epu32(a, c);
  const __m512i odd = _mm512_mul_epu32(a, _mm512_shuffle_epi32(c, _MM_PERM_CDAB));
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
}

// Keep bytes of 16 * kStreams consecutive groups from `first`: the same rounds as philox4x32_10
// (csrc/dropout.h), 16 counters per vector, kStreams independent vectors interleaved so the
// multiplies' latency overlaps.
template <int kStreams>
__attribute__((target("avx512f"))) inline void keep_bytes_avx512_block(uint64_t seed, uint64_t first,
                                                                      uint32_t threshold, uint8_t* out) {
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(kPhiloxMulB));
  const __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[kStreams], c1[kStreams], c2[kStreams], c3[kStreams];
  for (int s = 0; s < kStreams; ++s) {
    const uint64_t group = first + static_cast<uint64_t>(16 * s);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(group)));
    c0[s] = _mm512_add_epi32(base_lo, lane_index);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0[s], base_lo);  // the low word wrapped
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(group >> 32)));
    c1[s] = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    c2[s] = _mm512_setzero_si512();
    c3[s] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int s = 0; s < kStreams; ++s) {
      __m512i lo_a, hi_a, lo_b, hi_b;
      mulhilo16(mul_b, c2[s], lo_b, hi_b);
      mulhilo16(mul_a, c0[s], lo_a, hi_a);
      c0[s] = _mm512_ternarylogic_epi32(hi_b, c1[s], key0, 0x96);  // three-way xor
      c1[s] = lo_b;
      c2[s] = _mm512_ternarylogic_epi32(hi_a, c3[s], key1, 0x96);
      c3[s] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), thr = _mm512_set1_epi32(static_cast<int>(threshold));
  for (int s = 0; s < kStreams; ++s) {
    __m512i bits = _mm512_setzero_si512();
    const __m512i words[4] = {c0[s], c1[s], c2[s], c3[s]};
    for (int w = 0; w < 4; ++w) {
      const __mmask16 keep_lo = _mm512_cmpge_epu32_mask(_mm512_and_si512(words[w], low16), thr);
      const __mmask16 keep_hi = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(words[w], 16), thr);
      bits = _mm512_mask_or_epi32(bits, keep_lo, bits, _mm512_set1_epi32(1 << (2 * w)));
      bits = _mm512_mask_or_epi32(bits, keep_hi, bits, _mm512_set1_epi32(1 << (2 * w + 1)));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * s), _mm512_cvtepi32_epi8(bits));
  }
}

__attribute__((target("avx512f"))) void keep_bytes_avx512(uint64_t seed, uint64_t first, int64_t count,
                                                         uint32_t threshold, uint8_t* out) {
  int64_t i = 0;
  for (; i + 64 <= count; i += 64) keep_bytes_avx512_block<4>(seed, first + static_cast<uint64_t>(i), threshold, out + i);
  for (; i + 16 <= count; i += 16) keep_bytes_avx512_block<1>(seed, first + static_cast<uint64_t>(i), threshold, out + i);
  keep_bytes_scalar(seed, first + static_cast<uint64_t>(i), count - i, threshold, out + i);
}

template <bool kAccumulate>
__attribute__((target("avx512f"))) void masked_scale_avx512(const uint8_t* bits, const float* in, float mult,
                                                           float* out, int64_t count) {
  // x * (0 or mult), never a masked (zeroing) multiply: a NaN/Inf at a dropped element stays NaN
  // as in torch's dropout (x * mask), on this path as on every other.
  const __m512 m = _mm512_set1_ps(mult);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    uint16_t keep;
    std::memcpy(&keep, bits + i / 8, sizeof(keep));
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(in + i), _mm512_maskz_mov_ps(keep, m));
    if (kAccumulate) v = _mm512_add_ps(_mm512_loadu_ps(out + i), v);
    _mm512_storeu_ps(out + i, v);
  }
  if (i < count) {  // fewer than 16 left: masked loads and stores stay inside the arrays
    const int64_t n = count - i;
    const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1u);
    const uint32_t keep = bits[i / 8] | (n > 8 ? static_cast<uint32_t>(bits[i / 8 + 1]) << 8 : 0u);
    const __m512 kept = _mm512_maskz_mov_ps(static_cast<__mmask16>(keep), m);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, in + i), kept);
    if (kAccumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, out + i), v);
    _mm512_mask_storeu_ps(out + i, lanes, v);
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

void keep_bytes(uint64_t seed, uint64_t first, int64_t count, uint32_t threshold, uint8_t* out) {
#if defined(__x86_64__)
  if (cpu_has_avx512()) return keep_bytes_avx512(seed, first, count, threshold, out);
#endif
  keep_bytes_scalar(seed, first, count, threshold, out);
}

void masked_scale(const uint8_t* bits, const float* in, float mult, float* out, int64_t count, bool accumulate) {
#if defined(__x86_64__)
  if (cpu_has_avx512()) {
    return accumulate ? masked_scale_avx512<true>(bits, in, mult, out, count)
                      : masked_scale_avx512<false>(bits, in, mult, out, count);
  }
#endif
  for (int64_t i = 0; i < count; ++i) {
    const float v = in[i] * (((bits[i / 8] >> (i % 8)) & 1) ? mult : 0.0f);
    out[i] = accumulate ? out[i] + v : v;
  }
}

namespace {

at::Tensor dropout_keep_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "lora_kernels.dropout_keep_mask: rows and cols must be >= 0, got ", rows,
              " and ", cols);
  const DropoutSpec spec = make_dropout_spec(seed, dropout_p);
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  if (cols == 0) return mask;
  bool* data = mask.data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    // Groups of rows [begin, end): flat indices begin*cols .. end*cols - 1.
    const uint64_t first = static_cast<uint64_t>(begin) * cols / kLanesPerCall;
    const uint64_t last = (static_cast<uint64_t>(end) * cols - 1) / kLanesPerCall;
    std::vector<uint8_t> bytes(last - first + 1);
    keep_bytes(spec.seed, first, static_cast<int64_t>(bytes.size()), spec.threshold, bytes.data());
    for (uint64_t i = static_cast<uint64_t>(begin) * cols; i < static_cast<uint64_t>(end) * cols; ++i) {
      data[i] = (bytes[i / kLanesPerCall - first] >> (i % kLanesPerCall)) & 1;
    }
  });
  return mask;
}

at::Tensor dropout_keep_bits_cpu(const at::Tensor& seed, int64_t first_group, int64_t count, double dropout_p) {
  TORCH_CHECK(first_group >= 0 && count >= 0, "lora_kernels.dropout_keep_bits: first_group and count must be >= 0, got ",
              first_group, " and ", count);
  const DropoutSpec spec = make_dropout_spec(seed, dropout_p);
  at::Tensor bits = at::empty({count}, at::TensorOptions().dtype(at::kByte));
  keep_bytes(spec.seed, static_cast<uint64_t>(first_group), count, spec.threshold, bits.data_ptr<uint8_t>());
  return bits;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("dropout_keep_bits", &dropout_keep_bits_cpu);
}

}  // namespace cpu
}  // namespace lora_kernels
