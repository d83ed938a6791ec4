// SPDX-License-Identifier: Apache-2.0
// The `cuda` backend: CUDA kernels of the lora_kernels ops (schemas: csrc/schema.h).
//
//   fused_forward:  xa = dropout(x)·Aᵀ                       dropout_project.cu (x read once)
//                   y  = bias + s·xa·Bᵀ                        lora_expand.cu (prefill)
//                   y += x·W₀ᵀ (with a weight)                 cuBLAS through at::addmm_ (beta = 1)
//   fused_backward: g = dY·B, dB = s·dYᵀ·xa                    backward_dy.cu (one pass over dY)
//                   dA = s·gᵀ·(D⊙x) [+ dX = s·D⊙(g·A)]         backward_dx.cu (one pass over x)
//                   dX += dY·W₀ (with a weight)                cuBLAS through at::addmm_ (beta = 1)
//
// This file is compiled by the host compiler: it checks arguments, allocates outputs and
// workspaces, picks the launch plans (launchers.h) and calls the launchers. It is also compiled into
// the CPU emulation (emulation/emulated_ops.cpp, LK_EMULATE), where "the device" is the CPU.
//
// dtypes: float16, bfloat16 (tensor cores through WMMA, fp32 accumulation), float32 and float64
// (CUDA-core FMAs, fp32/fp64 accumulation; correct, not tuned).
#include <ATen/ATen.h>
#include <torch/library.h>

#ifndef LK_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/launchers.h"
#include "dropout.h"

namespace lora_kernels {
namespace gpu {
namespace {

#ifdef LK_EMULATE
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
constexpr const char* kDeviceName = "CPU (emulated cuda backend)";
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
constexpr const char* kDeviceName = "CUDA";
#endif

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default:
      TORCH_CHECK(false, "lora_kernels cuda backend: x must be float16, bfloat16, float32 or float64, got ",
                  x.scalar_type());
  }
  return DType::kFloat;  // unreachable
}

at::ScalarType acc_scalar_type(DType t) { return t == DType::kDouble ? at::kDouble : at::kFloat; }

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "lora_kernels cuda backend: ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lora_kernels cuda backend: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, const char* shape,
                  const at::Tensor& x) {
  check_like_x(t, name, x);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "lora_kernels cuda backend: ", name,
              " must be ", shape, " = (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "lora_kernels cuda backend: ", name, " must be contiguous (strides ", t.strides(),
              ")");
}

struct Shapes {
  int64_t M, K, N, r;
};

// Checks shared by forward and backward; returns M, K, N, r. N is the weight's rows when there is
// one (checked as before weight was optional), else lora_B's, which bias and grad_y are then
// checked against.
Shapes check_common(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.device().type() == kDeviceType, "lora_kernels::", op, " (cuda backend): x must be a ", kDeviceName,
              " tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "lora_kernels::", op, ": x must be 2-D (M, K) (lora_linear flattens leading dims), got ",
              x.sizes());
  dtype_of(x);
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2, "lora_kernels::", op, ": weight must be 2-D (N, K), got ", weight->sizes());
  } else {
    TORCH_CHECK(lora_B.dim() == 2, "lora_kernels::", op, ": lora_B must be 2-D (N, r), got ", lora_B.sizes());
  }
  TORCH_CHECK(lora_A.dim() == 2, "lora_kernels::", op, ": lora_A must be 2-D (r, K), got ", lora_A.sizes());
  Shapes s{x.size(0), x.size(1), weight.has_value() ? weight->size(0) : lora_B.size(0), lora_A.size(0)};
  if (weight.has_value()) {
    TORCH_CHECK(s.K >= 1 && s.N >= 1, "lora_kernels::", op, ": weight must be (N, K) with N, K >= 1, got ",
                weight->sizes());
  } else {
    TORCH_CHECK(s.K >= 1, "lora_kernels::", op, ": x must be (M, K) with K >= 1, got ", x.sizes());
    TORCH_CHECK(s.N >= 1, "lora_kernels::", op, ": lora_B must be (N, r) with N >= 1, got ", lora_B.sizes());
  }
  TORCH_CHECK(s.r >= 1, "lora_kernels::", op, ": lora_A must be (r, K) with rank r >= 1, got ", lora_A.sizes());
  if (weight.has_value()) check_matrix(*weight, "weight", s.N, s.K, "(N, K)", x);
  check_matrix(lora_A, "lora_A", s.r, s.K, "(r, K)", x);
  check_matrix(lora_B, "lora_B", s.N, s.r, "(N, r)", x);
  TORCH_CHECK(std::isfinite(scaling), "lora_kernels::", op, ": scaling must be finite, got ", scaling);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_kernels::", op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  if (seed.has_value()) {
    const at::Tensor& sd = *seed;
    TORCH_CHECK(sd.scalar_type() == at::kLong, "lora_kernels::", op, ": seed must be int64, got ", sd.scalar_type());
    TORCH_CHECK(sd.dim() == 1 && sd.numel() == 1, "lora_kernels::", op, ": seed must have shape (1,), got ",
                sd.sizes());
    TORCH_CHECK(sd.device() == x.device(), "lora_kernels::", op, ": seed must be on x's device ", x.device(),
                ", got ", sd.device());
  }
  // Column tiles of the prefill kernels go on gridDim.y (at most 65535 of them).
  const int64_t bc = chunk_cols(element_size(dtype_of(x)));
  TORCH_CHECK(ceil_div(std::max(s.N, s.K), bc) <= 65535, "lora_kernels::", op, ": N and K must be at most ",
              65535 * bc, " for ", x.scalar_type(), ", got N=", s.N, ", K=", s.K);
  return s;
}

