// SPDX-License-Identifier: Apache-2.0
// Fused LoRA forward and backward on the CPU (docs/design.md §1, §3, §5), for one adapter
// (fused_forward/fused_backward) or several summed in one layer (the _stacked ops: their ranks
// concatenated, one scaling and dropout each). The single-adapter ops are the one-adapter case of
// the same kernels.
//
// The large GEMMs go to ATen/BLAS; everything touching the dropout mask runs in row blocks
// (at::parallel_for) whose dropped rows live only in a small per-thread buffer, so no M x K
// mask or dropped copy of x is ever materialised. The LoRA term joins the base GEMM's output
// through BLAS beta = 1 accumulation instead of another M x N pass. The rank-r products of a
// block go to thin_matmul's AVX-512 loops for fp32 (ATen's per-call packing of A or B costs as
// much as the product on a 32-row block) and to ATen otherwise.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/dropout_cpu.h"
#include "cpu/thin_matmul.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 32;  // rows per block: a 32 x K fp32 buffer stays in L2 for K <= 8192

int64_t num_blocks(int64_t m_size) { return (m_size + kRowBlock - 1) / kRowBlock; }

// Operands whose rows a thin_matmul tile keeps live all at once (Bᵀ, A, the partial sums) get rows
// this many floats longer than their width: rows 2^k floats apart would all share one L1 set.
constexpr int64_t kRowPad = 16;

// t (rows, cols) copied into fp32 rows of cols + kRowPad floats; returned as the (rows, cols) view.
at::Tensor padded_fp32(const at::Tensor& t) {
  at::Tensor out = at::empty({t.size(0), t.size(1) + kRowPad}, t.options().dtype(at::kFloat));
  return out.narrow(1, 0, t.size(1)).copy_(t);
}

// Zeroed per-chunk partial sums (chunks, rows, cols) in the accumulation type, rows padded.
at::Tensor padded_partials(int64_t chunks, int64_t rows, int64_t cols, at::ScalarType acc_type) {
  return at::zeros({chunks, rows, cols + kRowPad}, at::TensorOptions().dtype(acc_type)).narrow(2, 0, cols);
}

// At most one chunk of consecutive row blocks per thread.
int64_t num_chunks(int64_t m_size) { return std::min<int64_t>(num_blocks(m_size), at::get_num_threads()); }

// Calls fn(chunk, begin, rows) for every row block of [0, m_size), the chunks of num_chunks() in
// parallel, each chunk's blocks in order. Per-chunk partial sums, added in chunk order after,
// make the reductions deterministic for a given thread count without float atomics.
template <typename Fn>
void for_row_blocks_by_chunk(int64_t m_size, const Fn& fn) {
  const int64_t n_blocks = num_blocks(m_size), n_chunks = num_chunks(m_size);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set again in each worker
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t b = c * n_blocks / n_chunks; b < (c + 1) * n_blocks / n_chunks; ++b) {
        const int64_t begin = b * kRowBlock;
        fn(c, begin, std::min(m_size, begin + kRowBlock) - begin);
      }
    }
  });
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lora_kernels: ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "lora_kernels: the cpu kernels need CPU tensors, got ", name, " on ", t.device());
}

// Checks shared by forward and backward; returns N: the base weight's rows when there is one (as
// before weight was optional), else lora_B's, which bias and grad_y are then checked against.
int64_t check_common(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_A,
                     const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2, "lora_kernels: x must be 2-D (M, K), got ", x.dim(), "-D");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(1) == x.size(1), "lora_kernels: weight must be (N, K=", x.size(1),
                "), got ", weight->sizes());
  }
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1) && lora_A.size(0) >= 1,
              "lora_kernels: lora_A must be (r >= 1, K=", x.size(1), "), got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  if (weight.has_value()) {
    TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight->size(0) && lora_B.size(1) == r,
                "lora_kernels: lora_B must be (N=", weight->size(0), ", r=", r, "), got ", lora_B.sizes());
  } else {
    TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(1) == r, "lora_kernels: lora_B must be (N, r=", r, "), got ",
                lora_B.sizes());
  }
  if (weight.has_value()) check_like_x(*weight, "weight", x);
  check_like_x(lora_A, "lora_A", x);
  check_like_x(lora_B, "lora_B", x);
  TORCH_CHECK(x.device().is_cpu(), "lora_kernels: the cpu kernels need CPU tensors, got x on ", x.device());
  return weight.has_value() ? weight->size(0) : lora_B.size(0);
}

