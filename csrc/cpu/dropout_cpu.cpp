#include "cpu/dropout_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dropout.h"

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
  spec.active = true;
  spec.seed = static_cast<uint64_t>(seed->item<int64_t>());
  spec.threshold = dropout_threshold(dropout_p);
  spec.scale = 1.0 / (1.0 - dropout_p);
  return spec;
}

namespace {

// Keep-bits of `count` consecutive Philox groups from `first`. Compiled for several ISAs and
// picked at run time, so the 32x32->64 multiplies of Philox vectorise where the CPU allows.
__attribute__((target_clones("avx512f", "avx2", "default"))) void keep_bits_batch(
    uint64_t seed, uint64_t first, int64_t count, uint32_t threshold, uint8_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<uint8_t>(keep_bits8(seed, first + static_cast<uint64_t>(i), threshold));
  }
}

// Calls visit(k, kept) for every column of `row`, a batch of groups at a time: the Philox bits
// of a batch first (vectorised), then a branch-free lane lookup per column.
template <typename Visit>
void for_each_keep(const DropoutSpec& spec, int64_t row, int64_t cols, Visit visit) {
  constexpr int64_t kBatch = 256;  // groups per batch: 2048 columns
  uint8_t bits[kBatch];
  const uint64_t start = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
  for (int64_t k0 = 0; k0 < cols; k0 += kBatch * kLanesPerCall - kLanesPerCall) {
    const int64_t k1 = std::min<int64_t>(cols, k0 + kBatch * kLanesPerCall - kLanesPerCall);
    const uint64_t first = (start + k0) / kLanesPerCall;
    const uint64_t last = (start + k1 - 1) / kLanesPerCall;  // at most kBatch groups
    keep_bits_batch(spec.seed, first, static_cast<int64_t>(last - first + 1), spec.threshold, bits);
    for (int64_t k = k0; k < k1; ++k) {
      const uint64_t flat = start + k;
      visit(k, (bits[flat / kLanesPerCall - first] >> (flat % kLanesPerCall)) & 1u);
    }
  }
}

}  // namespace

template <typename acc_t>
void fill_row_multiplier(const DropoutSpec& spec, int64_t row, int64_t cols, acc_t* out) {
  const acc_t scale = static_cast<acc_t>(spec.scale);
  for_each_keep(spec, row, cols, [&](int64_t k, uint32_t kept) { out[k] = scale * static_cast<acc_t>(kept); });
}

template void fill_row_multiplier<float>(const DropoutSpec&, int64_t, int64_t, float*);
template void fill_row_multiplier<double>(const DropoutSpec&, int64_t, int64_t, double*);

void fill_row_keep(const DropoutSpec& spec, int64_t row, int64_t cols, bool* out) {
  for_each_keep(spec, row, cols, [&](int64_t k, uint32_t kept) { out[k] = kept != 0; });
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
    for (int64_t m = begin; m < end; ++m) fill_row_keep(spec, m, cols, data + m * cols);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("dropout_keep_mask", &dropout_keep_mask_cpu); }

}  // namespace cpu
}  // namespace lora_kernels
