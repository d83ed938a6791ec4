// SPDX-License-Identifier: Apache-2.0
// Backward, one pass over dY (docs/design.md §3): g = dY·B (M x r, kept in fp32) and dB = s·dYᵀ·xa (N x r).
//
// Both products read every element of dY once, so a block stages a 128-row x BC-column tile of dY in
// shared memory and uses it twice: row-wise against B's chunk (g) and column-wise against the
// 128 x r slice of xa (dB). The block owns a span of rows and a span of columns: g's row sums are
// complete over its column span, dB's column sums over its row span, and each is kept where it is
// cheapest — g in registers for the current row tile, dB in shared memory for the whole column
// span. Spans are sized for one wave of blocks; what is left across spans is reduced by
// reduce_partials in a fixed order, so the result is deterministic (no atomics).
#include "cuda/common.cuh"

namespace lora_kernels {
namespace gpu {

template <typename T>
struct DyParams {
  const T* dy;
  const T* B;
  const T* xa;
  int64_t M, N, r;
  bool dy_vec;
  int64_t rows_per_span, cols_per_span;
  int64_t m_spans, n_spans;
  acc_t<T> scale;
  acc_t<T>* g;       // final g (n_spans == 1)
  acc_t<T>* g_part;  // n_spans x M x r
  T* db;             // final dB (m_spans == 1)
  acc_t<T>* db_part; // m_spans x N x r
  uint32_t off_big, off_op, off_rank, off_scratch, off_acc;
};

template <typename T, int NR>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dy_pass_kernel(DyParams<T> p) {
  using Tl = Tiling<T>;
  using Mm = Mma<T>;
  using Acc = acc_t<T>;
  constexpr int kLdS = Tl::ld_rank_tiles(NR);
  constexpr int kLdAcc = Tl::ld_acc(NR);
  constexpr int kUnits = Tl::kColTiles * NR;  // 16x16 dB tiles per chunk
  LK_DYNAMIC_SMEM(smem);
  T* ys = reinterpret_cast<T*>(smem + p.off_big);   // dY tile [128][kLdChunk]
  T* bs = reinterpret_cast<T*>(smem + p.off_op);    // B chunk [BC][kLdS]
  T* xs = reinterpret_cast<T*>(smem + p.off_rank);  // xa slice [128][kLdS]
  Acc* dacc = reinterpret_cast<Acc*>(smem + p.off_acc);  // dB of the column span [cols_per_span][kLdAcc]
  const int warp = threadIdx.x / 32;
  Acc* scratch = reinterpret_cast<Acc*>(smem + p.off_scratch) + warp * 16 * Tl::kLdScratch;

  const int64_t mb = int64_t(blockIdx.x) * p.rows_per_span, me = std::min<int64_t>(p.M, mb + p.rows_per_span);
  const int64_t nb = int64_t(blockIdx.y) * p.cols_per_span, ne = std::min<int64_t>(p.N, nb + p.cols_per_span);
  const int64_t jbase = int64_t(blockIdx.z) * 16 * NR;
  const DropoutState none{false, 0, 0};

  for (int64_t i = threadIdx.x; i < p.cols_per_span * kLdAcc; i += kThreads) dacc[i] = Acc(0);

  for (int64_t m0 = mb; m0 < me; m0 += kRowTile) {
    __syncthreads();  // the previous row tile's readers of xs are done (and dacc is zeroed)
    load_small_tile<kRowTile, 16 * NR>(xs, kLdS, p.xa + m0 * p.r + jbase, p.r, p.M - m0, p.r - jbase);
    typename Mm::AccFrag g_acc[NR];
#pragma unroll
    for (int t = 0; t < NR; ++t) Mm::zero(g_acc[t]);

    for (int64_t c0 = nb; c0 < ne; c0 += Tl::kBC) {
      __syncthreads();
      load_big_tile(ys, nullptr, p.dy, p.N, int64_t(1), m0, c0, p.M, p.N, p.dy_vec, none);
      load_small_tile<Tl::kBC, 16 * NR>(bs, kLdS, p.B + c0 * p.r + jbase, p.r, p.N - c0, p.r - jbase);
      __syncthreads();
      // g[rows of this warp] += dY tile · B chunk. Unrolled by two, not fully: fully unrolled, the
      // bf16 rank-64 instance needs more than the 128 registers two blocks per SM allow and spills.
#pragma unroll 2
      for (int kk = 0; kk < Tl::kColTiles; ++kk) {
        typename Mm::template FragA<false> fa;
        Mm::load_a(fa, ys + warp * 16 * Tl::kLdChunk + kk * 16, Tl::kLdChunk);
#pragma unroll
        for (int t = 0; t < NR; ++t) {
          typename Mm::template FragB<false> fb;  // (n, j) = bs[n][j]
          Mm::load_b(fb, bs + kk * 16 * kLdS + t * 16, kLdS);
          Mm::mma(g_acc[t], fa, fb);
        }
      }
      // dB[chunk] += dY tileᵀ · xa slice; each 16x16 unit has one owner warp, so no two warps
      // touch the same accumulator.
      for (int u = warp; u < kUnits; u += kWarps) {
        const int ct = u % Tl::kColTiles, t = u / Tl::kColTiles;
        Acc* ap = dacc + ((c0 - nb) + ct * 16) * kLdAcc + t * 16;
        typename Mm::AccFrag acc;
        Mm::load_acc(acc, ap, kLdAcc);
#pragma unroll
        for (int ks = 0; ks < kRowTile / 16; ++ks) {
          typename Mm::template FragA<true> fa;  // (n, m) = ys[m][n]
          Mm::load_a(fa, ys + ks * 16 * Tl::kLdChunk + ct * 16, Tl::kLdChunk);
          typename Mm::template FragB<false> fb;  // (m, j) = xs[m][j]
          Mm::load_b(fb, xs + ks * 16 * kLdS + t * 16, kLdS);
          Mm::mma(acc, fa, fb);
        }
        Mm::store_acc(ap, kLdAcc, acc);
      }
    }

#pragma unroll
    for (int t = 0; t < NR; ++t) {
      warp_epilogue<T>(scratch, g_acc[t], [&](int row, int c8, const Acc* v) {
        const int64_t m = m0 + warp * 16 + row;
        if (m >= p.M) return;
        for (int j = 0; j < 8; ++j) {
          const int64_t jj = jbase + t * 16 + c8 + j;
          if (jj >= p.r) break;
          if (p.n_spans == 1) p.g[m * p.r + jj] = v[j];
          else p.g_part[(int64_t(blockIdx.y) * p.M + m) * p.r + jj] = v[j];
        }
      });
    }
  }

  __syncthreads();
  const int64_t width = std::min<int64_t>(16 * NR, p.r - jbase);
  for (int64_t i = threadIdx.x; i < (ne - nb) * width; i += kThreads) {
    const int64_t c = i / width, j = i % width;
    const Acc v = dacc[c * kLdAcc + j];
    const int64_t n = nb + c, jj = jbase + j;
    if (p.m_spans == 1) p.db[n * p.r + jj] = cast_to<T>(v * p.scale);
    else p.db_part[(int64_t(blockIdx.x) * p.N + n) * p.r + jj] = v;
  }
}

template <typename T>
void run_dy(const DyArgs& a, const SpanPlan& plan, cudaStream_t stream) {
  DyParams<T> p;
  p.dy = static_cast<const T*>(a.grad_y);
  p.B = static_cast<const T*>(a.lora_B);
  p.xa = static_cast<const T*>(a.xa);
  p.M = a.M;
  p.N = a.N;
  p.r = a.r;
  p.dy_vec = a.N % 8 == 0 && reinterpret_cast<uintptr_t>(a.grad_y) % 16 == 0;
  p.rows_per_span = plan.rows_per_span;
  p.cols_per_span = plan.cols_per_span;
  p.m_spans = plan.m_spans;
  p.n_spans = plan.c_spans;
  p.scale = static_cast<acc_t<T>>(a.scale);
  p.g = static_cast<acc_t<T>*>(a.g);
  p.g_part = static_cast<acc_t<T>*>(a.g_ws);
  p.db = static_cast<T*>(a.grad_B);
  p.db_part = static_cast<acc_t<T>*>(a.grad_B_ws);
  p.off_big = static_cast<uint32_t>(plan.off_big);
  p.off_op = static_cast<uint32_t>(plan.off_op);
  p.off_rank = static_cast<uint32_t>(plan.off_rank);
  p.off_scratch = static_cast<uint32_t>(plan.off_scratch);
  p.off_acc = static_cast<uint32_t>(plan.off_acc);
  const dim3 grid(static_cast<unsigned>(plan.m_spans), static_cast<unsigned>(plan.c_spans),
                  static_cast<unsigned>(plan.r_chunks));
  dispatch_rank_tiles<T>(plan.nr, [&](auto nr) {
    auto kernel = &dy_pass_kernel<T, decltype(nr)::value>;
    LK_ALLOW_SMEM(kernel, plan.smem);
    LK_LAUNCH(kernel, grid, dim3(kThreads), plan.smem, stream, p);
  });
  if (plan.c_spans > 1) reduce_partials<acc_t<T>, acc_t<T>>(p.g_part, plan.c_spans, a.M, a.r, 1.0, false, p.g, plan.num_sms, stream);
  if (plan.m_spans > 1) reduce_partials<T, acc_t<T>>(p.db_part, plan.m_spans, a.N, a.r, a.scale, false, p.db, plan.num_sms, stream);
}

void launch_dy(const DyArgs& a, const SpanPlan& plan, void* stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    run_dy<T>(a, plan, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace gpu
}  // namespace lora_kernels