// One adapter of a call: its rank columns [offset, offset + rank) of xa (rows of lora_A, columns
// of lora_B), its scaling and its dropout. A single-adapter call is one adapter spanning all r.
struct Adapter {
  int64_t offset;
  int64_t rank;
  double scaling;
  DropoutSpec dropout;
};
using Adapters = std::vector<Adapter>;

Adapters single_adapter(int64_t r, double scaling, double dropout_p, const c10::optional<at::Tensor>& seed) {
  return {Adapter{0, r, scaling, make_dropout_spec(seed, dropout_p)}};
}

// The adapters of a stacked call, checked: adapter t owns the ranks[t] columns after those of
// adapters 0..t-1 and drops iff seeds is given and dropout_ps[t] > 0, under seeds[t] (the
// single-adapter rule, so its mask is that of a one-adapter call with seed seeds[t:t+1]).
Adapters stacked_adapters(int64_t r_total, at::IntArrayRef ranks, at::ArrayRef<double> scalings,
                          at::ArrayRef<double> dropout_ps, const c10::optional<at::Tensor>& seeds) {
  const int64_t n_adapters = static_cast<int64_t>(ranks.size());
  TORCH_CHECK(n_adapters >= 1 && scalings.size() == ranks.size() && dropout_ps.size() == ranks.size(),
              "lora_kernels: ranks, scalings and dropout_ps must have one entry per adapter (at least one), got ",
              ranks.size(), ", ", scalings.size(), " and ", dropout_ps.size(), " entries");
  if (seeds.has_value()) {
    TORCH_CHECK(seeds->scalar_type() == at::kLong && seeds->dim() == 1 && seeds->size(0) == n_adapters &&
                    seeds->device().is_cpu(),
                "lora_kernels: seeds must be an int64 CPU tensor of shape (T=", n_adapters, ",), got ",
                seeds->scalar_type(), " ", seeds->sizes(), " on ", seeds->device());
  }
  Adapters adapters;
  int64_t offset = 0;
  for (int64_t t = 0; t < n_adapters; ++t) {
    const double p = dropout_ps[t];
    TORCH_CHECK(ranks[t] >= 1, "lora_kernels: ranks[", t, "] must be >= 1, got ", ranks[t]);
    TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_kernels: dropout_ps[", t, "] must be in [0, 1), got ", p);
    TORCH_CHECK(dropout_threshold(p) < 65536, "lora_kernels: dropout_ps[", t, "] = ", p,
                " drops every element (its 16-bit threshold rounds to 2^16); serve that adapter as p = 1");
    const bool drops = seeds.has_value() && p > 0.0;
    adapters.push_back({offset, ranks[t], scalings[t], drops ? make_dropout_spec(seeds->narrow(0, t, 1), p)
                                                             : DropoutSpec{}});
    offset += ranks[t];
  }
  TORCH_CHECK(offset == r_total, "lora_kernels: sum(ranks) = ", offset, " must equal R = ", r_total,
              ", lora_A's rows");
  return adapters;
}

// The scaling all adapters share, or none. A shared one is the expand's alpha (the single-adapter
// op's bits); differing ones are folded into the rows of the expand's Bᵀ.
std::optional<double> shared_scaling(const Adapters& adapters) {
  for (const Adapter& a : adapters) {
    if (a.scaling != adapters.front().scaling) return std::nullopt;
  }
  return adapters.front().scaling;
}

// (R,) the scaling of each rank column, in `type`.
at::Tensor rank_scalings(const Adapters& adapters, int64_t r_total, at::ScalarType type) {
  std::vector<double> per_rank(r_total);
  for (const Adapter& a : adapters) std::fill_n(per_rank.begin() + a.offset, a.rank, a.scaling);
  return at::tensor(per_rank, at::TensorOptions().dtype(at::kDouble)).to(type);
}

