// Fused LoRA forward and backward on the CPU (DESIGN §1, §3, §5).
//
// The large GEMMs go to ATen/BLAS; everything touching the dropout mask runs in row blocks
// (at::parallel_for) whose dropped rows live only in a small per-thread buffer, so no M x K
// mask or dropped copy of x is ever materialised. The LoRA term joins the base GEMM's output
// through BLAS beta = 1 accumulation instead of another M x N pass.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/dropout_cpu.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 32;  // rows per block: a 32 x K fp32 buffer stays in L2 for K <= 8192

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2, "lora_kernels: x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "lora_kernels: weight must be (N, K=", x.size(1),
              "), got ", weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1) && lora_A.size(0) >= 1,
              "lora_kernels: lora_A must be (r >= 1, K=", x.size(1), "), got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0),
              "lora_kernels: lora_B must be (N=", weight.size(0), ", r=", lora_A.size(0), "), got ", lora_B.sizes());
  for (const at::Tensor* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lora_kernels: weight, lora_A and lora_B must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "lora_kernels: the cpu kernels need CPU tensors, got ", t->device());
  }
  TORCH_CHECK(x.device().is_cpu(), "lora_kernels: the cpu kernels need CPU tensors, got x on ", x.device());
}

// Rows [begin, end) of x with the dropout multipliers applied, in acc_t, into `buffer` (rows x
// K, contiguous); `bytes` receives each row's keep bits (bytes_per_row() apart) for reuse.
template <typename scalar_t, typename acc_t>
void dropped_rows(const at::Tensor& x, const RowDropout<acc_t>& dropout, int64_t begin, int64_t end, acc_t* buffer,
                  uint8_t* bytes) {
  const int64_t k_size = x.size(1), row_bytes = dropout.bytes_per_row();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  for (int64_t m = begin; m < end; ++m) {
    uint8_t* keep = bytes + (m - begin) * row_bytes;
    dropout.row_bytes(m, keep);
    dropout.apply(m, keep, x_data + m * x.stride(0), x.stride(1), acc_t(1), buffer + (m - begin) * k_size);
  }
}

// xa = dropout(x)·Aᵀ in one pass over x.
at::Tensor project_dropped(const at::Tensor& x, const at::Tensor& lora_A, const DropoutSpec& spec) {
  const int64_t m_size = x.size(0), k_size = x.size(1), r = lora_A.size(0);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor xa = at::empty({m_size, r}, x.options());
  const at::Tensor a_t = lora_A.to(acc_type).t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_project_dropped", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowDropout<acc_t> dropout(spec, k_size);
    at::parallel_for(0, (m_size + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set again in each worker
      std::vector<acc_t> buffer(kRowBlock * k_size);
      std::vector<uint8_t> bytes(kRowBlock * dropout.bytes_per_row());
      const at::Tensor buf = at::from_blob(buffer.data(), {kRowBlock, k_size}, at::TensorOptions().dtype(acc_type));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kRowBlock, end = std::min(m_size, begin + kRowBlock);
        dropped_rows<scalar_t, acc_t>(x, dropout, begin, end, buffer.data(), bytes.data());
        at::Tensor out = xa.narrow(0, begin, end - begin);
        if (acc_type == x.scalar_type()) {
          at::mm_out(out, buf.narrow(0, 0, end - begin), a_t);
        } else {
          out.copy_(at::mm(buf.narrow(0, 0, end - begin), a_t));
        }
      }
    });
  });
  return xa;
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     const c10::optional<at::Tensor>& seed) {
  // A kernel, not a graph: the ATen calls below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_common(x, weight, lora_A, lora_B);
  const DropoutSpec spec = make_dropout_spec(seed, dropout_p);
  const int64_t m_size = x.size(0), n_size = weight.size(0);
  const at::Tensor xa = spec.active ? project_dropped(x, lora_A, spec) : at::mm(x, lora_A.t());
  // y = bias + s·xa·Bᵀ (a rank-r GEMM), then y += x·Wᵀ with beta = 1: the base GEMM reads the
  // LoRA term in its epilogue instead of a separate add pass over M x N.
  at::Tensor y = at::empty({m_size, n_size}, x.options());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_size && bias->scalar_type() == x.scalar_type(),
                "lora_kernels: bias must be (N=", n_size, ",) of x's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
    at::addmm_out(y, *bias, xa, lora_B.t(), 1.0, scaling);
  } else {
    at::addmm_out(y, y, xa, lora_B.t(), 0.0, scaling);
  }
  y.addmm_(x, weight.t());
  return {y, xa};
}

