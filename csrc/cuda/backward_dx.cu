// SPDX-License-Identifier: Apache-2.0
// Backward, one pass over x (docs/design.md §3): dA = s·gᵀ·(D ⊙ x), and — fused when the whole rank fits one
// pass — the dX prefill s·D ⊙ (g·A) that cuBLAS then accumulates dY·W₀ onto.
//
// The mask is regenerated while the x tile is staged (one Philox call per eight elements), so
// neither a mask nor a dropped copy of x ever exists in global memory (no M x K temporary). The
// staged tile serves dA (column sums over the block's rows, kept in shared memory for the block's
// column span) and its keep bits, kept as one byte per octet, serve the dX prefill of the same
// tile. Row-span partials of dA are reduced in a fixed order: deterministic. g stays fp32: for
// 16-bit inputs it is staged as hi + lo tiles (common.cuh, load_split_tile), never rounded to T.
#include "cuda/common.cuh"

namespace lora_kernels {
namespace gpu {

template <typename T>
struct DxParams {
  const T* x;
  int64_t x_rs, x_cs;
  bool x_vec;
  int64_t M, K, r;
  const T* A;
  const acc_t<T>* g;
  bool dropout;
  const int64_t* seed;
  uint32_t threshold;
  int64_t rows_per_span, cols_per_span;
  int64_t m_spans;
  bool write_dx;
  bool dx_vec;
  acc_t<T> dx_scale;
  T* dx;
  acc_t<T> da_scale;
  T* da;              // final dA (r, K) when m_spans == 1
  acc_t<T>* da_part;  // m_spans x K x r
  uint32_t off_big, off_op, off_rank, off_rank_lo, off_mask, off_scratch, off_gmax, off_acc;
};

// The launch bound the plan assumes (launchers.h, x_pass_blocks_per_sm).
template <typename T>
constexpr int kDxBlocksPerSm = std::is_same<T, bf16_t>::value ? 1 : kBlocksPerSm;

template <typename T, int NR>
__global__ void __launch_bounds__(kThreads, kDxBlocksPerSm<T>) dx_da_kernel(DxParams<T> p) {
  using Tl = Tiling<T>;
  using Mm = Mma<T>;
  using Acc = acc_t<T>;
  constexpr int kLdS = Tl::ld_rank_tiles(NR);
  constexpr int kLdAcc = Tl::ld_acc(NR);
  constexpr int kUnits = Tl::kColTiles * NR;
  constexpr bool kSplit = kSplitG<T>;
  LK_DYNAMIC_SMEM(smem);
  T* xs = reinterpret_cast<T*>(smem + p.off_big);          // masked x tile [128][kLdChunk]
  T* as = reinterpret_cast<T*>(smem + p.off_op);           // A chunk [16·NR][kLdChunk]
  T* gs = reinterpret_cast<T*>(smem + p.off_rank);         // g slice [128][kLdS] (hi part when split)
  T* gs_lo = reinterpret_cast<T*>(smem + p.off_rank_lo);   // lo part [128][kLdS] (when split)
  unsigned* gmax = reinterpret_cast<unsigned*>(smem + p.off_gmax);
  uint8_t* ms = reinterpret_cast<uint8_t*>(smem + p.off_mask);  // keep bits [128][BC/8]
  Acc* dacc = reinterpret_cast<Acc*>(smem + p.off_acc);    // dAᵀ of the column span [cols_per_span][kLdAcc]
  const int warp = threadIdx.x / 32;
  Acc* scratch = reinterpret_cast<Acc*>(smem + p.off_scratch) + warp * 16 * Tl::kLdScratch;

  const int64_t mb = int64_t(blockIdx.x) * p.rows_per_span, me = std::min<int64_t>(p.M, mb + p.rows_per_span);
  const int64_t kb = int64_t(blockIdx.y) * p.cols_per_span, ke = std::min<int64_t>(p.K, kb + p.cols_per_span);
  const int64_t jbase = int64_t(blockIdx.z) * 16 * NR;
  const DropoutState d = make_dropout(p.dropout, p.seed, p.threshold);

  for (int64_t i = threadIdx.x; i < p.cols_per_span * kLdAcc; i += kThreads) dacc[i] = Acc(0);

  for (int64_t m0 = mb; m0 < me; m0 += kRowTile) {
    __syncthreads();
    // Products with the staged g slice are multiplied by g_up (2^e when split, else 1).
    Acc g_up = Acc(1);
    const Acc* g_rows = p.g + m0 * p.r + jbase;
    const int64_t g_cols = std::min<int64_t>(16 * NR, p.r - jbase);
    if constexpr (kSplit) {
      g_up = split_scale(g_rows, p.r, p.M - m0, g_cols, kRowTile, gmax);
      load_split_tile<kRowTile, 16 * NR>(gs, gs_lo, kLdS, g_rows, p.r, p.M - m0, g_cols, 1.0f / g_up);
    } else {
      load_small_tile<kRowTile, 16 * NR>(gs, kLdS, g_rows, p.r, p.M - m0, g_cols);
    }
    for (int64_t c0 = kb; c0 < ke; c0 += Tl::kBC) {
      __syncthreads();
      load_big_tile(xs, p.write_dx ? ms : nullptr, p.x, p.x_rs, p.x_cs, m0, c0, p.M, p.K, p.x_vec, d);
      load_small_tile<16 * NR, Tl::kBC>(as, Tl::kLdChunk, p.A + jbase * p.K + c0, p.K, p.r - jbase, p.K - c0);
      __syncthreads();

      if (p.write_dx) {
        // dX prefill of this tile: rows of this warp x BC columns = g slice · A chunk, masked; one
        // 16-column tile at a time, so one accumulator is live (the rank-64 bf16 instance spilled
        // with all of them live under the 128-register bound).
        const Acc dx_scale = p.dx_scale * g_up;
#pragma unroll 1
        for (int ct = 0; ct < Tl::kColTiles; ++ct) {
          typename Mm::AccFrag o;
          Mm::zero(o);
#pragma unroll
          for (int kk = 0; kk < NR; ++kk) {
            typename Mm::template FragA<false> fa;  // (m, j) = gs[m][j]
            typename Mm::template FragB<false> fb;  // (j, k) = as[j][k]
            Mm::load_a(fa, gs + warp * 16 * kLdS + kk * 16, kLdS);
            Mm::load_b(fb, as + kk * 16 * Tl::kLdChunk + ct * 16, Tl::kLdChunk);
            Mm::mma(o, fa, fb);
            if constexpr (kSplit) {
              Mm::load_a(fa, gs_lo + warp * 16 * kLdS + kk * 16, kLdS);
              Mm::mma(o, fa, fb);
            }
          }
          warp_epilogue<T>(scratch, o, [&](int row, int c8, const Acc* v) {
            const int64_t m = m0 + warp * 16 + row;
            const int64_t c = c0 + ct * 16 + c8;
            if (m >= p.M || c >= p.K) return;
            const uint32_t keep = ms[(warp * 16 + row) * Tl::kOctetsPerRow + (ct * 16 + c8) / 8];
            Octet<T> out;
#pragma unroll
            for (int j = 0; j < 8; ++j) out.v[j] = cast_to<T>(v[j] * Acc((keep >> j) & 1u) * dx_scale);  // NaN·0 = NaN
            store_octet(p.dx + m * p.K, c, p.K, out, p.dx_vec);
          });
        }
      }

      // dAᵀ[chunk] += g_up · (masked x tile)ᵀ · g slice; one owner warp per 16x16 unit.
      for (int u = warp; u < kUnits; u += kWarps) {
        const int ct = u % Tl::kColTiles, t = u / Tl::kColTiles;
        Acc* ap = dacc + ((c0 - kb) + ct * 16) * kLdAcc + t * 16;
        typename Mm::AccFrag part;
        Mm::zero(part);
#pragma unroll
        for (int ks = 0; ks < kRowTile / 16; ++ks) {
          typename Mm::template FragA<true> fa;  // (k, m) = xs[m][k]
          Mm::load_a(fa, xs + ks * 16 * Tl::kLdChunk + ct * 16, Tl::kLdChunk);
          typename Mm::template FragB<false> fb;  // (m, j) = gs[m][j]
          Mm::load_b(fb, gs + ks * 16 * kLdS + t * 16, kLdS);
          Mm::mma(part, fa, fb);
          if constexpr (kSplit) {
            Mm::load_b(fb, gs_lo + ks * 16 * kLdS + t * 16, kLdS);
            Mm::mma(part, fa, fb);
          }
        }
        // Added through the warp's scratch tile rather than a second fragment: registers (see above).
        warp_epilogue<T>(scratch, part, [&](int row, int c8, const Acc* v) {
#pragma unroll
          for (int j = 0; j < 8; ++j) ap[row * kLdAcc + c8 + j] += g_up * v[j];
        });
      }
    }
  }

  __syncthreads();
  const int64_t width = std::min<int64_t>(16 * NR, p.r - jbase);
  for (int64_t i = threadIdx.x; i < (ke - kb) * width; i += kThreads) {
    const int64_t c = i / width, j = i % width;
    const Acc v = dacc[c * kLdAcc + j];
    const int64_t k = kb + c, jj = jbase + j;
    if (p.m_spans == 1) p.da[jj * p.K + k] = cast_to<T>(v * p.da_scale);
    else p.da_part[(int64_t(blockIdx.x) * p.K + k) * p.r + jj] = v;
  }
}

template <typename T>
void run_dx(const DxArgs& a, const SpanPlan& plan, cudaStream_t stream) {
  DxParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.x_rs = a.x_stride_row;
  p.x_cs = a.x_stride_col;
  p.x_vec = a.x_vec;
  p.M = a.M;
  p.K = a.K;
  p.r = a.r;
  p.A = static_cast<const T*>(a.lora_A);
  p.g = static_cast<const acc_t<T>*>(a.g);
  p.dropout = a.dropout;
  p.seed = a.seed;
  p.threshold = a.threshold;
  p.rows_per_span = plan.rows_per_span;
  p.cols_per_span = plan.cols_per_span;
  p.m_spans = plan.m_spans;
  p.write_dx = a.write_grad_x;
  p.dx_vec = a.K % 8 == 0 && reinterpret_cast<uintptr_t>(a.grad_x) % 16 == 0;
  p.dx_scale = static_cast<acc_t<T>>(a.dx_scale);
  p.dx = static_cast<T*>(a.grad_x);
  p.da_scale = static_cast<acc_t<T>>(a.da_scale);
  p.da = static_cast<T*>(a.grad_A);
  p.da_part = static_cast<acc_t<T>*>(a.grad_A_ws);
  p.off_big = static_cast<uint32_t>(plan.off_big);
  p.off_op = static_cast<uint32_t>(plan.off_op);
  p.off_rank = static_cast<uint32_t>(plan.off_rank);
  p.off_rank_lo = static_cast<uint32_t>(plan.off_rank_lo);
  p.off_mask = static_cast<uint32_t>(plan.off_mask);
  p.off_scratch = static_cast<uint32_t>(plan.off_scratch);
  p.off_gmax = static_cast<uint32_t>(plan.off_gmax);
  p.off_acc = static_cast<uint32_t>(plan.off_acc);
  const dim3 grid(static_cast<unsigned>(plan.m_spans), static_cast<unsigned>(plan.c_spans),
                  static_cast<unsigned>(plan.r_chunks));
  dispatch_rank_tiles<T>(plan.nr, [&](auto nr) {
    auto kernel = &dx_da_kernel<T, decltype(nr)::value>;
    LK_ALLOW_SMEM(kernel, plan.smem);
    LK_LAUNCH(kernel, grid, dim3(kThreads), plan.smem, stream, p);
  });
  if (plan.m_spans > 1)
    reduce_partials<T, acc_t<T>>(p.da_part, plan.m_spans, a.K, a.r, a.da_scale, /*transpose=*/true, p.da, plan.num_sms, stream);
}

void launch_dx(const DxArgs& a, const SpanPlan& plan, void* stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    run_dx<T>(a, plan, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace gpu
}  // namespace lora_kernels