// Adapters [first, end) whose A-products read the same source rows: one adapter with dropout (its
// own dropped rows), or a run of consecutive ones without (x's rows), whose shrink and grad_A then
// take one pass over a block instead of one each. They own rank columns [offset, offset + width).
struct SourceGroup {
  size_t first, end;
  int64_t offset, width;
};

std::vector<SourceGroup> source_groups(const Adapters& adapters) {
  std::vector<SourceGroup> groups;
  for (size_t t = 0; t < adapters.size(); ++t) {
    const bool joins = !groups.empty() && !adapters[t].dropout.active && !adapters[groups.back().first].dropout.active;
    if (joins) {
      groups.back().end = t + 1;
      groups.back().width += adapters[t].rank;
    } else {
      groups.push_back({t, t + 1, adapters[t].offset, adapters[t].rank});
    }
  }
  return groups;
}

template <typename acc_t>
std::vector<RowDropout<acc_t>> row_dropouts(const Adapters& adapters, int64_t cols) {
  std::vector<RowDropout<acc_t>> out;
  for (const Adapter& a : adapters) out.emplace_back(a.dropout, cols);
  return out;
}

// Per-thread buffers for one row block of x: dropout(x) rows, g·A rows, the rows' keep bits, and
// grad_x's LoRA sum when grad_x is not in the accumulation type.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> dropped, term, sum;
  std::vector<uint8_t> bytes;
};

// The keep bits of rows [begin, begin + rows), in `sc` (row i at i · bytes_per_row()).
template <typename acc_t>
const uint8_t* keep_rows(const RowDropout<acc_t>& dropout, int64_t begin, int64_t rows, RowScratch<acc_t>& sc) {
  const int64_t row_bytes = dropout.bytes_per_row();
  sc.bytes.resize(kRowBlock * row_bytes);
  for (int64_t i = 0; i < rows; ++i) dropout.row_bytes(begin + i, sc.bytes.data() + i * row_bytes);
  return sc.bytes.data();
}

// Rows [begin, begin + rows) of dropout(x) in acc_t, (rows, K). With dropout on they are built
// in `sc` (keep bits kept there for reuse); without, they are x's rows themselves.
template <typename scalar_t, typename acc_t>
at::Tensor dropout_rows(const at::Tensor& x, const DropoutSpec& spec, const RowDropout<acc_t>& dropout,
                        int64_t begin, int64_t rows, RowScratch<acc_t>& sc) {
  const at::ScalarType acc_type = at::CppTypeToScalarType<acc_t>::value;
  if (!spec.active) return x.narrow(0, begin, rows).to(acc_type);
  const int64_t k_size = x.size(1), row_bytes = dropout.bytes_per_row();
  sc.dropped.resize(kRowBlock * k_size);
  const uint8_t* keep = keep_rows(dropout, begin, rows, sc);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) {
    dropout.apply(begin + i, keep + i * row_bytes, x_data + (begin + i) * x.stride(0), x.stride(1), acc_t(1),
                  sc.dropped.data() + i * k_size, false);
  }
  return at::from_blob(sc.dropped.data(), {rows, k_size}, at::TensorOptions().dtype(acc_type));
}

// fp32 row blocks with a unit inner stride go to the thin_matmul loops; dropped rows always have
// one (contiguous scratch), x's own rows (an adapter without dropout) when x does.
template <typename scalar_t>
bool use_thin(const at::Tensor& x, const Adapters& adapters) {
  const bool all_dropped = std::all_of(adapters.begin(), adapters.end(), [](const Adapter& a) {
    return a.dropout.active;
  });
  return std::is_same_v<scalar_t, float> && thin_matmul_enabled() && (all_dropped || x.stride(1) == 1);
}

