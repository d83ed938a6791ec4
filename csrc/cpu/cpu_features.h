// SPDX-License-Identifier: Apache-2.0
// Which vector paths the CPU kernels may take.
#pragma once

#include <cstdlib>

namespace lora_kernels {
namespace cpu {

// AVX-512F is present and LORA_KERNELS_NO_AVX512 is unset. The variable forces the portable
// paths, so the tests can check both give the same results on one machine.
inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  static const bool use = __builtin_cpu_supports("avx512f") && std::getenv("LORA_KERNELS_NO_AVX512") == nullptr;
  return use;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace lora_kernels