// One pass over row blocks of x for the masked terms of backward: grad_x = s·D⊙(g·A) (when
// wanted) and grad_A = s·gᵀ·(D⊙x), regenerating the mask once per row for both.
template <typename scalar_t>
at::Tensor masked_backward_pass(const at::Tensor& x, const at::Tensor& g, const at::Tensor& lora_A, double scaling,
                                const DropoutSpec& spec, at::Tensor* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m_size = x.size(0), k_size = x.size(1), r = lora_A.size(0);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_opts = at::TensorOptions().dtype(acc_type);
  const at::Tensor g_acc = g.to(acc_type);
  const at::Tensor a_acc = lora_A.to(acc_type);
  const RowDropout<acc_t> dropout(spec, k_size);
  const int64_t row_bytes = dropout.bytes_per_row();
  const int64_t n_blocks = (m_size + kRowBlock - 1) / kRowBlock;
  // Partial grad_A per thread-chunk, summed in a fixed order afterwards: deterministic for a
  // given thread count, and no float atomics.
  const int64_t n_chunks = std::min<int64_t>(n_blocks, at::get_num_threads());
  at::Tensor partials = at::zeros({n_chunks, r, k_size}, acc_opts);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set again in each worker
    std::vector<acc_t> buffer(kRowBlock * k_size), term(kRowBlock * k_size);
    std::vector<uint8_t> bytes(kRowBlock * row_bytes);
    const at::Tensor buf = at::from_blob(buffer.data(), {kRowBlock, k_size}, acc_opts);
    const at::Tensor term_buf = at::from_blob(term.data(), {kRowBlock, k_size}, acc_opts);
    for (int64_t c = c0; c < c1; ++c) {
      at::Tensor partial = partials[c];
      for (int64_t b = c * n_blocks / n_chunks; b < (c + 1) * n_blocks / n_chunks; ++b) {
        const int64_t begin = b * kRowBlock, rows = std::min(m_size, begin + kRowBlock) - begin;
        dropped_rows<scalar_t, acc_t>(x, dropout, begin, begin + rows, buffer.data(), bytes.data());
        const at::Tensor g_blk = g_acc.narrow(0, begin, rows);
        partial.addmm_(g_blk.t(), buf.narrow(0, 0, rows), 1.0, scaling);
        if (grad_x == nullptr) continue;
        at::Tensor term_blk = term_buf.narrow(0, 0, rows);
        at::mm_out(term_blk, g_blk, a_acc);
        scalar_t* gx = grad_x->data_ptr<scalar_t>();
        for (int64_t i = 0; i < rows; ++i) {
          dropout.apply(begin + i, bytes.data() + i * row_bytes, term.data() + i * k_size, 1,
                        static_cast<acc_t>(scaling), gx + (begin + i) * k_size);
        }
      }
    }
  });
  return partials.sum(0).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool compute_grad_x) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_common(x, weight, lora_A, lora_B);
  const int64_t m_size = x.size(0), n_size = weight.size(0), k_size = x.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == m_size && grad_y.size(1) == n_size,
              "lora_kernels: grad_y must be (M=", m_size, ", N=", n_size, "), got ", grad_y.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == m_size && xa.size(1) == lora_A.size(0),
              "lora_kernels: xa must be (M=", m_size, ", r=", lora_A.size(0), "), got ", xa.sizes());
  const DropoutSpec spec = make_dropout_spec(seed, dropout_p);
  const at::Tensor g = at::mm(grad_y, lora_B);                           // (M, r)
  // (N, r), as (xaᵀ·dY)ᵀ: BLAS reads dY along its rows, twice as fast here as dYᵀ·xa
  const at::Tensor grad_b = at::mm(xa.t(), grad_y).mul_(scaling).t().contiguous();
  at::Tensor grad_x = compute_grad_x ? at::empty({m_size, k_size}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_a;
  if (spec.active) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_backward_masked", [&] {
      grad_a = masked_backward_pass<scalar_t>(x, g, lora_A, scaling, spec, compute_grad_x ? &grad_x : nullptr);
    });
  } else {
    grad_a = at::mm(g.t(), x).mul_(scaling);
    if (compute_grad_x) at::addmm_out(grad_x, grad_x, g, lora_A, 0.0, scaling);
  }
  // grad_x already holds the LoRA term; the base GEMM accumulates onto it (beta = 1).
  if (compute_grad_x) grad_x.addmm_(grad_y, weight);
  return {grad_x, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
}

}  // namespace cpu
}  // namespace lora_kernels
