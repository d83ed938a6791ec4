// SPDX-License-Identifier: Apache-2.0
// A mixed batch on the CPU (docs/design.md §10): every row m of x has its own adapter ids[m]
// (-1: base only). The rows arrive grouped by adapter (`order`, `starts`: lora_kernels.contract.
// group_rows); each group is cut into chunks of kChunkRows rows, the chunks run in parallel, and a
// chunk gathers its rows of x once, computes its shrink and expand with its adapter's A and B, and
// writes its rows of y as bias + s·xa·Bᵀ. The base GEMM then adds x·W₀ᵀ onto all M rows at once
// (BLAS beta = 1), as the single-adapter kernel does. No Python loop over adapters, no M x K copy.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace lora_kernels {
namespace cpu {
namespace {

// Rows per chunk: enough for the chunk's two products to be GEMMs, not call overhead.
constexpr int64_t kChunkRows = 128;

struct Chunk {
  int64_t adapter;  // -1: base rows
  int64_t begin;    // positions in `order`
  int64_t end;
};

// The chunks of every group, in group order: [starts[g], starts[g + 1]) is adapter g - 1's group.
std::vector<Chunk> make_chunks(const at::Tensor& starts) {
  const int64_t* s = starts.const_data_ptr<int64_t>();
  std::vector<Chunk> chunks;
  for (int64_t g = 0; g + 1 < starts.numel(); ++g) {
    for (int64_t b = s[g]; b < s[g + 1]; b += kChunkRows) chunks.push_back({g - 1, b, std::min(s[g + 1], b + kChunkRows)});
  }
  return chunks;
}

std::tuple<at::Tensor, at::Tensor> per_row_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                       const at::Tensor& lora_B, at::ArrayRef<double> scalings,
                                                       const at::Tensor& order, const at::Tensor& starts) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel, not a graph (as fused_forward_cpu)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "lora_kernels: x must be a 2-D (M, K) CPU tensor, got ", x.sizes());
  const int64_t m_size = x.size(0), k_size = x.size(1);
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == k_size && lora_A.size(0) >= 1 && lora_A.is_contiguous(),
              "lora_kernels: lora_A must be a contiguous (T, r, K=", k_size, "), got ", lora_A.sizes());
  const int64_t count = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == count && lora_B.size(2) == r && lora_B.is_contiguous(),
              "lora_kernels: lora_B must be a contiguous (T=", count, ", N, r=", r, "), got ", lora_B.sizes());
  const int64_t n_size = lora_B.size(1);
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == n_size && weight->size(1) == k_size,
                "lora_kernels: weight must be (N=", n_size, ", K=", k_size, "), got ", weight->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_size && bias->is_contiguous(),
                "lora_kernels: bias must be a contiguous (N=", n_size, ",), got ", bias->sizes());
  }
  for (const auto& [name, t] : {std::pair<const char*, c10::optional<at::Tensor>>{"weight", weight}, {"bias", bias},
                                {"lora_A", lora_A}, {"lora_B", lora_B}}) {
    if (t.has_value()) {
      TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device().is_cpu(), "lora_kernels: ", name,
                  " must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ", t->scalar_type(), " on ", t->device());
    }
  }
  TORCH_CHECK(static_cast<int64_t>(scalings.size()) == count, "lora_kernels: scalings must hold T=", count,
              " values, got ", scalings.size());
  TORCH_CHECK(order.dim() == 1 && order.size(0) == m_size && order.scalar_type() == at::kLong && order.is_contiguous(),
              "lora_kernels: order must be a contiguous int64 (M=", m_size, ",), got ", order.sizes());
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == count + 2 && starts.scalar_type() == at::kLong &&
                  starts.is_contiguous(),
              "lora_kernels: starts must be a contiguous int64 (T+2=", count + 2, ",), got ", starts.sizes());
  const int64_t* s = starts.const_data_ptr<int64_t>();
  TORCH_CHECK(s[0] == 0 && s[count + 1] == m_size, "lora_kernels: starts must run from 0 to M=", m_size);
  for (int64_t g = 0; g <= count; ++g) {
    TORCH_CHECK(s[g] <= s[g + 1], "lora_kernels: starts must be non-decreasing, got starts[", g, "] = ", s[g],
                " > starts[", g + 1, "] = ", s[g + 1]);
  }
  const double* scale = scalings.data();
  const int64_t* rows = order.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < m_size; ++i) {  // the rows are written through these indices: bound them
    TORCH_CHECK(rows[i] >= 0 && rows[i] < m_size, "lora_kernels: order[", i, "] = ", rows[i], " is not a row of x");
  }

  at::Tensor y = at::empty({m_size, n_size}, x.options());
  at::Tensor xa = at::zeros({m_size, r}, x.options());
  const std::vector<Chunk> chunks = make_chunks(starts);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor a_acc = lora_A.to(acc_type), b_acc = lora_B.to(acc_type);  // no copy for fp32/fp64
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "per_row_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    scalar_t* xa_data = xa.data_ptr<scalar_t>();
    const acc_t* bias_data = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      at::AutoDispatchBelowADInplaceOrView below;  // thread-local: set again in each worker
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t n_rows = ch.end - ch.begin;
        if (ch.adapter < 0) {  // base rows: y = bias (the base GEMM adds x·W₀ᵀ below)
          for (int64_t i = 0; i < n_rows; ++i) {
            scalar_t* out = y_data + rows[ch.begin + i] * n_size;
            for (int64_t j = 0; j < n_size; ++j) out[j] = bias_data ? static_cast<scalar_t>(bias_data[j]) : scalar_t(0);
          }
          continue;
        }
        // This chunk's rows of x, gathered once in the accumulation type.
        at::Tensor xs = at::empty({n_rows, k_size}, a_acc.options());
        acc_t* xs_data = xs.data_ptr<acc_t>();
        for (int64_t i = 0; i < n_rows; ++i) {
          const scalar_t* src = x_data + rows[ch.begin + i] * sx0;
          for (int64_t k = 0; k < k_size; ++k) xs_data[i * k_size + k] = static_cast<acc_t>(src[k * sx1]);
        }
        // xa rounded to x's dtype, as the single-adapter kernel's expand reads it
        const at::Tensor xa_c = at::mm(xs, a_acc[ch.adapter].t()).to(x.scalar_type());
        const at::Tensor xa_r = xa_c.to(acc_type), b_t = b_acc[ch.adapter].t();
        // a fresh (rows, N): bias + s·xa·Bᵀ (never an expanded bias made "contiguous": that is the bias itself)
        const at::Tensor out = bias_acc.defined() ? at::addmm(bias_acc, xa_r, b_t, 1.0, scale[ch.adapter])
                                                  : at::mm(xa_r, b_t).mul_(scale[ch.adapter]);
        const acc_t* out_data = out.const_data_ptr<acc_t>();
        const scalar_t* xa_c_data = xa_c.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < n_rows; ++i) {
          const int64_t row = rows[ch.begin + i];
          scalar_t* y_row = y_data + row * n_size;
          for (int64_t j = 0; j < n_size; ++j) y_row[j] = static_cast<scalar_t>(out_data[i * n_size + j]);
          std::copy(xa_c_data + i * r, xa_c_data + (i + 1) * r, xa_data + row * r);
        }
      }
    });
  });
  if (weight.has_value()) y.addmm_(x, weight->t());
  return {y, xa};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("per_row_forward", &per_row_forward_cpu); }

}  // namespace cpu
}  // namespace lora_kernels
