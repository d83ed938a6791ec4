// The cuda backend — kernels, launch plans and op layer, unchanged — compiled for the CPU on top of
// cuda_emulation.h and registered as lora_kernels_emu::{fused_forward, fused_backward,
// dropout_keep_mask} for CPU tensors. tests/test_cuda_backend.py builds it with
// torch.utils.cpp_extension.load (include path: csrc) and checks it against the oracle, which is how
// the CUDA code is tested where no GPU is. Not part of the package build (setup.py globs only
// csrc/cuda/*.cu and csrc/cuda/*.cpp).
#ifndef LK_EMULATE
#define LK_EMULATE 1
#endif

// Torch first: the emulation defines CUDA's keywords and threadIdx & co. as macros.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/backward_dx.cu"
#include "cuda/backward_dy.cu"
#include "cuda/dropout_project.cu"
#include "cuda/lora_expand.cu"
#include "cuda/ops_cuda.cpp"

// The launch decisions for a problem on the emulated device (LORA_KERNELS_EMU_SMS,
// LORA_KERNELS_EMU_ACC_BUDGET), so the tests can check which code paths a shape exercises:
// [project splits, project r-chunks, dY m-spans, dY c-spans, dY r-chunks, dY via GEMMs,
//  x m-spans, x c-spans, x r-chunks].
std::vector<int64_t> plan_info(int64_t M, int64_t K, int64_t N, int64_t r, c10::ScalarType dtype) {
  using namespace lora_kernels::gpu;
  const at::Tensor probe = at::empty({0}, at::TensorOptions().dtype(dtype));
  const DType dt = dtype_of(probe);
  const Launch l = current_launch(probe);
  const ProjectPlan pp = plan_project(M, K, r, dt, l.dev);
  const SpanPlan yp = plan_dy(M, N, r, dt, l.dev);
  const SpanPlan xp = plan_dx(M, K, r, dt, l.dev);
  return {pp.splits, pp.r_chunks, yp.m_spans, yp.c_spans, yp.r_chunks, use_dy_gemms(yp, Shapes{M, K, N, r}, dt),
          xp.m_spans, xp.c_spans, xp.r_chunks};
}

TORCH_LIBRARY(lora_kernels_emu, m) {
  m.def("plan_info(int M, int K, int N, int r, ScalarType dtype) -> int[]", &plan_info);
  m.def(
      "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
      "float scaling, float dropout_p, Tensor? seed, bool compute_grad_x) -> (Tensor, Tensor, Tensor)");
  m.def("dropout_keep_mask(Tensor seed, int rows, int cols, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels_emu, CPU, m) {
  m.impl("fused_forward", TORCH_FN(lora_kernels::gpu::fused_forward));
  m.impl("fused_backward", TORCH_FN(lora_kernels::gpu::fused_backward));
  m.impl("dropout_keep_mask", TORCH_FN(lora_kernels::gpu::dropout_keep_mask));
}
