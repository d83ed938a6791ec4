// SPDX-License-Identifier: Apache-2.0
// The one dropout generator of lora_kernels, shared by the CPU and CUDA kernels so the bits
// cannot drift. The rule is written out in lora_kernels/reference.py (the Python mirror the
// tests compare against): element (m, k) of the flattened M x K input has flat index
// i = m*K + k, group g = i / 8 and lane j = i % 8; one Philox4x32-10 call on counter
// (g lo, g hi, 0, 0) with key (seed lo, seed hi) gives four words, lane j is the 16-bit half
// (j % 2) of word j / 2, and the element is kept iff lane >= t, t = floor(p * 65536 + 0.5).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#else
#define LK_HOST_DEVICE inline
#define LK_UNROLL
#endif

namespace lora_kernels {

constexpr int kLanesPerCall = 8;

struct Philox4 {
  uint32_t w[4];
};

LK_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// One Philox4x32 round on the counter words under round key (k0, k1). Written on plain values so
// the CPU code can run it over arrays of counters (vectorised) and the GPU code per thread.
LK_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi_b, hi_a;
  const uint32_t lo_b = mulhilo32(kPhiloxMulB, c2, &hi_b);
  const uint32_t lo_a = mulhilo32(kPhiloxMulA, c0, &hi_a);
  c0 = hi_b ^ c1 ^ k0;
  c1 = lo_b;
  c2 = hi_a ^ c3 ^ k1;
  c3 = lo_a;
}

// Philox4x32-10 of counter (group lo, group hi, 0, 0) under the 64-bit seed.
LK_HOST_DEVICE Philox4 philox4x32_10(uint64_t seed, uint64_t group) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
LK_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 16-bit threshold: an element is kept iff its lane >= threshold.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::floor(p * 65536.0 + 0.5));
}

// Bit j of the result says whether lane j of the Philox words `w` is kept.
LK_HOST_DEVICE uint32_t keep_bits_of(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint32_t threshold) {
  return static_cast<uint32_t>((w0 & 0xFFFFu) >= threshold) | static_cast<uint32_t>((w0 >> 16) >= threshold) << 1 |
         static_cast<uint32_t>((w1 & 0xFFFFu) >= threshold) << 2 | static_cast<uint32_t>((w1 >> 16) >= threshold) << 3 |
         static_cast<uint32_t>((w2 & 0xFFFFu) >= threshold) << 4 | static_cast<uint32_t>((w2 >> 16) >= threshold) << 5 |
         static_cast<uint32_t>((w3 & 0xFFFFu) >= threshold) << 6 | static_cast<uint32_t>((w3 >> 16) >= threshold) << 7;
}

// Bit j of the result says whether lane j (flat index 8*group + j) is kept.
LK_HOST_DEVICE uint32_t keep_bits8(uint64_t seed, uint64_t group, uint32_t threshold) {
  const Philox4 r = philox4x32_10(seed, group);
  return keep_bits_of(r.w[0], r.w[1], r.w[2], r.w[3], threshold);
}

}  // namespace lora_kernels
