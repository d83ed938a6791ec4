// CPU side of the shared dropout generator (csrc/dropout.h): the row multipliers the fused CPU
// kernels apply on the fly, so no M x K mask or dropped copy of x ever exists.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lora_kernels {
namespace cpu {

struct DropoutSpec {
  bool active = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double scale = 1.0;  // 1 / (1 - p) on kept elements
};

// Dropout is on iff a seed tensor (int64, one element, on the CPU) is given.
DropoutSpec make_dropout_spec(const c10::optional<at::Tensor>& seed, double dropout_p);

// out[k] = keep(row, k) ? scale : 0 for k in [0, cols): one Philox call per 8 flat elements.
template <typename acc_t>
void fill_row_multiplier(const DropoutSpec& spec, int64_t row, int64_t cols, acc_t* out);

// out[k] = keep(row, k) for k in [0, cols).
void fill_row_keep(const DropoutSpec& spec, int64_t row, int64_t cols, bool* out);

}  // namespace cpu
}  // namespace lora_kernels
