// SPDX-License-Identifier: Apache-2.0
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
#include "schema.h"

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

// The launch plans on a described GPU (for the static report: tests/cuda_static_report.py), per
// kernel: [grid blocks, dynamic smem bytes, blocks per SM the plan assumes, rank tiles NR] for
// project, dY pass, x pass, dX prefill (expand, kGradInput) and output expand, flattened.
std::vector<int64_t> plan_on_device(int64_t M, int64_t K, int64_t N, int64_t r, c10::ScalarType dtype, int64_t num_sms,
                                    int64_t smem_per_sm, int64_t smem_optin) {
  using namespace lora_kernels::gpu;
  const DType dt = dtype_of(at::empty({0}, at::TensorOptions().dtype(dtype)));
  DeviceInfo dev;
  dev.num_sms = static_cast<int>(num_sms);
  dev.smem_per_sm = static_cast<size_t>(smem_per_sm);
  dev.max_smem_per_block = static_cast<size_t>(smem_optin);
  const int64_t bc = chunk_cols(element_size(dt));
  const ProjectPlan pp = plan_project(M, K, r, dt, dev);
  const SpanPlan yp = plan_dy(M, N, r, dt, dev);
  const SpanPlan xp = plan_dx(M, K, r, dt, dev);
  const ExpandPlan gp = plan_expand(r, ExpandMode::kGradInput, dt);
  const ExpandPlan op = plan_expand(r, ExpandMode::kOutput, dt);
  const int64_t row_tiles = ceil_div(M, kRowTile);
  return {row_tiles * pp.splits * pp.r_chunks, int64_t(pp.smem), blocks_per_sm(dev, pp.smem), pp.nr,
          yp.m_spans * yp.c_spans * yp.r_chunks, int64_t(yp.smem), blocks_per_sm(dev, yp.smem), yp.nr,
          xp.m_spans * xp.c_spans * xp.r_chunks, int64_t(xp.smem), blocks_per_sm(dev, xp.smem, x_pass_blocks_per_sm(dt)), xp.nr,
          row_tiles * ceil_div(K, bc), int64_t(gp.smem), blocks_per_sm(dev, gp.smem), gp.nr,
          row_tiles * ceil_div(N, bc), int64_t(op.smem), blocks_per_sm(dev, op.smem), op.nr};
}

// The dynamic shared-memory attribute of every kernel that has one, as [kernel address, bytes]
// pairs (flattened), to check that launches only ever raise it.
std::vector<int64_t> smem_attributes() {
  std::vector<int64_t> out;
  for (const auto& kv : ::lk_emu::smem_attributes()) {
    out.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(kv.first)));
    out.push_back(kv.second);
  }
  return out;
}

TORCH_LIBRARY(lora_kernels_emu, m) {
  m.def("plan_info(int M, int K, int N, int r, ScalarType dtype) -> int[]", &plan_info);
  m.def("plan_on_device(int M, int K, int N, int r, ScalarType dtype, int num_sms, int smem_per_sm, int smem_optin) -> int[]",
        &plan_on_device);
  m.def("smem_attributes() -> int[]", &smem_attributes);
  // The schemas of the real ops (schema.h), so the emulation is called exactly as they are.
  m.def(lora_kernels::schema::kFusedForward);
  m.def(lora_kernels::schema::kFusedBackward);
  m.def(lora_kernels::schema::kDropoutKeepMask);
}

TORCH_LIBRARY_IMPL(lora_kernels_emu, CPU, m) {
  m.impl("fused_forward", TORCH_FN(lora_kernels::gpu::fused_forward));
  m.impl("fused_backward", TORCH_FN(lora_kernels::gpu::fused_backward));
  m.impl("dropout_keep_mask", TORCH_FN(lora_kernels::gpu::dropout_keep_mask));
}
