// SPDX-License-Identifier: Apache-2.0
// decode_4bit on the CPU (schema and layout: csrc/schema.h kDecode4bit): the tile decoder of the
// bitsandbytes 4-bit base (lora_kernels/base_weights/nf4.py). Rows in parallel; within a row, one
// absmax per run of a block, one table lookup per element, the product in float32 rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace lora_kernels {
namespace cpu {
namespace {

// Elements per parallel task: torch's grain size (a task shorter than this costs more to hand out).
constexpr int64_t kGrainElements = 1 << 15;

template <typename scalar_t>
void decode_rows(const uint8_t* packed, const float* absmax, const float* code, int64_t first, int64_t row_stride,
                 int64_t blocksize, scalar_t* out, int64_t rows, int64_t cols) {
  // Both codes of each byte side by side (high nibble first): an even-aligned pair of elements is
  // one lookup of two adjacent floats.
  float pairs[512];
  for (int b = 0; b < 256; ++b) {
    pairs[2 * b] = code[b >> 4];
    pairs[2 * b + 1] = code[b & 0xF];
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = first + r * row_stride;  // flat index of out[r][0]
      scalar_t* o = out + r * cols;
      int64_t c = 0;
      while (c < cols) {
        const int64_t block = (base + c) / blocksize;
        const int64_t end = std::min(cols, (block + 1) * blocksize - base);
        const float scale = absmax[block];
        if ((base + c) & 1) {  // a run that starts on a low nibble
          o[c] = static_cast<scalar_t>(code[packed[(base + c) >> 1] & 0xF] * scale);
          ++c;
        }
        const uint8_t* bytes = packed + ((base + c) >> 1);
        const int64_t npairs = (end - c) / 2;
        for (int64_t j = 0; j < npairs; ++j) {
          const float* v = pairs + 2 * bytes[j];
          o[c + 2 * j] = static_cast<scalar_t>(v[0] * scale);
          o[c + 2 * j + 1] = static_cast<scalar_t>(v[1] * scale);
        }
        c += 2 * npairs;
        if (c < end) {  // a run that ends on a high nibble
          o[c] = static_cast<scalar_t>(code[packed[(base + c) >> 1] >> 4] * scale);
          ++c;
        }
      }
    }
  });
}

void decode_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t first,
                     int64_t row_stride, int64_t blocksize, const at::Tensor& out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "lora_kernels::decode_4bit: packed must be contiguous uint8, got ", packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(),
              "lora_kernels::decode_4bit: absmax must be contiguous float32, got ", absmax.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "lora_kernels::decode_4bit: code must be contiguous float32 (16,), got ", code.sizes());
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "lora_kernels::decode_4bit: out must be a contiguous (R, C) tensor");
  TORCH_CHECK(blocksize >= 1 && first >= 0 && row_stride >= out.size(1),
              "lora_kernels::decode_4bit: need blocksize >= 1, first >= 0, row_stride >= C");
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t last = first + (rows - 1) * row_stride + cols - 1;  // the highest flat index read
  TORCH_CHECK(last / 2 < packed.numel() && last / blocksize < absmax.numel(),
              "lora_kernels::decode_4bit: elements up to flat index ", last, " are outside packed (",
              packed.numel(), " bytes) or absmax (", absmax.numel(), " blocks)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "decode_4bit", [&] {
    decode_rows<scalar_t>(packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), code.const_data_ptr<float>(),
                          first, row_stride, blocksize, out.data_ptr<scalar_t>(), rows, cols);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("decode_4bit", &decode_4bit_cpu); }

}  // namespace cpu
}  // namespace lora_kernels
