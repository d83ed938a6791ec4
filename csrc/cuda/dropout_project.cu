// SPDX-License-Identifier: Apache-2.0
// Forward pre-pass (docs/design.md §3, F2): xa = dropout(x)·Aᵀ with x read once, and the keep-mask op.
//
// A block owns 128 rows and walks K in 128-byte chunks: the x chunk is staged in shared memory with
// the dropout mask applied in registers on the way (one Philox call per eight elements, from the
// shared generator in dropout.h), A's chunk next to it, and the warps multiply on tensor cores
// (fp16/bf16). Dropped elements are staged as 0 and the 1/(1-p) factor is applied once to the
// fp32 result, so the staged operand is exact. With few rows (decode) K is split across blocks and
// the fp32 partials reduced in a fixed order (deterministic).
#include "cuda/common.cuh"

namespace lora_kernels {
namespace gpu {

template <typename T>
struct ProjectParams {
  const T* x;
  int64_t x_rs, x_cs;
  bool x_vec;
  int64_t M, K, r;
  const T* A;
  bool dropout;
  const int64_t* seed;
  uint32_t threshold;
  acc_t<T> scale;
  int64_t k_per_split;
  int splits;
  T* xa;
  acc_t<T>* part;  // splits x M x r, when splits > 1
  uint32_t off_x, off_a, off_scratch;
};

template <typename T, int NR>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) project_kernel(ProjectParams<T> p) {
  using Tl = Tiling<T>;
  using Mm = Mma<T>;
  LK_DYNAMIC_SMEM(smem);
  T* xs = reinterpret_cast<T*>(smem + p.off_x);
  T* as = reinterpret_cast<T*>(smem + p.off_a);
  const int warp = threadIdx.x / 32;
  acc_t<T>* scratch = reinterpret_cast<acc_t<T>*>(smem + p.off_scratch) + warp * 16 * Tl::kLdScratch;

  const int64_t m0 = int64_t(blockIdx.x) * kRowTile;
  const int split = blockIdx.y;
  const int64_t kb = split * p.k_per_split;
  const int64_t ke = std::min<int64_t>(p.K, kb + p.k_per_split);
  const int64_t jbase = int64_t(blockIdx.z) * 16 * NR;
  const DropoutState d = make_dropout(p.dropout, p.seed, p.threshold);

  typename Mm::AccFrag acc[NR];
#pragma unroll
  for (int t = 0; t < NR; ++t) Mm::zero(acc[t]);

  for (int64_t c0 = kb; c0 < ke; c0 += Tl::kBC) {
    __syncthreads();  // the previous chunk is consumed
    load_big_tile(xs, nullptr, p.x, p.x_rs, p.x_cs, m0, c0, p.M, p.K, p.x_vec, d);
    load_small_tile<16 * NR, Tl::kBC>(as, Tl::kLdChunk, p.A + jbase * p.K + c0, p.K, p.r - jbase, p.K - c0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < Tl::kColTiles; ++kk) {
      typename Mm::template FragA<false> fa;
      Mm::load_a(fa, xs + warp * 16 * Tl::kLdChunk + kk * 16, Tl::kLdChunk);
#pragma unroll
      for (int t = 0; t < NR; ++t) {
        // B(k, j) = A[j][k]: A's chunk read column-major.
        typename Mm::template FragB<true> fb;
        Mm::load_b(fb, as + t * 16 * Tl::kLdChunk + kk * 16, Tl::kLdChunk);
        Mm::mma(acc[t], fa, fb);
      }
    }
  }

#pragma unroll
  for (int t = 0; t < NR; ++t) {
    warp_epilogue<T>(scratch, acc[t], [&](int row, int c8, const acc_t<T>* v) {
      const int64_t m = m0 + warp * 16 + row;
      if (m >= p.M) return;
      for (int j = 0; j < 8; ++j) {
        const int64_t jj = jbase + t * 16 + c8 + j;
        if (jj >= p.r) break;
        if (p.splits == 1) p.xa[m * p.r + jj] = cast_to<T>(v[j] * p.scale);
        else p.part[(int64_t(split) * p.M + m) * p.r + jj] = v[j];
      }
    });
  }
}

template <typename T>
void run_project(const ProjectArgs& a, const ProjectPlan& plan, cudaStream_t stream) {
  ProjectParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.x_rs = a.x_stride_row;
  p.x_cs = a.x_stride_col;
  p.x_vec = a.x_vec;
  p.M = a.M;
  p.K = a.K;
  p.r = a.r;
  p.A = static_cast<const T*>(a.lora_A);
  p.dropout = a.dropout;
  p.seed = a.seed;
  p.threshold = a.threshold;
  p.scale = static_cast<acc_t<T>>(a.scale);
  p.k_per_split = plan.k_per_split;
  p.splits = plan.splits;
  p.xa = static_cast<T*>(a.xa);
  p.part = static_cast<acc_t<T>*>(a.workspace);
  p.off_x = static_cast<uint32_t>(plan.off_x);
  p.off_a = static_cast<uint32_t>(plan.off_a);
  p.off_scratch = static_cast<uint32_t>(plan.off_scratch);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.M, kRowTile)), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.r_chunks));
  dispatch_rank_tiles<T>(plan.nr, [&](auto nr) {
    auto kernel = &project_kernel<T, decltype(nr)::value>;
    LK_ALLOW_SMEM(kernel, plan.smem);
    LK_LAUNCH(kernel, grid, dim3(kThreads), plan.smem, stream, p);
  });
  if (plan.splits > 1) {
    // Partials are unscaled; the reduction applies 1/(1-p).
    reduce_partials<T, acc_t<T>>(p.part, plan.splits, a.M, a.r, a.scale, false, p.xa, plan.num_sms, stream);
  }
}

void launch_project(const ProjectArgs& a, const ProjectPlan& plan, void* stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    run_project<T>(a, plan, static_cast<cudaStream_t>(stream));
  });
}

// One thread per group of eight flat indices: the generator's natural unit.
__global__ void __launch_bounds__(kThreads) keep_mask_kernel(const int64_t* seed, int64_t n, uint32_t threshold,
                                                             bool* out) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  const int64_t groups = ceil_div(n, kLanesPerCall);
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const uint32_t bits = keep_bits8(s, static_cast<uint64_t>(g), threshold);
    for (int j = 0; j < kLanesPerCall; ++j) {
      const int64_t i = g * kLanesPerCall + j;
      if (i < n) out[i] = (bits >> j) & 1u;
    }
  }
}

void launch_keep_mask(const int64_t* seed, int64_t n, uint32_t threshold, bool* out, int num_sms, void* stream) {
  if (n == 0) return;
  const int64_t groups = ceil_div(n, kLanesPerCall);
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(groups, kThreads), 8 * int64_t(num_sms))));
  auto kernel = &keep_mask_kernel;
  LK_LAUNCH(kernel, dim3(blocks), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), seed, n, threshold, out);
}

}  // namespace gpu
}  // namespace lora_kernels
