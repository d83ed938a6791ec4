// SPDX-License-Identifier: Apache-2.0
// Rank-r expansions that fill a big output before cuBLAS accumulates the base GEMM onto it:
//   forward  (kOutput):    y  = bias + s · xa·Bᵀ            then  y  += x·W₀ᵀ   (cuBLAS, beta = 1)
//   backward (kGradInput): dX = s/(1-p) · mask ⊙ (g·A)       then  dX += dY·W₀  (cuBLAS, beta = 1)
// The second is used only when the rank is too large for the fused dA/dX kernel (backward_dx.cu).
//
// Why a prefill and not an epilogue of our own GEMM: cuBLAS(Lt) cannot add a rank-r product in its
// epilogue, and a hand-written GEMM that matches cuBLAS on every shape and GPU is a project of its own
// that cannot be tuned on a machine without a GPU. The prefill costs one extra write and read of the
// output (≈ 2·M·N·elt bytes, unmeasured) but keeps the base GEMM — the bulk of the time — at cuBLAS speed.
//
// A block computes a 128 x BC output tile: the 128 x r slice of xa (or g) and the r x BC slice of B
// (or A) go through shared memory, the warps multiply on tensor cores, and the epilogue adds the bias
// or applies the regenerated mask in fp32 before one rounding to the output dtype. g stays fp32: for
// 16-bit outputs it is staged as hi + lo tiles (common.cuh, load_split_tile), never rounded to T.
#include "cuda/common.cuh"

namespace lora_kernels {
namespace gpu {

template <typename T, typename S>
struct ExpandParams {
  const S* s_mat;
  const T* op;
  const T* bias;
  int64_t M, C, r;
  acc_t<T> scale;
  bool grad_input;
  bool dropout;
  const int64_t* seed;
  uint32_t threshold;
  T* out;
  bool out_vec;
  uint32_t off_s, off_s_lo, off_op, off_scratch, off_gmax;
};

template <typename T, typename S, int NR>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) expand_kernel(ExpandParams<T, S> p) {
  using Tl = Tiling<T>;
  using Mm = Mma<T>;
  constexpr int kLdS = Tl::ld_rank_tiles(NR);
  // g (S = fp32) against 16-bit T: staged as hi + lo; xa (S = T) and fp32/fp64 g as they are.
  constexpr bool kSplit = !std::is_same<T, S>::value && kSplitG<T>;
  LK_DYNAMIC_SMEM(smem);
  T* ss = reinterpret_cast<T*>(smem + p.off_s);
  T* ss_lo = reinterpret_cast<T*>(smem + p.off_s_lo);
  T* ot = reinterpret_cast<T*>(smem + p.off_op);
  const int warp = threadIdx.x / 32;
  acc_t<T>* scratch = reinterpret_cast<acc_t<T>*>(smem + p.off_scratch) + warp * 16 * Tl::kLdScratch;

  const int64_t m0 = int64_t(blockIdx.x) * kRowTile;
  const int64_t c0 = int64_t(blockIdx.y) * Tl::kBC;
  const DropoutState d = make_dropout(p.dropout && p.grad_input, p.seed, p.threshold);

  typename Mm::AccFrag acc[Tl::kColTiles];
#pragma unroll
  for (int t = 0; t < Tl::kColTiles; ++t) Mm::zero(acc[t]);

  // One scale for the block's rows of g over the whole rank: the accumulators span the rank chunks.
  acc_t<T> g_up = acc_t<T>(1);
  if constexpr (kSplit)
    g_up = split_scale(p.s_mat + m0 * p.r, p.r, p.M - m0, p.r, kRowTile, reinterpret_cast<unsigned*>(smem + p.off_gmax));

  for (int64_t jb = 0; jb < p.r; jb += 16 * NR) {
    __syncthreads();
    if constexpr (kSplit)
      load_split_tile<kRowTile, 16 * NR>(ss, ss_lo, kLdS, p.s_mat + m0 * p.r + jb, p.r, p.M - m0, p.r - jb, 1.0f / g_up);
    else
      load_small_tile<kRowTile, 16 * NR>(ss, kLdS, p.s_mat + m0 * p.r + jb, p.r, p.M - m0, p.r - jb);
    if (!p.grad_input) {
      // ot[c][j] = B[c0 + c][jb + j]
      load_small_tile<Tl::kBC, 16 * NR>(ot, kLdS, p.op + c0 * p.r + jb, p.r, p.C - c0, p.r - jb);
    } else {
      // ot[j][c] = A[jb + j][c0 + c]
      load_small_tile<16 * NR, Tl::kBC>(ot, Tl::kLdChunk, p.op + jb * p.C + c0, p.C, p.r - jb, p.C - c0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < NR; ++kk) {
      typename Mm::template FragA<false> fa, fa_lo;
      Mm::load_a(fa, ss + warp * 16 * kLdS + kk * 16, kLdS);
      if constexpr (kSplit) Mm::load_a(fa_lo, ss_lo + warp * 16 * kLdS + kk * 16, kLdS);
#pragma unroll
      for (int ct = 0; ct < Tl::kColTiles; ++ct) {
        if (!p.grad_input) {
          typename Mm::template FragB<true> fb;  // (j, c) = ot[c][j]
          Mm::load_b(fb, ot + ct * 16 * kLdS + kk * 16, kLdS);
          Mm::mma(acc[ct], fa, fb);
        } else {
          typename Mm::template FragB<false> fb;  // (j, c) = ot[j][c]
          Mm::load_b(fb, ot + kk * 16 * Tl::kLdChunk + ct * 16, Tl::kLdChunk);
          Mm::mma(acc[ct], fa, fb);
          if constexpr (kSplit) Mm::mma(acc[ct], fa_lo, fb);
        }
      }
    }
  }

#pragma unroll
  for (int ct = 0; ct < Tl::kColTiles; ++ct) {
    warp_epilogue<T>(scratch, acc[ct], [&](int row, int c8, const acc_t<T>* v) {
      const int64_t m = m0 + warp * 16 + row;
      const int64_t c = c0 + ct * 16 + c8;
      if (m >= p.M || c >= p.C) return;
      Octet<T> o;
      if (!p.grad_input) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const acc_t<T> b = (p.bias != nullptr && c + j < p.C) ? acc_t<T>(to_acc(p.bias[c + j])) : acc_t<T>(0);
          o.v[j] = cast_to<T>(b + p.scale * v[j]);
        }
      } else {
        const uint32_t keep = d.on ? keep_octet(d, static_cast<uint64_t>(m) * static_cast<uint64_t>(p.C) + c) : 0xFFu;
        const acc_t<T> scale = p.scale * g_up;
#pragma unroll
        for (int j = 0; j < 8; ++j) o.v[j] = cast_to<T>(v[j] * acc_t<T>((keep >> j) & 1u) * scale);  // NaN·0 = NaN
      }
      store_octet(p.out + m * p.C, c, p.C, o, p.out_vec);
    });
  }
}