// The LoRA half of forward, one pass over row blocks of x: per block, each adapter's
// xa[:, seg] = D(x)·A[seg]ᵀ (its dropped rows built in the thread's scratch; adapters without
// dropout side by side in one product, `source_groups`), then one expand
// y = bias + xa·(scaled Bᵀ) over all R columns, each block of y written to memory once while its
// xa rows are fresh.
template <typename scalar_t>
at::Tensor lora_forward_rows(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, const Adapters& adapters, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc_type = at::CppTypeToScalarType<acc_t>::value;
  const int64_t m_size = x.size(0), k_size = x.size(1), n_size = y.size(1), r_total = lora_A.size(0);
  const at::Tensor a_t = lora_A.to(acc_type).t();
  at::Tensor xa = at::empty({m_size, r_total}, x.options());
  const std::vector<RowDropout<acc_t>> dropouts = row_dropouts<acc_t>(adapters, k_size);
  const std::vector<SourceGroup> groups = source_groups(adapters);
  std::vector<RowScratch<acc_t>> scratch(num_chunks(m_size));
  const bool thin = use_thin<scalar_t>(x, adapters);
  const std::optional<double> shared = shared_scaling(adapters);
  const double alpha = shared.value_or(1.0);
  // The loops' operands: Aᵀ (K, R) contiguous, Bᵀ (R, N) with padded rows, bias contiguous.
  // Bᵀ is this call's own copy (fp32 for the loops, acc_t when scalings are folded into it).
  const at::Tensor a_t_rows = thin ? a_t.contiguous() : a_t;
  at::Tensor b_t = thin ? padded_fp32(lora_B.t()) : lora_B.t();
  if (!shared.has_value()) {
    const at::Tensor col = rank_scalings(adapters, r_total, acc_type).unsqueeze(1);
    b_t = thin ? b_t.mul_(col) : b_t.to(acc_type).mul(col);
  }
  const at::Tensor bias_rows = thin && bias.has_value() ? bias->contiguous() : at::Tensor();
  for_row_blocks_by_chunk(m_size, [&](int64_t c, int64_t begin, int64_t rows) {
    at::Tensor xa_blk = xa.narrow(0, begin, rows);
    at::Tensor y_blk = y.narrow(0, begin, rows);
    for (const SourceGroup& grp : groups) {
      const at::Tensor src = dropout_rows<scalar_t, acc_t>(x, adapters[grp.first].dropout, dropouts[grp.first], begin,
                                                           rows, scratch[c]);
      if (thin) {
        thin_matmul(rows, k_size, grp.width, src.const_data_ptr<float>(), src.stride(0),
                    a_t_rows.const_data_ptr<float>() + grp.offset, r_total, 1.0f, nullptr,
                    xa_blk.data_ptr<float>() + grp.offset, r_total, false);
        continue;
      }
      at::Tensor xa_cols = xa_blk.narrow(1, grp.offset, grp.width);
      const at::Tensor a_cols = a_t.narrow(1, grp.offset, grp.width);
      if (xa.scalar_type() == src.scalar_type()) {
        at::mm_out(xa_cols, src, a_cols);
      } else {
        xa_cols.copy_(at::mm(src, a_cols));
      }
    }
    if (thin) {
      thin_matmul(rows, r_total, n_size, xa_blk.const_data_ptr<float>(), r_total, b_t.const_data_ptr<float>(),
                  b_t.stride(0), static_cast<float>(alpha),
                  bias_rows.defined() ? bias_rows.const_data_ptr<float>() : nullptr, y_blk.data_ptr<float>(), n_size,
                  false);
      return;
    }
    if (shared.has_value()) {
      at::addmm_out(y_blk, y_blk, xa_blk, b_t, 0.0, alpha);  // beta = 0: y's old contents ignored
    } else {
      y_blk.copy_(at::mm(xa_blk.to(acc_type), b_t));  // scalings folded into Bᵀ (acc_t)
    }
    if (bias.has_value()) y_blk.add_(*bias);
  });
  return xa;
}

// The ATen calls of a kernel must not record autograd history, nor be autocast (an enclosing
// torch.autocast would lower the fp32 products of the calling thread's rows).
struct KernelGuards {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// Forward for checked inputs (check_common: N = n_size) and their adapters.
std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, int64_t n_size, const Adapters& adapters) {
  KernelGuards guards;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_size && bias->scalar_type() == x.scalar_type(),
                "lora_kernels: bias must be (N=", n_size, ",) of x's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  // y = bias + Σ s·xa·Bᵀ, then (with a weight) y += x·Wᵀ with beta = 1: the base GEMM reads the
  // LoRA term in its epilogue instead of a separate add pass over M x N.
  at::Tensor y = at::empty({x.size(0), n_size}, x.options());
  at::Tensor xa;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_forward_rows", [&] {
    xa = lora_forward_rows<scalar_t>(x, bias, lora_A, lora_B, adapters, y);
  });
  if (weight.has_value()) y.addmm_(x, weight->t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     const c10::optional<at::Tensor>& seed) {
  const int64_t n_size = check_common(x, weight, lora_A, lora_B);
  return lora_forward(x, weight, bias, lora_A, lora_B, n_size,
                      single_adapter(lora_A.size(0), scaling, dropout_p, seed));
}

