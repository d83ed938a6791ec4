// SPDX-License-Identifier: Apache-2.0
// Fused LoRA forward and backward on the CPU (docs/design.md §1, §3, §5).
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

// Per-thread buffers for one row block of x: dropout(x) rows, g·A rows, and the rows' keep bits.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> dropped, term;
  std::vector<uint8_t> bytes;
};

// Rows [begin, begin + rows) of dropout(x) in acc_t, (rows, K). With dropout on they are built
// in `sc` (keep bits kept there for reuse); without, they are x's rows themselves.
template <typename scalar_t, typename acc_t>
at::Tensor dropout_rows(const at::Tensor& x, const DropoutSpec& spec, const RowDropout<acc_t>& dropout,
                        int64_t begin, int64_t rows, RowScratch<acc_t>& sc) {
  const at::ScalarType acc_type = at::CppTypeToScalarType<acc_t>::value;
  if (!spec.active) return x.narrow(0, begin, rows).to(acc_type);
  const int64_t k_size = x.size(1), row_bytes = dropout.bytes_per_row();
  sc.dropped.resize(kRowBlock * k_size);
  sc.bytes.resize(kRowBlock * row_bytes);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) {
    uint8_t* keep = sc.bytes.data() + i * row_bytes;
    dropout.row_bytes(begin + i, keep);
    dropout.apply(begin + i, keep, x_data + (begin + i) * x.stride(0), x.stride(1), acc_t(1),
                  sc.dropped.data() + i * k_size);
  }
  return at::from_blob(sc.dropped.data(), {rows, k_size}, at::TensorOptions().dtype(acc_type));
}

// fp32 row blocks with a unit inner stride go to the thin_matmul loops; dropped rows always have
// one (contiguous scratch), x's own rows when x does.
template <typename scalar_t>
bool use_thin(const at::Tensor& x, const DropoutSpec& spec) {
  return std::is_same_v<scalar_t, float> && thin_matmul_enabled() && (spec.active || x.stride(1) == 1);
}

// The LoRA half of forward, one pass over row blocks of x: xa = dropout(x)·Aᵀ and y = bias +
// s·xa·Bᵀ, each block of y written to memory once while its xa rows are fresh.
template <typename scalar_t>
at::Tensor lora_forward_rows(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scaling, const DropoutSpec& spec, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m_size = x.size(0), k_size = x.size(1), n_size = y.size(1), r = lora_A.size(0);
  const at::Tensor a_t = lora_A.to(at::CppTypeToScalarType<acc_t>::value).t(), b_t = lora_B.t();
  at::Tensor xa = at::empty({m_size, r}, x.options());
  const RowDropout<acc_t> dropout(spec, k_size);
  std::vector<RowScratch<acc_t>> scratch(num_chunks(m_size));
  const bool thin = use_thin<scalar_t>(x, spec);
  // The loops' operands: Aᵀ (K, r) contiguous, Bᵀ (r, N) with padded rows, bias contiguous.
  const at::Tensor a_t_rows = thin ? a_t.contiguous() : a_t, b_t_rows = thin ? padded_fp32(b_t) : b_t;
  const at::Tensor bias_rows = thin && bias.has_value() ? bias->contiguous() : at::Tensor();
  for_row_blocks_by_chunk(m_size, [&](int64_t c, int64_t begin, int64_t rows) {
    const at::Tensor src = dropout_rows<scalar_t, acc_t>(x, spec, dropout, begin, rows, scratch[c]);
    at::Tensor xa_blk = xa.narrow(0, begin, rows);
    at::Tensor y_blk = y.narrow(0, begin, rows);
    if (thin) {
      thin_matmul(rows, k_size, r, src.const_data_ptr<float>(), src.stride(0), a_t_rows.const_data_ptr<float>(), r,
                  1.0f, nullptr, xa_blk.data_ptr<float>(), r);
      thin_matmul(rows, r, n_size, xa_blk.const_data_ptr<float>(), r, b_t_rows.const_data_ptr<float>(),
                  b_t_rows.stride(0), static_cast<float>(scaling),
                  bias_rows.defined() ? bias_rows.const_data_ptr<float>() : nullptr, y_blk.data_ptr<float>(), n_size);
      return;
    }
    if (xa.scalar_type() == src.scalar_type()) {
      at::mm_out(xa_blk, src, a_t);
    } else {
      xa_blk.copy_(at::mm(src, a_t));
    }
    at::addmm_out(y_blk, y_blk, xa_blk, b_t, 0.0, scaling);  // beta = 0: y's old contents ignored
    if (bias.has_value()) y_blk.add_(*bias);
  });
  return xa;
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     const c10::optional<at::Tensor>& seed) {
  // A kernel, not a graph: the ATen calls below must not record autograd history, nor be
  // autocast (an enclosing torch.autocast would lower the fp32 products of the calling thread's rows).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t n_size = check_common(x, weight, lora_A, lora_B);
  const DropoutSpec spec = make_dropout_spec(seed, dropout_p);
  const int64_t m_size = x.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_size && bias->scalar_type() == x.scalar_type(),
                "lora_kernels: bias must be (N=", n_size, ",) of x's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  // y = bias + s·xa·Bᵀ, then (with a weight) y += x·Wᵀ with beta = 1: the base GEMM reads the LoRA
  // term in its epilogue instead of a separate add pass over M x N.
  at::Tensor y = at::empty({m_size, n_size}, x.options());
  at::Tensor xa;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_forward_rows", [&] {
    xa = lora_forward_rows<scalar_t>(x, bias, lora_A, lora_B, scaling, spec, y);
  });
  if (weight.has_value()) y.addmm_(x, weight->t());
  return {y, xa};
}