template <typename T, typename S>
void run_expand(const ExpandArgs& a, const ExpandPlan& plan, cudaStream_t stream) {
  ExpandParams<T, S> p;
  p.s_mat = static_cast<const S*>(a.s_mat);
  p.op = static_cast<const T*>(a.op);
  p.bias = static_cast<const T*>(a.bias);
  p.M = a.M;
  p.C = a.C;
  p.r = a.r;
  p.scale = static_cast<acc_t<T>>(a.scale);
  p.grad_input = a.mode == ExpandMode::kGradInput;
  p.dropout = a.dropout;
  p.seed = a.seed;
  p.threshold = a.threshold;
  p.out = static_cast<T*>(a.out);
  p.out_vec = a.C % 8 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  p.off_s = static_cast<uint32_t>(plan.off_s);
  p.off_s_lo = static_cast<uint32_t>(plan.off_s_lo);
  p.off_op = static_cast<uint32_t>(plan.off_op);
  p.off_scratch = static_cast<uint32_t>(plan.off_scratch);
  p.off_gmax = static_cast<uint32_t>(plan.off_gmax);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.M, kRowTile)), static_cast<unsigned>(ceil_div(a.C, Tiling<T>::kBC)));
  dispatch_rank_tiles<T>(plan.nr, [&](auto nr) {
    auto kernel = &expand_kernel<T, S, decltype(nr)::value>;
    LK_ALLOW_SMEM(kernel, plan.smem);
    LK_LAUNCH(kernel, grid, dim3(kThreads), plan.smem, stream, p);
  });
}

void launch_expand(const ExpandArgs& a, const ExpandPlan& plan, void* stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (a.mode == ExpandMode::kOutput) run_expand<T, T>(a, plan, static_cast<cudaStream_t>(stream));
    else run_expand<T, acc_t<T>>(a, plan, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace gpu
}  // namespace lora_kernels