// 16-byte vector loads of x are legal: unit column stride, 16-byte aligned rows, whole octets.
bool can_vectorize(const at::Tensor& x) {
  const int64_t es = x.element_size();
  return x.size(1) % 8 == 0 && x.stride(1) == 1 && (x.size(0) == 1 || (x.stride(0) * es) % 16 == 0) &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

struct Launch {
  void* stream = nullptr;
  DeviceInfo dev;
};

#ifdef LK_EMULATE
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoll(v) : fallback;
}
// The emulation's "GPU": few SMs and (optionally) a small accumulator budget, so that small test
// shapes exercise split-K, several spans and the partial-sum reductions.
Launch current_launch(const at::Tensor&) {
  Launch l;
  l.dev.num_sms = static_cast<int>(env_int("LORA_KERNELS_EMU_SMS", 2));
  l.dev.max_smem_per_block = 99 * 1024;
  l.dev.smem_per_sm = 100 * 1024;
  l.dev.acc_budget = static_cast<size_t>(env_int("LORA_KERNELS_EMU_ACC_BUDGET", 0));
  return l;
}
#else
Launch current_launch(const at::Tensor&) {
  // Called under the tensor's device guard.
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  Launch l;
  l.stream = at::cuda::getCurrentCUDAStream().stream();
  l.dev.num_sms = props->multiProcessorCount;
  l.dev.max_smem_per_block = props->sharedMemPerBlockOptin;
  l.dev.smem_per_sm = props->sharedMemPerMultiprocessor;
  return l;
}
#endif

void check_smem(size_t smem, const Launch& l, const char* what) {
  TORCH_CHECK(smem <= l.dev.max_smem_per_block, "lora_kernels cuda backend: the ", what, " kernel needs ", smem,
              " bytes of shared memory per block, this GPU allows ", l.dev.max_smem_per_block);
}

// LORA_KERNELS_CUDA_DY_PASS=auto|fused|gemm: how g and dB are computed (auto: by the plan's cost
// model against two cuBLAS GEMMs, which read dY twice). For tuning on a GPU and for tests.
bool use_dy_gemms(const SpanPlan& plan, const Shapes& s, DType t) {
  const char* v = std::getenv("LORA_KERNELS_CUDA_DY_PASS");
  const std::string mode = v != nullptr ? v : "auto";
  TORCH_CHECK(mode == "auto" || mode == "fused" || mode == "gemm",
              "LORA_KERNELS_CUDA_DY_PASS must be auto, fused or gemm, got '", mode, "'");
  if (plan.cols_per_span == 0) return true;  // no span fits this GPU's shared memory
  if (mode != "auto") return mode == "gemm";
  // The GEMM route is three launches (mm, copy to fp32, addmm) instead of one: ~4 MB of HBM time.
  return plan.traffic > 2.0 * double(s.M) * double(s.N) * element_size(t) + 4e6;
}

const int64_t* seed_ptr(const std::optional<at::Tensor>& seed, bool dropout) {
  return dropout ? seed->data_ptr<int64_t>() : nullptr;
}