// g = dY·B (M, r, in the accumulation type) and grad_B = s·dYᵀ·xa (N, r) from one pass over dY:
// each row block of dY is read from memory once and hits L2 for its second product.
std::tuple<at::Tensor, at::Tensor> grad_y_products(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                   const at::Tensor& xa, double scaling) {
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
                  g.data_ptr<float>() + begin * r, r);
      thin_matmul_t_accumulate(rows, r, n_size, xa_acc.const_data_ptr<float>() + begin * r, r, dy, grad_y.stride(0),
                              partials[c].data_ptr<float>(), partials.stride(1));
      return;
    }
    const at::Tensor dy_blk = grad_y.narrow(0, begin, rows).to(acc_type);
    at::Tensor g_blk = g.narrow(0, begin, rows);
    at::mm_out(g_blk, dy_blk, b_acc);
    partials[c].addmm_(xa_acc.narrow(0, begin, rows).t(), dy_blk);
  });
  return {g, partials.sum(0).mul_(scaling).t().contiguous().to(grad_y.scalar_type())};
}

// The x side of backward, one pass over row blocks of x with the mask regenerated once per row:
// grad_A = s·gᵀ·dropout(x) and, when wanted, grad_x = s·D⊙(g·A) (the base GEMM adds dY·W later).
template <typename scalar_t>
at::Tensor lora_backward_rows(const at::Tensor& x, const at::Tensor& g, const at::Tensor& lora_A, double scaling,
                              const DropoutSpec& spec, at::Tensor* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m_size = x.size(0), k_size = x.size(1), r = lora_A.size(0);
  const at::ScalarType acc_type = at::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions acc_opts = at::TensorOptions().dtype(acc_type);
  const bool thin = use_thin<scalar_t>(x, spec);
  const at::Tensor a_acc = thin ? padded_fp32(lora_A) : lora_A.to(acc_type).contiguous();
  const RowDropout<acc_t> dropout(spec, k_size);
  at::Tensor partials = padded_partials(num_chunks(m_size), r, k_size, acc_type);  // (gᵀ·dropout(x)) per chunk
  std::vector<RowScratch<acc_t>> scratch(partials.size(0));
  for_row_blocks_by_chunk(m_size, [&](int64_t c, int64_t begin, int64_t rows) {
    RowScratch<acc_t>& sc = scratch[c];
    const at::Tensor src = dropout_rows<scalar_t, acc_t>(x, spec, dropout, begin, rows, sc);
    const at::Tensor g_blk = g.narrow(0, begin, rows);
    if (thin) {
      thin_matmul_t_accumulate(rows, r, k_size, g_blk.const_data_ptr<float>(), r, src.const_data_ptr<float>(),
                               src.stride(0), partials[c].data_ptr<float>(), partials.stride(1));
    } else {
      partials[c].addmm_(g_blk.t(), src);
    }
    if (grad_x == nullptr) return;
    at::Tensor gx_blk = grad_x->narrow(0, begin, rows);
    if (!spec.active && acc_type == x.scalar_type()) {  // s·g·A straight into grad_x
      if (thin) {
        thin_matmul(rows, r, k_size, g_blk.const_data_ptr<float>(), r, a_acc.const_data_ptr<float>(), a_acc.stride(0),
                    static_cast<float>(scaling), nullptr, gx_blk.data_ptr<float>(), k_size);
      } else {
        at::addmm_out(gx_blk, gx_blk, g_blk, a_acc, 0.0, scaling);
      }
      return;
    }
    sc.term.resize(kRowBlock * k_size);  // g·A in acc_t, then scaled (and masked) into grad_x
    at::Tensor term = at::from_blob(sc.term.data(), {rows, k_size}, acc_opts);
    if (thin) {
      thin_matmul(rows, r, k_size, g_blk.const_data_ptr<float>(), r, a_acc.const_data_ptr<float>(), a_acc.stride(0),
                  1.0f, nullptr, term.data_ptr<float>(), k_size);
    } else {
      at::mm_out(term, g_blk, a_acc);
    }
    if (!spec.active) {
      gx_blk.copy_(term.mul_(scaling));
      return;
    }
    scalar_t* gx = gx_blk.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) {
      dropout.apply(begin + i, sc.bytes.data() + i * dropout.bytes_per_row(), sc.term.data() + i * k_size, 1,
                    static_cast<acc_t>(scaling), gx + i * k_size);
    }
  });
  return partials.sum(0).mul_(scaling).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool compute_grad_x) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in fused_forward_cpu
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t n_size = check_common(x, weight, lora_A, lora_B);
  const int64_t m_size = x.size(0), k_size = x.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == m_size && grad_y.size(1) == n_size,
              "lora_kernels: grad_y must be (M=", m_size, ", N=", n_size, "), got ", grad_y.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == m_size && xa.size(1) == lora_A.size(0),
              "lora_kernels: xa must be (M=", m_size, ", r=", lora_A.size(0), "), got ", xa.sizes());
  // Without these a mixed dtype surfaced as an ATen error deep inside, or not at all (grad_B in
  // grad_y's dtype) when grad_x was not wanted.
  check_like_x(grad_y, "grad_y", x);
  check_like_x(xa, "xa", x);
  const DropoutSpec spec = make_dropout_spec(seed, dropout_p);
  const auto [g, grad_b] = grad_y_products(grad_y, lora_B, xa, scaling);  // g in the accumulation type
  at::Tensor grad_x = compute_grad_x ? at::empty({m_size, k_size}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_backward_rows", [&] {
    grad_a = lora_backward_rows<scalar_t>(x, g, lora_A, scaling, spec, compute_grad_x ? &grad_x : nullptr);
  });
  // grad_x already holds the LoRA term; the base GEMM (with a weight) accumulates onto it (beta = 1).
  if (compute_grad_x && weight.has_value()) grad_x.addmm_(grad_y, *weight);
  return {grad_x, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
}

}  // namespace cpu
}  // namespace lora_kernels
