// SPDX-License-Identifier: Apache-2.0
// The interface between the op layer (ops_cuda.cpp: checks, allocation, cuBLAS) and the kernel
// files (*.cu): plain structs of pointers and sizes, the launch plans, and the launchers.
//
// Nothing here needs CUDA or ATen headers, for two reasons: ops_cuda.cpp is compiled by the host
// compiler and should not pull in device code, and the CPU emulation of the kernels
// (emulation/emulated_ops.cpp) must see exactly the same plans as a GPU build — the plans decide
// the grid, the spans and the partial-sum workspaces, which is where indexing bugs hide.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace lora_kernels {
namespace gpu {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

inline int element_size(DType t) {
  return t == DType::kDouble ? 8 : t == DType::kFloat ? 4 : 2;
}
// Kernels accumulate in fp32 (fp64 for double inputs); partial sums and g = dY·B use this type.
inline int acc_size(DType t) {
  return t == DType::kDouble ? 8 : 4;
}

// --- tiling shared by every kernel -----------------------------------------------------------------
// A block is 8 warps; a row tile is 8 x 16 rows (one 16-row MMA tile per warp). The long dimension
// (K of x, N of dY) is walked in chunks of 128 bytes per row, so an x/dY tile in shared memory is
// always 16 KiB whatever the dtype. The rank is processed 16·nr columns at a time with nr <= 4 for
// 16-bit types (one pass covers r <= 64), nr <= 2 for fp32 and nr = 1 for fp64, which keeps every
// shared-memory budget under the 99 KiB a block may use on sm_86/sm_89.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowTile = 16 * kWarps;

constexpr int chunk_cols(int es) { return 128 / es; }
constexpr int max_rank_tiles(int es) { return 8 / es; }
// Row padding of 16 bytes: keeps every row 16-byte aligned (vector stores, WMMA's ldm rule) and
// staggers rows across shared-memory banks.
constexpr int row_pad(int es) { return 16 / es; }
constexpr int ld_chunk(int es) { return chunk_cols(es) + row_pad(es); }
constexpr int ld_rank(int es, int nr) { return 16 * nr + row_pad(es); }
constexpr int ld_scratch(int acc_es) { return 16 + row_pad(acc_es); }

// Rank tiles per pass: the smallest of 1, 2, 4 covering r, capped by the dtype's maximum.
inline int pick_rank_tiles(int64_t r, int es) {
  const int nr = r <= 16 ? 1 : r <= 32 ? 2 : 4;
  return std::min(nr, max_rank_tiles(es));
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared-memory carving, computed once on the host and passed to the kernel as offsets so host
// and device cannot disagree. Regions are 128-byte aligned (WMMA needs 32).
struct SmemCarver {
  size_t bytes = 0;
  size_t add(size_t n) {
    const size_t off = (bytes + 127) / 128 * 128;
    bytes = off + n;
    return off;
  }
};

struct DeviceInfo {
  int num_sms = 1;
  size_t max_smem_per_block = 48 * 1024;  // opt-in maximum of dynamic shared memory
  size_t smem_per_sm = 100 * 1024;
  // Shared memory for the column accumulators of the span kernels; 0 = pick from the device.
  size_t acc_budget = 0;
};

// The driver reserves 1 KiB of shared memory per resident block.
constexpr size_t kSmemReservedPerBlock = 1024;

// Blocks per SM the plans aim for: two keep enough loads in flight without an async-copy pipeline.
// Every kernel is compiled with __launch_bounds__(kThreads, kBlocksPerSm), so ptxas holds it to
// 65536 / (256 · 2) = 128 registers per thread and registers never cut the SM to one block (without
// the bound, the rank-64 kernels took 168–250 registers: one block per SM where the plan assumed
// two). Shared memory is then the only limit, computed below; `cuda_static_report` checks both
// against the compiled kernels (ptxas figures) for sm_80 and sm_90.
constexpr int kBlocksPerSm = 2;
constexpr int kRegistersPerSm = 65536;
constexpr int kMaxRegisters = kRegistersPerSm / (kThreads * kBlocksPerSm);

// The one exception: the bf16 x pass (dA + fused dX prefill) spills 8–16 bytes under the 128-register
// bound on sm_90, so it is bound to one block per SM (no spills) and its plan assumes one.
// TODO(GPU): measure whether two blocks with the small spill are faster.
inline int x_pass_blocks_per_sm(DType t) { return t == DType::kBFloat16 ? 1 : kBlocksPerSm; }

// Blocks per SM that fit (at most `cap`, the kernel's launch bound) and the blocks that fill the
// GPU once.
inline int64_t blocks_per_sm(const DeviceInfo& dev, size_t smem, int cap = kBlocksPerSm) {
  return std::max<int64_t>(
      1, std::min<int64_t>(cap, int64_t(dev.smem_per_sm / (std::max<size_t>(smem, 1) + kSmemReservedPerBlock))));
}
inline int64_t target_blocks(const DeviceInfo& dev, size_t smem, int cap = kBlocksPerSm) {
  return std::max<int64_t>(1, dev.num_sms * blocks_per_sm(dev, smem, cap));
}
// The fraction of the slots busy over the waves a grid of `blocks` takes (1 = whole waves only).
inline double wave_efficiency(int64_t blocks, int64_t slots) {
  return double(blocks) / double(ceil_div(blocks, slots) * slots);
}

// --- xa = dropout(x)·Aᵀ (dropout_project.cu) ---------------------------------------------------------
struct ProjectPlan {
  int nr = 1, r_chunks = 1, splits = 1;
  int num_sms = 1;
  int64_t k_per_split = 0;
  int64_t workspace = 0;  // acc elements: splits x M x r partial sums when split over K
  size_t smem = 0, off_x = 0, off_a = 0, off_scratch = 0;
};

inline ProjectPlan plan_project(int64_t M, int64_t K, int64_t r, DType t, const DeviceInfo& dev) {
  const int es = element_size(t), aes = acc_size(t), bc = chunk_cols(es);
  ProjectPlan p;
  p.num_sms = dev.num_sms;
  p.nr = pick_rank_tiles(r, es);
  p.r_chunks = static_cast<int>(ceil_div(r, 16 * p.nr));
  SmemCarver c;
  p.off_x = c.add(size_t(kRowTile) * ld_chunk(es) * es);
  p.off_a = c.add(size_t(16 * p.nr) * ld_chunk(es) * es);
  p.off_scratch = c.add(size_t(kWarps) * 16 * ld_scratch(aes) * aes);
  p.smem = c.bytes;
  // Few rows (decode, or M = 8192 on 132 SMs): split K so the GPU is not left idle, with as many
  // splits as fit one wave (rounding up would start a second, mostly empty wave: 320 blocks for 264
  // slots); each split walks >= 4 chunks.
  const int64_t row_tiles = ceil_div(M, kRowTile), k_chunks = ceil_div(K, bc);
  const int64_t blocks = row_tiles * p.r_chunks, want = target_blocks(dev, p.smem);
  int64_t splits = 1;
  if (blocks < want) splits = std::max<int64_t>(1, std::min(want / blocks, k_chunks / 4));
  p.k_per_split = ceil_div(k_chunks, splits) * bc;
  p.splits = static_cast<int>(ceil_div(K, p.k_per_split));
  p.workspace = p.splits > 1 ? p.splits * M * r : 0;
  return p;
}

struct ProjectArgs {
  DType dtype;
  const void* x;
  int64_t x_stride_row, x_stride_col;
  bool x_vec;  // 16-byte vector loads of x are legal (unit column stride, aligned rows, K % 8 == 0)
  int64_t M, K, r;
  const void* lora_A;  // (r, K) contiguous
  bool dropout;
  const int64_t* seed;  // device pointer, read by the kernel (no host sync)
  uint32_t threshold;
  double scale;  // 1/(1-p) with dropout, else 1
  void* xa;      // (M, r), x's dtype
  void* workspace;
};
void launch_project(const ProjectArgs& a, const ProjectPlan& p, void* stream);

// --- rank-r expansion: y = bias + s·xa·Bᵀ, or dX prefill = s·D ⊙ (g·A) (lora_expand.cu) ------------------
enum class ExpandMode { kOutput, kGradInput };

struct ExpandPlan {
  int nr = 1;
  size_t smem = 0, off_s = 0, off_s_lo = 0, off_op = 0, off_scratch = 0, off_gmax = 0;
};

// 16-bit inputs stage g (fp32) as hi + lo tiles for the tensor cores (common.cuh, load_split_tile):
// the lo tile and a 4-byte slot for the slice's scale take shared memory too.
inline bool splits_g(DType t) { return element_size(t) == 2; }

inline ExpandPlan plan_expand(int64_t r, ExpandMode mode, DType t) {
  const int es = element_size(t), aes = acc_size(t), bc = chunk_cols(es);
  ExpandPlan p;
  p.nr = pick_rank_tiles(r, es);
  SmemCarver c;
  const bool split = mode == ExpandMode::kGradInput && splits_g(t);
  p.off_s = c.add(size_t(kRowTile) * ld_rank(es, p.nr) * es);
  p.off_s_lo = c.add(split ? size_t(kRowTile) * ld_rank(es, p.nr) * es : 0);
  p.off_op = c.add(mode == ExpandMode::kOutput ? size_t(bc) * ld_rank(es, p.nr) * es
                                               : size_t(16 * p.nr) * ld_chunk(es) * es);
  p.off_scratch = c.add(size_t(kWarps) * 16 * ld_scratch(aes) * aes);
  p.off_gmax = c.add(split ? sizeof(unsigned) : 0);
  p.smem = c.bytes;
  return p;
}

struct ExpandArgs {
  DType dtype;
  ExpandMode mode;
  const void* s_mat;  // kOutput: xa (M, r) in the dtype; kGradInput: g (M, r) in the acc type
  const void* op;     // kOutput: lora_B (C=N, r); kGradInput: lora_A (r, C=K); contiguous
  const void* bias;   // kOutput only, may be null
  int64_t M, C, r;
  double scale;  // kOutput: s; kGradInput: s/(1-p) with dropout, else s
  bool dropout;  // kGradInput only
  const int64_t* seed;
  uint32_t threshold;
  void* out;  // (M, C) contiguous
};
void launch_expand(const ExpandArgs& a, const ExpandPlan& p, void* stream);

// --- span kernels: blocks own (row span x column span) and keep column accumulators in shared memory -----
// A block of the dY pass (or the x pass) walks a rectangle of rows x columns of dY (x). Column sums
// (dB, dA) stay in shared memory for the block's column span and are written once per row span;
// row sums (g) are complete over the block's column span and written once per column span. What is
// left across spans goes through fp32 partials and a fixed-order reduction (deterministic), so the
// span shape is a trade-off: wide column spans need shared memory (cols x r x 4 bytes), many row
// spans multiply the dB/dA partials, many column spans the g partials (dY pass) or the re-reads of g
// (x pass). plan_span picks the shape with the rough traffic model below; its weights are estimates,
// not measurements (no GPU was available when it was written) — tune them on one.
enum class SpanKind { kGradY, kX };

struct SpanPlan {
  int nr = 1, r_chunks = 1;
  int num_sms = 1;
  int64_t rows_per_span = 0, m_spans = 1, cols_per_span = 0, c_spans = 1;
  size_t smem = 0, off_big = 0, off_op = 0, off_rank = 0, off_rank_lo = 0, off_mask = 0, off_scratch = 0, off_gmax = 0,
         off_acc = 0;
  double traffic = 0;  // the model's estimate: bytes moved, inflated when one block per SM fits
  double cost = -1;    // ... and further when the grid does not fill the GPU (what the search minimises)
};

inline SpanPlan plan_span(int64_t M, int64_t C, int64_t r, DType t, const DeviceInfo& dev, SpanKind kind) {
  const int es = element_size(t), aes = acc_size(t), bc = chunk_cols(es);
  const bool x_pass = kind == SpanKind::kX;
  SpanPlan p;
  p.num_sms = dev.num_sms;
  p.nr = pick_rank_tiles(r, es);
  p.r_chunks = static_cast<int>(ceil_div(r, 16 * p.nr));
  SmemCarver fixed;
  p.off_big = fixed.add(size_t(kRowTile) * ld_chunk(es) * es);
  p.off_op = fixed.add(x_pass ? size_t(16 * p.nr) * ld_chunk(es) * es : size_t(bc) * ld_rank(es, p.nr) * es);
  const bool split = x_pass && splits_g(t);  // the x pass multiplies by g: hi + lo tiles
  const int cap = x_pass ? x_pass_blocks_per_sm(t) : kBlocksPerSm;
  p.off_rank = fixed.add(size_t(kRowTile) * ld_rank(es, p.nr) * es);
  p.off_rank_lo = fixed.add(split ? size_t(kRowTile) * ld_rank(es, p.nr) * es : 0);
  p.off_mask = fixed.add(x_pass ? size_t(kRowTile) * (bc / 8) : 0);
  p.off_scratch = fixed.add(size_t(kWarps) * 16 * ld_scratch(aes) * aes);
  p.off_gmax = fixed.add(split ? sizeof(unsigned) : 0);
  const size_t base = (fixed.bytes + 127) / 128 * 128;
  const size_t acc_row = size_t(ld_rank(aes, p.nr)) * aes;
  const size_t room = dev.max_smem_per_block > base ? dev.max_smem_per_block - base : 0;
  const int64_t row_tiles = ceil_div(M, kRowTile), c_chunks = ceil_div(C, bc);
  const double Md = double(M), Cd = double(C), rd = double(r);

  SpanPlan best;
  // Accumulator budgets tried: what keeps two blocks per SM (where the kernel allows two), and what
  // one block may have.
  for (int per_sm = cap; per_sm >= 1; --per_sm) {
    size_t budget = room;
    if (dev.acc_budget != 0) {  // fixed by the caller (the CPU emulation uses tiny budgets): one try
      if (per_sm < cap) break;
      budget = std::min(budget, dev.acc_budget);
    } else if (per_sm == 2) {
      const size_t share = dev.smem_per_sm / 2;
      budget = std::min(budget, share > base + kSmemReservedPerBlock ? share - base - kSmemReservedPerBlock : size_t(0));
    }
    int64_t cap_chunks = int64_t(budget / acc_row) / bc;
    if (dev.acc_budget != 0 && room >= size_t(bc) * acc_row) cap_chunks = std::max<int64_t>(1, cap_chunks);
    if (cap_chunks < 1) continue;
    const int64_t min_spans = ceil_div(c_chunks, cap_chunks);
    int64_t last_spans = 0;
    for (int64_t want = min_spans; want <= std::min<int64_t>(c_chunks, min_spans + 512); ++want) {
      SpanPlan q = p;
      q.cols_per_span = ceil_div(c_chunks, want) * bc;
      q.c_spans = ceil_div(C, q.cols_per_span);
      if (q.c_spans == last_spans) continue;  // same layout as the previous count
      last_spans = q.c_spans;
      SmemCarver cc = fixed;
      q.off_acc = cc.add(size_t(q.cols_per_span) * acc_row);
      q.smem = cc.bytes;
      const int64_t slots = target_blocks(dev, q.smem, cap);
      // As many row spans as fit the slots left by the column spans (rounding up would start a
      // second, mostly empty wave).
      const int64_t m_want = std::min(row_tiles, std::max<int64_t>(1, slots / (q.c_spans * q.r_chunks)));
      q.rows_per_span = ceil_div(row_tiles, m_want) * kRowTile;
      q.m_spans = ceil_div(M, q.rows_per_span);
      // Traffic (bytes): the streamed matrix (once per rank chunk); partials written and read back;
      // re-reads of g (x pass) or xa (dY pass) per column span, from L2 (weighted 1/3).
      const double cs = double(q.c_spans), ms = double(q.m_spans);
      double cost = Md * Cd * es * q.r_chunks + (q.m_spans > 1 ? 2.0 * ms * Cd * rd * aes : 0.0);
      if (x_pass) cost += cs * Md * rd * aes / 3.0;
      else cost += (q.c_spans > 1 ? 2.0 * cs * Md * rd * aes : 0.0) + cs * Md * rd * es / 3.0;
      // One block per SM keeps fewer loads in flight (estimate: 70% of the bandwidth); a grid
      // that leaves slots idle (smaller than the GPU, or a partial last wave) costs its idle share.
      q.traffic = cost / (blocks_per_sm(dev, q.smem, cap) >= 2 ? 1.0 : 0.7);
      q.cost = q.traffic / wave_efficiency(q.m_spans * q.c_spans * q.r_chunks, slots);
      if (best.cost < 0 || q.cost < best.cost) best = q;
    }
  }
  return best;
}

// g = dY·B (acc type) and dB = s·dYᵀ·xa in one pass over dY (backward_dy.cu).
struct DyArgs {
  DType dtype;
  const void* grad_y;  // (M, N) contiguous
  const void* lora_B;  // (N, r)
  const void* xa;      // (M, r)
  int64_t M, N, r;
  double scale;     // s, for dB
  void* g;          // (M, r), acc type
  void* grad_B;     // (N, r), dtype
  void* g_ws;       // c_spans x M x r partials, when c_spans > 1
  void* grad_B_ws;  // m_spans x N x r partials, when m_spans > 1
};
inline SpanPlan plan_dy(int64_t M, int64_t N, int64_t r, DType t, const DeviceInfo& dev) {
  return plan_span(M, N, r, t, dev, SpanKind::kGradY);
}
inline int64_t dy_g_workspace(const SpanPlan& p, int64_t M, int64_t r) { return p.c_spans > 1 ? p.c_spans * M * r : 0; }
inline int64_t dy_b_workspace(const SpanPlan& p, int64_t N, int64_t r) { return p.m_spans > 1 ? p.m_spans * N * r : 0; }
void launch_dy(const DyArgs& a, const SpanPlan& p, void* stream);

// dA = s·gᵀ·(D ⊙ x), and when fused the dX prefill s·D ⊙ (g·A), in one pass over x (backward_dx.cu).
struct DxArgs {
  DType dtype;
  const void* x;
  int64_t x_stride_row, x_stride_col;
  bool x_vec;
  int64_t M, K, r;
  const void* lora_A;  // (r, K)
  const void* g;       // (M, r), acc type
  bool dropout;
  const int64_t* seed;
  uint32_t threshold;
  bool write_grad_x;  // fuse the dX prefill (needs the whole rank in one pass: r_chunks == 1)
  double dx_scale;    // s/(1-p) with dropout, else s
  void* grad_x;       // (M, K) contiguous
  double da_scale;    // same value: x is staged masked but unscaled
  void* grad_A;       // (r, K), dtype
  void* grad_A_ws;    // m_spans x K x r partials, when m_spans > 1
};
inline SpanPlan plan_dx(int64_t M, int64_t K, int64_t r, DType t, const DeviceInfo& dev) {
  return plan_span(M, K, r, t, dev, SpanKind::kX);
}
inline int64_t dx_a_workspace(const SpanPlan& p, int64_t K, int64_t r) { return p.m_spans > 1 ? p.m_spans * K * r : 0; }
void launch_dx(const DxArgs& a, const SpanPlan& p, void* stream);

// The keep-mask of the shared generator as bools (for bit-exact tests).
void launch_keep_mask(const int64_t* seed, int64_t n, uint32_t threshold, bool* out, int num_sms, void* stream);

}  // namespace gpu
}  // namespace lora_kernels
