// SPDX-License-Identifier: Apache-2.0
// CPU side of the shared dropout generator (csrc/dropout.h): the keep bits of whole rows,
// regenerated where they are needed, and applied on the fly, so no M x K mask or dropped copy of
// x ever exists.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dropout.h"

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

// out[i] = keep bits (bit j: lane j kept) of Philox group first + i, for i in [0, count).
void keep_bytes(uint64_t seed, uint64_t first, int64_t count, uint32_t threshold, uint8_t* out);

// out[i] = in[i] * (bit i of `bits` ? mult : 0) for i in [0, count) (bit i: bits[i / 8] >> (i % 8)),
// or out[i] += that with `accumulate` (several adapters' terms summed into one grad_x row):
// a multiply by 0, not a 0, so NaN/Inf at dropped elements propagate (x * mask, as torch).
// AVX-512: sixteen elements per multiply by a zero-or-mult vector.
void masked_scale(const uint8_t* bits, const float* in, float mult, float* out, int64_t count, bool accumulate);

// Dropout of the rows of a (*, cols) input: `row_bytes` regenerates the keep bits of one row (one
// byte per group of 8 flat elements), `apply` multiplies a row by its multipliers (0 or 1/(1-p))
// through a byte -> 8 multipliers table, so the per-element work is a vectorisable multiply.
template <typename acc_t>
class RowDropout {
 public:
  RowDropout(const DropoutSpec& spec, int64_t cols) : spec_(spec), cols_(cols), table_(256) {
    const acc_t scale = static_cast<acc_t>(spec.scale);
    for (int byte = 0; byte < 256; ++byte) {
      for (int lane = 0; lane < kLanesPerCall; ++lane) table_[byte][lane] = ((byte >> lane) & 1) ? scale : acc_t(0);
    }
  }

  // Size of the byte buffer `row_bytes` fills: the groups one row can touch.
  int64_t bytes_per_row() const { return cols_ / kLanesPerCall + 2; }

  void row_bytes(int64_t row, uint8_t* bytes) const {
    if (cols_ == 0) return;
    const uint64_t start = row_start(row);
    const uint64_t first = start / kLanesPerCall, last = (start + cols_ - 1) / kLanesPerCall;
    keep_bytes(spec_.seed, first, static_cast<int64_t>(last - first + 1), spec_.threshold, bytes);
  }

  // out[k] = factor * in[k * in_stride] * multiplier(row, k) for k in [0, cols), given the row's
  // keep bytes from `row_bytes`; with `accumulate`, out[k] += that (in acc_t).
  template <typename in_t, typename out_t>
  void apply(int64_t row, const uint8_t* bytes, const in_t* in, int64_t in_stride, acc_t factor, out_t* out,
             bool accumulate) const {
    const uint64_t start = row_start(row);
    const int64_t head = std::min<int64_t>(cols_, (kLanesPerCall - static_cast<int64_t>(start % kLanesPerCall)) %
                                                      kLanesPerCall);
    auto put = [&](int64_t k, acc_t v) {
      out[k] = static_cast<out_t>(accumulate ? static_cast<acc_t>(out[k]) + v : v);
    };
    auto one = [&](int64_t k, const std::array<acc_t, kLanesPerCall>& mult, int lane) {
      put(k, factor * static_cast<acc_t>(in[k * in_stride]) * mult[lane]);
    };
    int64_t k = 0;
    for (; k < head; ++k) one(k, table_[bytes[0]], static_cast<int>((start + k) % kLanesPerCall));
    const uint8_t* byte = bytes + (head > 0 ? 1 : 0);  // from here on, column k starts a group
    if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float> && std::is_same_v<acc_t, float>) {
      if (in_stride == 1) {
        masked_scale(byte, in + k, factor * static_cast<float>(spec_.scale), out + k, cols_ - k, accumulate);
        return;
      }
    }
    if (in_stride == 1) {
      for (; k + kLanesPerCall <= cols_; k += kLanesPerCall, ++byte) {
        const acc_t* mult = table_[*byte].data();
        for (int j = 0; j < kLanesPerCall; ++j) {
          put(k + j, factor * static_cast<acc_t>(in[k + j]) * mult[j]);
        }
      }
    } else {
      for (; k + kLanesPerCall <= cols_; k += kLanesPerCall, ++byte) {
        for (int j = 0; j < kLanesPerCall; ++j) one(k + j, table_[*byte], j);
      }
    }
    for (int lane = 0; k < cols_; ++k, ++lane) one(k, table_[*byte], lane);
  }

 private:
  uint64_t row_start(int64_t row) const { return static_cast<uint64_t>(row) * static_cast<uint64_t>(cols_); }

  DropoutSpec spec_;
  int64_t cols_;
  std::vector<std::array<acc_t, kLanesPerCall>> table_;
};

}  // namespace cpu
}  // namespace lora_kernels