std::tuple<at::Tensor, at::Tensor> fused_forward_stacked_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, at::IntArrayRef ranks, at::ArrayRef<double> scalings,
    at::ArrayRef<double> dropout_ps, const c10::optional<at::Tensor>& seeds) {
  const int64_t n_size = check_common(x, weight, lora_A, lora_B);
  return lora_forward(x, weight, bias, lora_A, lora_B, n_size,
                      stacked_adapters(lora_A.size(0), ranks, scalings, dropout_ps, seeds));
}

// g = dY·B (M, R, in the accumulation type) and grad_B = dYᵀ·xa (N, R) with each rank column
// scaled by its adapter's scaling, from one pass over dY: each row block of dY is read from
// memory once and hits L2 for its second product.
std::tuple<at::Tensor, at::Tensor> grad_y_products(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                   const at::Tensor& xa, const Adapters& adapters) {
  const int64_t m_size = grad_y.size(0), n_size = grad_y.size(1), r = lora_B.size(1);
  const at::ScalarType acc_type = at::toOpMathType(grad_y.scalar_type());
  const at::TensorOptions acc_opts = grad_y.options().dtype(acc_type);
  const at::Tensor b_acc = lora_B.to(acc_type).contiguous(), xa_acc = xa.to(acc_type).contiguous();
  at::Tensor g = at::empty({m_size, r}, acc_opts);
  at::Tensor partials = padded_partials(num_chunks(m_size), r, n_size, acc_type);  // (xaᵀ·dY) per chunk
  const bool thin = grad_y.scalar_type() == at::kFloat && thin_matmul_enabled() && grad_y.stride(1) == 1;
  for_row_blocks_by_chunk(m_size, [&](int64_t c, int64_t begin, int64_t rows) {
    if (thin) {
      const float* dy = grad_y.const_data_ptr<float>() + begin * grad_y.stride(0);
      thin_matmul(rows, n_size, r, dy, grad_y.stride(0), b_acc.const_data_ptr<float>(), r, 1.0f, nullptr,
                  g.data_ptr<float>() + begin * r, r, false);
      thin_matmul_t_accumulate(rows, r, n_size, xa_acc.const_data_ptr<float>() + begin * r, r, dy, grad_y.stride(0),
                              partials[c].data_ptr<float>(), partials.stride(1));
      return;
    }
    const at::Tensor dy_blk = grad_y.narrow(0, begin, rows).to(acc_type);
    at::Tensor g_blk = g.narrow(0, begin, rows);
    at::mm_out(g_blk, dy_blk, b_acc);
    partials[c].addmm_(xa_acc.narrow(0, begin, rows).t(), dy_blk);
  });
  const at::Tensor scales = rank_scalings(adapters, r, acc_type).unsqueeze(1);
  return {g, partials.sum(0).mul_(scales).t().contiguous().to(grad_y.scalar_type())};
}