at::Tensor workspace(int64_t elems, const at::Tensor& x, DType t) {
  return elems > 0 ? at::empty({elems}, x.options().dtype(acc_scalar_type(t))) : at::Tensor();
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, double scaling, double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  const Shapes s = check_common("fused_forward", x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  if (bias.has_value()) {
    check_like_x(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, "lora_kernels::fused_forward: bias must be (N,) = (", s.N,
                ",) or None, got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "lora_kernels::fused_forward: bias must be contiguous");
  }
#ifndef LK_EMULATE
  const c10::cuda::CUDAGuard device_guard(x.device());
#endif
  // The base GEMM below is an ATen call: keep autograd out of it (this op is differentiated by
  // lora_kernels.ops, not by tracing its insides).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DType dt = dtype_of(x);
  at::Tensor xa = at::empty({s.M, s.r}, x.options());
  at::Tensor y = at::empty({s.M, s.N}, x.options());
  if (s.M == 0) return {y, xa};
  const Launch l = current_launch(x);
  const bool dropout = seed.has_value() && dropout_p > 0.0;
  const uint32_t threshold = dropout ? dropout_threshold(dropout_p) : 0;
  const double inv_keep = dropout ? 1.0 / (1.0 - dropout_p) : 1.0;

  const ProjectPlan pp = plan_project(s.M, s.K, s.r, dt, l.dev);
  check_smem(pp.smem, l, "A-projection");
  const at::Tensor pws = workspace(pp.workspace, x, dt);
  ProjectArgs pa;
  pa.dtype = dt;
  pa.x = x.data_ptr();
  pa.x_stride_row = x.stride(0);
  pa.x_stride_col = x.stride(1);
  pa.x_vec = can_vectorize(x);
  pa.M = s.M;
  pa.K = s.K;
  pa.r = s.r;
  pa.lora_A = lora_A.data_ptr();
  pa.dropout = dropout;
  pa.seed = seed_ptr(seed, dropout);
  pa.threshold = threshold;
  pa.scale = inv_keep;
  pa.xa = xa.data_ptr();
  pa.workspace = ptr_or_null(pws);
  launch_project(pa, pp, l.stream);

  const ExpandPlan ep = plan_expand(s.r, ExpandMode::kOutput, dt);
  check_smem(ep.smem, l, "LoRA-output");
  ExpandArgs ea;
  ea.dtype = dt;
  ea.mode = ExpandMode::kOutput;
  ea.s_mat = xa.data_ptr();
  ea.op = lora_B.data_ptr();
  ea.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  ea.M = s.M;
  ea.C = s.N;
  ea.r = s.r;
  ea.scale = scaling;
  ea.dropout = false;
  ea.seed = nullptr;
  ea.threshold = 0;
  ea.out = y.data_ptr();
  launch_expand(ea, ep, l.stream);

  // y += x·W₀ᵀ on cuBLAS (beta = 1 onto the prefilled LoRA term and bias); without a weight the
  // caller adds its own base product.
  if (weight.has_value()) y.addmm_(x, weight->t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& lora_A,
                                                              const at::Tensor& lora_B, const at::Tensor& xa,
                                                              double scaling, double dropout_p,
                                                              const std::optional<at::Tensor>& seed,
                                                              bool compute_grad_x) {
  const Shapes s = check_common("fused_backward", x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  check_matrix(grad_y, "grad_y", s.M, s.N, "(M, N)", x);
  check_matrix(xa, "xa", s.M, s.r, "(M, r)", x);
#ifndef LK_EMULATE
  const c10::cuda::CUDAGuard device_guard(x.device());
#endif
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DType dt = dtype_of(x);
  at::Tensor grad_A = at::empty({s.r, s.K}, x.options());
  at::Tensor grad_B = at::empty({s.N, s.r}, x.options());
  at::Tensor grad_x = compute_grad_x ? at::empty({s.M, s.K}, x.options()) : at::empty({0}, x.options());
  if (s.M == 0) {
    grad_A.zero_();
    grad_B.zero_();
    return {grad_x, grad_A, grad_B};
  }
  const Launch l = current_launch(x);
  const bool dropout = seed.has_value() && dropout_p > 0.0;
  const uint32_t threshold = dropout ? dropout_threshold(dropout_p) : 0;
  const double inv_keep = dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
  const at::Tensor g = at::empty({s.M, s.r}, x.options().dtype(acc_scalar_type(dt)));

  // g = dY·B and dB = s·dYᵀ·xa: one fused pass over dY, unless its partial sums would cost more
  // than reading dY twice (large N·r where shared memory is small); then two cuBLAS GEMMs.
  const SpanPlan yp = plan_dy(s.M, s.N, s.r, dt, l.dev);
  if (use_dy_gemms(yp, s, dt)) {
    g.copy_(at::mm(grad_y, lora_B));
    at::addmm_out(grad_B, grad_B, grad_y.t(), xa, /*beta=*/0, /*alpha=*/scaling);  // beta = 0 ignores grad_B
  } else {
    check_smem(yp.smem, l, "dY-pass");
    const at::Tensor g_ws = workspace(dy_g_workspace(yp, s.M, s.r), x, dt);
    const at::Tensor b_ws = workspace(dy_b_workspace(yp, s.N, s.r), x, dt);
    DyArgs ya;
    ya.dtype = dt;
    ya.grad_y = grad_y.data_ptr();
    ya.lora_B = lora_B.data_ptr();
    ya.xa = xa.data_ptr();
    ya.M = s.M;
    ya.N = s.N;
    ya.r = s.r;
    ya.scale = scaling;
    ya.g = g.data_ptr();
    ya.grad_B = grad_B.data_ptr();
    ya.g_ws = ptr_or_null(g_ws);
    ya.grad_B_ws = ptr_or_null(b_ws);
    launch_dy(ya, yp, l.stream);
  }

  // dA = s·gᵀ·(D⊙x), with the dX prefill s·D⊙(g·A) fused when the rank fits one pass.
  const SpanPlan xp = plan_dx(s.M, s.K, s.r, dt, l.dev);
  TORCH_CHECK(xp.cols_per_span > 0, "lora_kernels cuda backend: the x-pass kernel does not fit in this GPU's ",
              l.dev.max_smem_per_block, " bytes of shared memory per block");
  check_smem(xp.smem, l, "x-pass");
  const bool fused_dx = compute_grad_x && xp.r_chunks == 1;
  if (compute_grad_x && !fused_dx) {
    const ExpandPlan ep = plan_expand(s.r, ExpandMode::kGradInput, dt);
    check_smem(ep.smem, l, "dX-prefill");
    ExpandArgs ea;
    ea.dtype = dt;
    ea.mode = ExpandMode::kGradInput;
    ea.s_mat = g.data_ptr();
    ea.op = lora_A.data_ptr();
    ea.bias = nullptr;
    ea.M = s.M;
    ea.C = s.K;
    ea.r = s.r;
    ea.scale = scaling * inv_keep;
    ea.dropout = dropout;
    ea.seed = seed_ptr(seed, dropout);
    ea.threshold = threshold;
    ea.out = grad_x.data_ptr();
    launch_expand(ea, ep, l.stream);
  }
  const at::Tensor a_ws = workspace(dx_a_workspace(xp, s.K, s.r), x, dt);
  DxArgs da;
  da.dtype = dt;
  da.x = x.data_ptr();
  da.x_stride_row = x.stride(0);
  da.x_stride_col = x.stride(1);
  da.x_vec = can_vectorize(x);
  da.M = s.M;
  da.K = s.K;
  da.r = s.r;
  da.lora_A = lora_A.data_ptr();
  da.g = g.data_ptr();
  da.dropout = dropout;
  da.seed = seed_ptr(seed, dropout);
  da.threshold = threshold;
  da.write_grad_x = fused_dx;
  da.dx_scale = scaling * inv_keep;
  da.grad_x = compute_grad_x ? grad_x.data_ptr() : nullptr;
  da.da_scale = scaling * inv_keep;  // x is staged masked but unscaled
  da.grad_A = grad_A.data_ptr();
  da.grad_A_ws = ptr_or_null(a_ws);
  launch_dx(da, xp, l.stream);

  // dX += dY·W₀ on cuBLAS (beta = 1 onto the prefilled LoRA term); without a weight the caller
  // adds its own.
  if (compute_grad_x && weight.has_value()) grad_x.addmm_(grad_y, *weight);
  return {grad_x, grad_A, grad_B};
}

at::Tensor dropout_keep_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p) {
  TORCH_CHECK(seed.device().type() == kDeviceType, "lora_kernels::dropout_keep_mask (cuda backend): seed must be a ",
              kDeviceName, " tensor, got ", seed.device());
  TORCH_CHECK(seed.scalar_type() == at::kLong, "lora_kernels::dropout_keep_mask: seed must be int64, got ",
              seed.scalar_type());
  TORCH_CHECK(seed.dim() == 1 && seed.numel() == 1, "lora_kernels::dropout_keep_mask: seed must have shape (1,), got ",
              seed.sizes());
  TORCH_CHECK(rows >= 0 && cols >= 0, "lora_kernels::dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ",
              cols);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_kernels::dropout_keep_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
#ifndef LK_EMULATE
  const c10::cuda::CUDAGuard device_guard(seed.device());
#endif
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const Launch l = current_launch(seed);
  launch_keep_mask(seed.data_ptr<int64_t>(), rows * cols, dropout_threshold(dropout_p), out.data_ptr<bool>(),
                   l.dev.num_sms, l.stream);
  return out;
}

}  // namespace gpu
}  // namespace lora_kernels

#ifndef LK_EMULATE
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("fused_forward", TORCH_FN(lora_kernels::gpu::fused_forward));
  m.impl("fused_backward", TORCH_FN(lora_kernels::gpu::fused_backward));
  m.impl("dropout_keep_mask", TORCH_FN(lora_kernels::gpu::dropout_keep_mask));
}
#endif
