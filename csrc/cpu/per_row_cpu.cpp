// SPDX-License-Identifier: Apache-2.0
// A mixed batch on the CPU (docs/design.md §10): every row m of x has its own adapter ids[m]
// (-1: base only). The rows arrive grouped by adapter (`order`, `starts`: group_rows below);
// each group is cut into chunks that run in parallel, and each chunk writes its rows of y once:
// bias + s·xa·Bᵀ (the bias alone on base rows). A chunk whose rows are consecutive rows of x (a
// sequence of a mixed batch) works on views of x, xa and y, with no copy; a chunk of scattered
// rows (decode: one token per sequence) gathers its rows of x once and scatters its rows of y
// back. The base GEMM then adds x·W₀ᵀ onto all M rows at once (BLAS beta = 1), as the
// single-adapter kernel does. No Python loop over adapters, no M x K copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace lora_kernels {
namespace cpu {
namespace {

// Rows per chunk: enough for the chunk's two products to be GEMMs, not call overhead.
constexpr int64_t kChunkRows = 128;
// Shorter runs of consecutive rows are pooled into gathered chunks (a GEMM per run would be mostly
// call overhead).
constexpr int64_t kMinRunRows = 8;

struct Chunk {
  int64_t adapter;  // -1: base-only rows
  int64_t begin;    // positions in `order`
  int64_t end;
  bool contiguous;  // rows order[begin..end) are consecutive rows of x
};

// The chunks of every group: [starts[g], starts[g + 1]) holds the rows of adapter g - 1 (g = 0:
// base-only rows) in increasing order (a stable sort), so a run of consecutive rows is a run of
// consecutive positions.
std::vector<Chunk> make_chunks(const at::Tensor& starts, const int64_t* rows) {
  const int64_t* s = starts.const_data_ptr<int64_t>();
  std::vector<Chunk> chunks;
  for (int64_t g = 0; g + 1 < starts.numel(); ++g) {
    const int64_t adapter = g - 1, end = s[g + 1];
    int64_t gathered = -1;  // where the open gathered chunk begins, -1: none
    auto close_gathered = [&](int64_t upto) {
      if (gathered >= 0) chunks.push_back({adapter, gathered, upto, false});
      gathered = -1;
    };
    for (int64_t p = s[g]; p < end;) {
      int64_t q = p + 1;
      while (q < end && q - p < kChunkRows && rows[q] == rows[q - 1] + 1) ++q;
      if (q - p >= kMinRunRows) {
        close_gathered(p);
        chunks.push_back({adapter, p, q, true});
      } else {
        if (gathered < 0) gathered = p;
        if (q - gathered >= kChunkRows) close_gathered(q);
      }
      p = q;
    }
    close_gathered(end);
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

  // Every row of y is written once by its chunk: bias + s·xa·Bᵀ (bias alone on base rows); the
  // base GEMM then adds x·W₀ᵀ onto all M rows with beta = 1, reading the LoRA term as its C tile
  // instead of a second pass over y (without a dense weight the caller adds the base product).
  at::Tensor y = at::empty({m_size, n_size}, x.options());
  at::Tensor xa = at::zeros({m_size, r}, x.options());
  const std::vector<Chunk> chunks = make_chunks(starts, rows);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below;  // thread-local: set again in each worker
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t n_rows = ch.end - ch.begin;
      const at::Tensor idx = order.narrow(0, ch.begin, n_rows);
      at::Tensor y_rows = ch.contiguous ? y.narrow(0, rows[ch.begin], n_rows) : at::empty({n_rows, n_size}, y.options());
      if (ch.adapter < 0) {
        if (bias.has_value()) {
          y_rows.copy_(*bias);  // broadcast over the rows
        } else {
          y_rows.zero_();
        }
      } else {
        const at::Tensor a_t = lora_A[ch.adapter].t(), b_t = lora_B[ch.adapter].t();
        const double s_t = scale[ch.adapter];
        at::Tensor xa_rows = ch.contiguous ? xa.narrow(0, rows[ch.begin], n_rows) : at::Tensor();
        if (ch.contiguous) {
          at::mm_out(xa_rows, x.narrow(0, rows[ch.begin], n_rows), a_t);
        } else {
          xa_rows = at::mm(x.index_select(0, idx), a_t);
          xa.index_copy_(0, idx, xa_rows);
        }
        if (bias.has_value()) {
          at::addmm_out(y_rows, *bias, xa_rows, b_t, 1.0, s_t);
        } else {
          at::addmm_out(y_rows, y_rows, xa_rows, b_t, 0.0, s_t);  // beta = 0: y_rows' contents ignored
        }
      }
      if (!ch.contiguous) y.index_copy_(0, idx, y_rows);
    }
  });
  if (weight.has_value()) y.addmm_(x, weight->t());
  return {y, xa};
}

// A counting sort of the ids: stable, O(M + count), on the calling thread.
std::tuple<at::Tensor, at::Tensor> group_rows_cpu(const at::Tensor& ids, int64_t count) {
  TORCH_CHECK_VALUE(count >= 0, "group_rows: count must be >= 0, got ", count);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "adapter_ids must be an int32 or int64 tensor, got ", ids.scalar_type());
  const at::Tensor flat = ids.reshape(-1).to(at::kLong).contiguous();  // no copy for contiguous int64
  const int64_t m_size = flat.numel();
  const int64_t* id = flat.const_data_ptr<int64_t>();
  at::Tensor starts = at::zeros({count + 2}, flat.options());
  int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t m = 0; m < m_size; ++m) {
    TORCH_CHECK_VALUE(id[m] >= -1 && id[m] < count, "adapter_ids must be in [-1, ", count, ") (-1: base only; ",
                      count, " adapters), got adapter_ids[", m, "] = ", id[m]);
    ++st[id[m] + 2];  // st[g + 1] ends as the end of group g (base rows: g = 0)
  }
  for (int64_t g = 2; g < count + 2; ++g) st[g] += st[g - 1];
  at::Tensor order = at::empty({m_size}, flat.options());
  int64_t* out = order.data_ptr<int64_t>();
  std::vector<int64_t> next(st, st + count + 1);  // the next free position of each group
  for (int64_t m = 0; m < m_size; ++m) out[next[id[m] + 1]++] = m;
  return {order, starts};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("per_row_forward", &per_row_forward_cpu);
  m.impl("group_rows", &group_rows_cpu);
}

}  // namespace cpu
}  // namespace lora_kernels