// The x side of backward, one pass over row blocks of x; per block and adapter (its mask
// regenerated once per row; adapters without dropout side by side, `source_groups`):
// grad_A[seg] += s·g[:, seg]ᵀ·D(x) and, when wanted, the grad_x term
// s·D⊙(g[:, seg]·A[seg]) — the first adapter's written, the others' accumulated, in acc_t (in
// grad_x itself when it has that type, else in the thread's scratch, converted once per block).
// The base GEMM adds dY·W later.
template <typename scalar_t>
at::Tensor lora_backward_rows(const at::Tensor& x, const at::Tensor& g, const at::Tensor& lora_A,
                              const Adapters& adapters, at::Tensor* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m_size = x.size(0), k_size = x.size(1), r_total = lora_A.size(0);
  const at::ScalarType acc_type = at::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions acc_opts = at::TensorOptions().dtype(acc_type);
  const bool thin = use_thin<scalar_t>(x, adapters);
  const bool sum_in_grad_x = acc_type == x.scalar_type();
  // The thin loops apply keep bits themselves when every row of x starts a keep byte (K % 8 == 0)
  // and x's rows are contiguous: no dropped copy of a block, no masking pass over its dX term.
  const bool masked_in_place = k_size % kLanesPerCall == 0 && x.stride(1) == 1;
  const at::Tensor a_acc = thin ? padded_fp32(lora_A) : lora_A.to(acc_type).contiguous();
  const std::vector<RowDropout<acc_t>> dropouts = row_dropouts<acc_t>(adapters, k_size);
  const std::vector<SourceGroup> groups = source_groups(adapters);
  at::Tensor partials = padded_partials(num_chunks(m_size), r_total, k_size, acc_type);  // (gᵀ·D(x)) per chunk
  std::vector<RowScratch<acc_t>> scratch(partials.size(0));
  for_row_blocks_by_chunk(m_size, [&](int64_t c, int64_t begin, int64_t rows) {
    RowScratch<acc_t>& sc = scratch[c];
    const at::Tensor g_blk = g.narrow(0, begin, rows);
    at::Tensor sum;  // (rows, K) acc_t: grad_x's LoRA terms of this block
    if (grad_x != nullptr && sum_in_grad_x) {
      sum = grad_x->narrow(0, begin, rows);
    } else if (grad_x != nullptr) {
      sc.sum.resize(kRowBlock * k_size);
      sum = at::from_blob(sc.sum.data(), {rows, k_size}, acc_opts);
    }
    for (const SourceGroup& grp : groups) {
      const DropoutSpec& spec = adapters[grp.first].dropout;
      if (thin && spec.active && masked_in_place) {  // dA reads x's rows, masked as it loads them
        const uint8_t* keep = keep_rows(dropouts[grp.first], begin, rows, sc);
        thin_matmul_t_accumulate_masked(rows, grp.width, k_size, g_blk.const_data_ptr<float>() + grp.offset, r_total,
                                        x.const_data_ptr<float>() + begin * x.stride(0), x.stride(0), keep,
                                        dropouts[grp.first].bytes_per_row(), static_cast<float>(spec.scale),
                                        partials[c][grp.offset].data_ptr<float>(), partials.stride(1));
      } else {
        const at::Tensor src = dropout_rows<scalar_t, acc_t>(x, spec, dropouts[grp.first], begin, rows, sc);
        if (thin) {
          thin_matmul_t_accumulate(rows, grp.width, k_size, g_blk.const_data_ptr<float>() + grp.offset, r_total,
                                   src.const_data_ptr<float>(), src.stride(0),
                                   partials[c][grp.offset].data_ptr<float>(), partials.stride(1));
        } else {
          partials[c].narrow(0, grp.offset, grp.width).addmm_(g_blk.narrow(1, grp.offset, grp.width).t(), src);
        }
      }
      if (grad_x == nullptr) continue;
      for (size_t t = grp.first; t < grp.end; ++t) {
        const Adapter& ad = adapters[t];
        const bool accumulate = t > 0;
        const at::Tensor g_cols = g_blk.narrow(1, ad.offset, ad.rank);
        const at::Tensor a_rows = a_acc.narrow(0, ad.offset, ad.rank);
        if (!ad.dropout.active) {  // s·g·A straight into the sum
          if (thin) {
            thin_matmul(rows, ad.rank, k_size, g_cols.const_data_ptr<float>(), r_total,
                        a_rows.const_data_ptr<float>(), a_rows.stride(0), static_cast<float>(ad.scaling), nullptr,
                        sum.data_ptr<float>(), sum.stride(0), accumulate);
          } else {
            at::addmm_out(sum, sum, g_cols, a_rows, accumulate ? 1.0 : 0.0, ad.scaling);
          }
          continue;
        }
        const uint8_t* keep = sc.bytes.data();  // this block's keep bits of adapter t (made above)
        if (thin && masked_in_place) {  // the mask in the product's epilogue
          const float mult = static_cast<float>(ad.scaling) * static_cast<float>(ad.dropout.scale);
          thin_matmul_masked(rows, ad.rank, k_size, g_cols.const_data_ptr<float>(), r_total,
                             a_rows.const_data_ptr<float>(), a_rows.stride(0), keep, dropouts[t].bytes_per_row(), mult,
                             sum.data_ptr<float>(), sum.stride(0), accumulate);
          continue;
        }
        sc.term.resize(kRowBlock * k_size);  // g·A in acc_t, then scaled and masked into the sum
        at::Tensor term = at::from_blob(sc.term.data(), {rows, k_size}, acc_opts);
        if (thin) {
          thin_matmul(rows, ad.rank, k_size, g_cols.const_data_ptr<float>(), r_total,
                      a_rows.const_data_ptr<float>(), a_rows.stride(0), 1.0f, nullptr, term.data_ptr<float>(), k_size,
                      false);
        } else {
          at::mm_out(term, g_cols, a_rows);
        }
        acc_t* sum_data = sum.data_ptr<acc_t>();
        for (int64_t i = 0; i < rows; ++i) {
          dropouts[t].apply(begin + i, keep + i * dropouts[t].bytes_per_row(),
                            sc.term.data() + i * k_size, 1, static_cast<acc_t>(ad.scaling), sum_data + i * k_size,
                            accumulate);
        }
      }
    }
    if (grad_x != nullptr && !sum_in_grad_x) grad_x->narrow(0, begin, rows).copy_(sum);
  });
  const at::Tensor scales = rank_scalings(adapters, r_total, acc_type).unsqueeze(1);
  return partials.sum(0).mul_(scales).to(x.scalar_type());
}

// Backward for checked inputs (check_common: N = n_size) and their adapters.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const c10::optional<at::Tensor>& weight,
                                                             const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                             const at::Tensor& xa, int64_t n_size,
                                                             const Adapters& adapters, bool compute_grad_x) {
  KernelGuards guards;
  const int64_t m_size = x.size(0), k_size = x.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == m_size && grad_y.size(1) == n_size,
              "lora_kernels: grad_y must be (M=", m_size, ", N=", n_size, "), got ", grad_y.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == m_size && xa.size(1) == lora_A.size(0),
              "lora_kernels: xa must be (M=", m_size, ", r=", lora_A.size(0), "), got ", xa.sizes());
  // Without these a mixed dtype surfaced as an ATen error deep inside, or not at all (grad_B in
  // grad_y's dtype) when grad_x was not wanted.
  check_like_x(grad_y, "grad_y", x);
  check_like_x(xa, "xa", x);
  const auto [g, grad_b] = grad_y_products(grad_y, lora_B, xa, adapters);  // g in the accumulation type
  at::Tensor grad_x = compute_grad_x ? at::empty({m_size, k_size}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_backward_rows", [&] {
    grad_a = lora_backward_rows<scalar_t>(x, g, lora_A, adapters, compute_grad_x ? &grad_x : nullptr);
  });
  // grad_x already holds the LoRA terms; the base GEMM (with a weight) accumulates onto it (beta = 1).
  if (compute_grad_x && weight.has_value()) grad_x.addmm_(grad_y, *weight);
  return {grad_x, grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool compute_grad_x) {
  const int64_t n_size = check_common(x, weight, lora_A, lora_B);
  return lora_backward(grad_y, x, weight, lora_A, lora_B, xa, n_size,
                       single_adapter(lora_A.size(0), scaling, dropout_p, seed), compute_grad_x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_stacked_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, at::IntArrayRef ranks, at::ArrayRef<double> scalings,
    at::ArrayRef<double> dropout_ps, const c10::optional<at::Tensor>& seeds, bool compute_grad_x) {
  const int64_t n_size = check_common(x, weight, lora_A, lora_B);
  return lora_backward(grad_y, x, weight, lora_A, lora_B, xa, n_size,
                       stacked_adapters(lora_A.size(0), ranks, scalings, dropout_ps, seeds), compute_grad_x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
  m.impl("fused_forward_stacked", &fused_forward_stacked_cpu);
  m.impl("fused_backward_stacked", &fused_backward_stacked_cpu);
}

}  // namespace cpu
}  // namespace lora_kernels
