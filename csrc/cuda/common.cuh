// SPDX-License-Identifier: Apache-2.0
// Device helpers shared by the kernel files: dtype conversions, the warp-level 16x16x16 MMA
// (tensor cores through WMMA for fp16/bf16, plain FMAs for fp32/fp64), the tile loaders (with the
// dropout mask applied while x is staged) and the partial-sum reduction.
//
// Every kernel here is written against these few primitives so that it can also be compiled for
// the CPU with LK_EMULATE (emulation/cuda_emulation.h runs a block's threads as fibers and emulates
// WMMA with its documented semantics); that is how the indexing is tested on machines without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#ifdef LK_EMULATE
#include "emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include "cuda/launchers.h"
#include "dropout.h"

#define LK_DEVICE __device__ __forceinline__

#ifdef LK_EMULATE
#define LK_DYNAMIC_SMEM(name) unsigned char* name = ::lk_emu::shared_memory()
#define LK_LAUNCH(kernel, grid, block, smem, stream, ...) ::lk_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define LK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
// `kernel` is a function-pointer variable, so template arguments with commas stay out of the macro.
#define LK_LAUNCH(kernel, grid, block, smem, stream, ...)   \
  do {                                                      \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                         \
  } while (0)
#endif
#define LK_ALLOW_SMEM(kernel, bytes) ::lora_kernels::gpu::allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes)

namespace lora_kernels {
namespace gpu {

// Dynamic shared memory beyond 48 KiB must be opted into, per kernel and device. The attribute is
// process-wide state: setting it to each launch's own size lets another host thread (or a graph
// capture) lower it between this thread's set and its launch. So it is only ever raised — to the
// largest size asked for so far on that device — under a lock, and a launch never lowers it.
inline void allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> raised;  // (kernel, device) -> attribute set
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = raised[{kernel, device}];
  if (bytes <= current) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  current = bytes;
}

#ifdef LK_EMULATE
using half_t = c10::Half;
using bf16_t = c10::BFloat16;
LK_DEVICE float to_acc(half_t v) { return static_cast<float>(v); }
LK_DEVICE float to_acc(bf16_t v) { return static_cast<float>(v); }
template <typename T>
LK_DEVICE std::enable_if_t<std::is_same<T, half_t>::value || std::is_same<T, bf16_t>::value, T> from_float(float v) {
  return T(v);
}
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
// torch builds with __CUDA_NO_HALF_CONVERSIONS__: convert explicitly (round to nearest even).
LK_DEVICE float to_acc(half_t v) { return __half2float(v); }
LK_DEVICE float to_acc(bf16_t v) { return __bfloat162float(v); }
template <typename T>
LK_DEVICE std::enable_if_t<std::is_same<T, half_t>::value, T> from_float(float v) { return __float2half_rn(v); }
template <typename T>
LK_DEVICE std::enable_if_t<std::is_same<T, bf16_t>::value, T> from_float(float v) { return __float2bfloat16_rn(v); }
#endif
LK_DEVICE float to_acc(float v) { return v; }
LK_DEVICE double to_acc(double v) { return v; }

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Converts an accumulator (or a value of the same type) to the storage type T.
template <typename T>
LK_DEVICE T cast_to(float v) {
  if constexpr (std::is_same<T, float>::value) return v;
  else if constexpr (std::is_same<T, double>::value) return static_cast<double>(v);
  else return from_float<T>(v);
}
template <typename T>
LK_DEVICE T cast_to(double v) {
  if constexpr (std::is_same<T, double>::value) return v;
  else if constexpr (std::is_same<T, float>::value) return static_cast<float>(v);
  else return from_float<T>(static_cast<float>(v));
}
template <typename T, typename S>
LK_DEVICE T convert_value(S v) {
  if constexpr (std::is_same<T, S>::value) return v;
  else return cast_to<T>(to_acc(v));
}

template <typename T>
struct Tiling {
  static constexpr int kEs = sizeof(T);
  static constexpr int kBC = chunk_cols(kEs);            // columns of the long dim per chunk
  static constexpr int kColTiles = kBC / 16;             // 16-wide MMA tiles per chunk
  static constexpr int kLdChunk = ld_chunk(kEs);         // leading dim of chunk-wide tiles
  static constexpr int kOctetsPerRow = kBC / 8;
  static constexpr int kOctetIters = kRowTile * kOctetsPerRow / kThreads;
  static constexpr int kLdScratch = ld_scratch(sizeof(acc_t<T>));
  static constexpr int ld_rank_tiles(int nr) { return ld_rank(kEs, nr); }
  static constexpr int ld_acc(int nr) { return ld_rank(sizeof(acc_t<T>), nr); }
  static_assert(kRowTile * kOctetsPerRow % kThreads == 0, "a tile is a whole number of octets per thread");
};

// --- warp-level 16x16x16 MMA -------------------------------------------------------------------------
// Operand A is 16x16 (i, k), B is 16x16 (k, j), both in shared memory; COL = column-major, i.e. element
// (row, col) at p[col*ld + row]. C (accumulator) lives in registers and is read/written row-major.

// Plain FMAs (fp32/fp64, and bf16 below sm_80): fragments are views of shared memory; lane l owns
// the elements e = l + 32i (i < 8) of the 16x16 result, i.e. row (l >> 4) + 2i, column l & 15.
template <typename T>
struct ScalarMma {
  using Acc = acc_t<T>;
  struct Frag {
    const T* p;
    int ld;
  };
  template <bool COL>
  struct FragA : Frag {
    static constexpr bool kCol = COL;
  };
  template <bool COL>
  struct FragB : Frag {
    static constexpr bool kCol = COL;
  };
  struct AccFrag {
    Acc v[8];
  };
  static LK_DEVICE void zero(AccFrag& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = Acc(0);
  }
  template <typename F>
  static LK_DEVICE void load_a(F& f, const T* p, int ld) { f.p = p; f.ld = ld; }
  template <typename F>
  static LK_DEVICE void load_b(F& f, const T* p, int ld) { f.p = p; f.ld = ld; }
  template <typename FA, typename FB>
  static LK_DEVICE void mma(AccFrag& c, const FA& a, const FB& b) {
    const int lane = threadIdx.x & 31, col = lane & 15, row0 = lane >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = row0 + 2 * i;
      Acc s = c.v[i];
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const T av = FA::kCol ? a.p[k * a.ld + row] : a.p[row * a.ld + k];
        const T bv = FB::kCol ? b.p[col * b.ld + k] : b.p[k * b.ld + col];
        s += to_acc(av) * to_acc(bv);
      }
      c.v[i] = s;
    }
  }
  // c += s·d, element by element (both accumulators of one warp have the same layout).
  static LK_DEVICE void axpy(AccFrag& c, Acc s, const AccFrag& d) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] += s * d.v[i];
  }
  static LK_DEVICE void load_acc(AccFrag& c, const Acc* p, int ld) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = p[((lane >> 4) + 2 * i) * ld + (lane & 15)];
  }
  static LK_DEVICE void store_acc(Acc* p, int ld, const AccFrag& c) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 8; ++i) p[((lane >> 4) + 2 * i) * ld + (lane & 15)] = c.v[i];
  }
};

// Tensor cores through WMMA (fp16/bf16 in, fp32 accumulate). Pointers must be 32-byte aligned and ld
// a multiple of 8 elements (16 bytes): the tilings above guarantee both.
template <typename T>
struct WmmaMma {
  using Acc = float;
  template <bool COL>
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T,
                                       std::conditional_t<COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>>;
  template <bool COL>
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T,
                                       std::conditional_t<COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>>;
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static LK_DEVICE void zero(AccFrag& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  template <typename F>
  static LK_DEVICE void load_a(F& f, const T* p, int ld) { nvcuda::wmma::load_matrix_sync(f, p, ld); }
  template <typename F>
  static LK_DEVICE void load_b(F& f, const T* p, int ld) { nvcuda::wmma::load_matrix_sync(f, p, ld); }
  template <typename FA, typename FB>
  static LK_DEVICE void mma(AccFrag& c, const FA& a, const FB& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  static LK_DEVICE void axpy(AccFrag& c, float s, const AccFrag& d) {
#pragma unroll
    for (int i = 0; i < c.num_elements; ++i) c.x[i] += s * d.x[i];
  }
  static LK_DEVICE void load_acc(AccFrag& c, const float* p, int ld) {
    nvcuda::wmma::load_matrix_sync(c, p, ld, nvcuda::wmma::mem_row_major);
  }
  static LK_DEVICE void store_acc(float* p, int ld, const AccFrag& c) {
    nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
  }
};

// Which MMA a dtype uses in the code being compiled. The host pass of nvcc never runs kernel bodies;
// it gets the scalar path so that it needs no WMMA types.
template <typename T>
struct MmaFor {
  using type = ScalarMma<T>;
};
#if defined(LK_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700)
template <>
struct MmaFor<half_t> {
  using type = WmmaMma<half_t>;
};
#endif
#if defined(LK_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
template <>
struct MmaFor<bf16_t> {
  using type = WmmaMma<bf16_t>;
};
#endif
template <typename T>
using Mma = typename MmaFor<T>::type;

// --- eight consecutive elements of a row ---------------------------------------------------------------
template <typename T>
struct alignas(16) Octet {
  T v[8];
};

template <typename T>
LK_DEVICE T zero_of() {
  return cast_to<T>(0.0f);
}

// Row `m`, columns [c, c+8) of a (rows x cols) matrix with the given strides; zero outside.
// `vec`: one or more 16-byte loads (the caller checked unit column stride, 16-byte aligned rows and
// cols % 8 == 0, so an octet is either wholly inside or wholly outside).
template <typename T>
LK_DEVICE Octet<T> load_octet(const T* __restrict__ src, int64_t rs, int64_t cs, int64_t m, int64_t c, int64_t rows,
                              int64_t cols, bool vec) {
  Octet<T> o;
  if (vec) {
    if (m < rows && c < cols) {
      const uint4* p = reinterpret_cast<const uint4*>(src + m * rs + c);
      uint4* q = reinterpret_cast<uint4*>(&o);
#pragma unroll
      for (int w = 0; w < int(sizeof(Octet<T>) / 16); ++w) q[w] = p[w];
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) o.v[j] = zero_of<T>();
    }
    return o;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) o.v[j] = (m < rows && c + j < cols) ? src[m * rs + (c + j) * cs] : zero_of<T>();
  return o;
}

// --- dropout ------------------------------------------------------------------------------------------
struct DropoutState {
  bool on;
  uint64_t seed;
  uint32_t threshold;
};

LK_DEVICE DropoutState make_dropout(bool on, const int64_t* seed, uint32_t threshold) {
  // The seed stays on the device (no host sync); every thread reads the same word.
  return DropoutState{on, on ? static_cast<uint64_t>(*seed) : 0ull, threshold};
}

// Keep bits of the eight consecutive flat indices [flat, flat+8) (bit j: index flat+j): one Philox
// call when flat is a multiple of 8 (always, when K % 8 == 0), else the two groups it straddles.
LK_DEVICE uint32_t keep_octet(const DropoutState& d, uint64_t flat) {
  const uint64_t group = flat >> 3;
  const uint32_t shift = static_cast<uint32_t>(flat & 7);
  uint32_t bits = keep_bits8(d.seed, group, d.threshold);
  if (shift != 0) bits = (bits | (keep_bits8(d.seed, group + 1, d.threshold) << 8)) >> shift;
  return bits & 0xFFu;
}

// --- tile loaders (all threads of the block call them) ------------------------------------------------

// Rows [m0, m0+128) x columns [c0, c0+BC) of a big matrix (x or dY; any strides) into `tile`
// (ld = kLdChunk). With dropout, dropped elements are stored as x·0 — 0, or NaN where x is NaN/Inf,
// as torch's x·mask·scale gives (the 1/(1-p) factor is applied to the results, which keeps the
// staged values exact) — and, if `mask_out` is given, the keep bits of each octet are stored there
// too ([128][BC/8] bytes). `cols` is the full width (K): the flat index of (m, k) is m*cols + k.
template <typename T>
LK_DEVICE void load_big_tile(T* __restrict__ tile, uint8_t* __restrict__ mask_out, const T* __restrict__ src,
                             int64_t rs, int64_t cs, int64_t m0, int64_t c0, int64_t rows, int64_t cols, bool vec,
                             const DropoutState& d) {
  using Tl = Tiling<T>;
  const int tid = threadIdx.x;
  const int oc = tid % Tl::kOctetsPerRow;
  const int row0 = tid / Tl::kOctetsPerRow;
  constexpr int kRowStep = kThreads / Tl::kOctetsPerRow;
  const int64_t c = c0 + 8 * oc;
  // All loads are issued before the Philox work so the generator overlaps the memory latency.
  Octet<T> v[Tl::kOctetIters];
#pragma unroll
  for (int i = 0; i < Tl::kOctetIters; ++i) v[i] = load_octet(src, rs, cs, m0 + row0 + i * kRowStep, c, rows, cols, vec);
#pragma unroll
  for (int i = 0; i < Tl::kOctetIters; ++i) {
    const int row = row0 + i * kRowStep;
    const int64_t m = m0 + row;
    uint32_t keep = 0xFFu;
    if (d.on && m < rows && c < cols) {
      keep = keep_octet(d, static_cast<uint64_t>(m) * static_cast<uint64_t>(cols) + static_cast<uint64_t>(c));
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (!((keep >> j) & 1u)) v[i].v[j] = cast_to<T>(to_acc(v[i].v[j]) * acc_t<T>(0));
    }
    *reinterpret_cast<Octet<T>*>(tile + row * Tl::kLdChunk + 8 * oc) = v[i];
    if (mask_out != nullptr) mask_out[row * Tl::kOctetsPerRow + oc] = static_cast<uint8_t>(keep);
  }
}

// A ROWS x COLS tile of a row-major matrix with unit column stride (A, B, xa, g: all small and
// L2-resident) into `dst` (leading dim ld), converted to T; zero outside rows_valid x cols_valid.
template <int ROWS, int COLS, typename T, typename S>
LK_DEVICE void load_small_tile(T* __restrict__ dst, int ld, const S* __restrict__ src, int64_t rs, int64_t rows_valid,
                               int64_t cols_valid) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int i = idx / COLS, j = idx % COLS;
    dst[i * ld + j] = (i < rows_valid && j < cols_valid) ? convert_value<T>(src[i * rs + j]) : zero_of<T>();
  }
}

// --- g = dY·B (fp32) as an operand of 16-bit tensor-core products ---------------------------------------
// g stays fp32 (docs/design.md §1): rounded to fp16 it overflows at 65504, which loss-scaled gradients reach,
// and it carries more bits than the input dtype. Tensor cores take 16-bit operands, so a slice of g
// is staged as two tiles with hi + lo = g·2^-e: hi is g·2^-e rounded to T, lo the rounding error
// rounded to T (22 significant bits for fp16, 16 for bf16, against 11/8 for g rounded to T); both
// are multiplied by the exact 16-bit operand and accumulated in fp32, and the result is scaled back
// by 2^e. e is one power of two per staged slice, chosen so its largest finite |g| lands in
// [2^13, 2^14): no overflow, and the scaling is exact. NaN/Inf in g pass through unchanged.

// Whether a kernel over T stages g split (16-bit T) or as it is (fp32/fp64: g already has T's type).
template <typename T>
constexpr bool kSplitG = sizeof(T) == 2;

// 2^e for the slice rows [0, rows_valid) x cols [0, cols) of src (row stride rs): the factor the
// products of the staged slice are multiplied by. All threads call it; `slot` is 4 bytes of shared
// memory. Barriers inside; the caller must have a barrier between its last read of a previous
// result of this function and this call (the top-of-tile __syncthreads of every caller).
LK_DEVICE float split_scale(const float* __restrict__ src, int64_t rs, int64_t rows_valid, int64_t cols, int rows,
                            unsigned* slot) {
  float m = 0.0f;
  const int64_t n = std::min<int64_t>(rows, rows_valid) * cols;
  for (int64_t idx = threadIdx.x; idx < n; idx += kThreads) {
    const float a = fabsf(src[(idx / cols) * rs + idx % cols]);
    if (a <= 3.402823466e38f) m = fmaxf(m, a);  // finite values only (NaN fails the test)
  }
  if (threadIdx.x == 0) *slot = 0u;
  __syncthreads();
  atomicMax(slot, __float_as_uint(m));  // non-negative floats order as their bit patterns
  __syncthreads();
  const float mx = __uint_as_float(*slot);
  if (mx == 0.0f) return 1.0f;
  int ex;
  frexpf(mx, &ex);  // mx = f·2^ex, f in [0.5, 1)
  return ldexpf(1.0f, std::max(-126, std::min(126, ex - 14)));
}

// A ROWS x COLS slice of fp32 src into hi and lo (leading dim ld): hi + lo = src·down (see above);
// zero outside rows_valid x cols_valid.
template <int ROWS, int COLS, typename T>
LK_DEVICE void load_split_tile(T* __restrict__ hi, T* __restrict__ lo, int ld, const float* __restrict__ src,
                               int64_t rs, int64_t rows_valid, int64_t cols_valid, float down) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int i = idx / COLS, j = idx % COLS;
    const float v = (i < rows_valid && j < cols_valid) ? src[i * rs + j] * down : 0.0f;
    const T h = cast_to<T>(v);
    hi[i * ld + j] = h;
    lo[i * ld + j] = cast_to<T>(v - to_acc(h));  // exact in fp32; NaN/Inf give NaN, as hi does
  }
}

// Hands the 16x16 accumulator of this warp to `f` as octets: lane l gets row l >> 1, columns
// 8*(l & 1) .. +7, via the warp's scratch tile (ld = kLdScratch). All lanes must call it.
template <typename T, typename F>
LK_DEVICE void warp_epilogue(acc_t<T>* scratch, const typename Mma<T>::AccFrag& acc, F&& f) {
  using Tl = Tiling<T>;
  Mma<T>::store_acc(scratch, Tl::kLdScratch, acc);
  __syncwarp();
  const int lane = threadIdx.x & 31;
  const int row = lane >> 1, c8 = 8 * (lane & 1);
  acc_t<T> v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = scratch[row * Tl::kLdScratch + c8 + j];
  __syncwarp();
  f(row, c8, v);
}

// Writes eight values at out[c .. c+8) of a row that is `cols` long: one 16-byte store when the
// row is aligned and whole, else element by element up to `cols`.
template <typename T>
LK_DEVICE void store_octet(T* __restrict__ row_ptr, int64_t c, int64_t cols, const Octet<T>& o, bool vec) {
  if (vec && c + 8 <= cols) {
    *reinterpret_cast<Octet<T>*>(row_ptr + c) = o;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (c + j < cols) row_ptr[c + j] = o.v[j];
  }
}

// out[o] = scale · Σ_s part[s][c][j] over the S partials of a (C x r) matrix; o = c*r + j, or
// j*C + c when `transpose` (dA is stored (r, K) but accumulated as (K, r)). Fixed summation order:
// deterministic.
template <typename Out, typename Acc>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const Acc* __restrict__ part, int64_t S, int64_t C,
                                                                   int64_t r, Acc scale, bool transpose,
                                                                   Out* __restrict__ out) {
  const int64_t n = C * r;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * kThreads) {
    Acc s = Acc(0);
    for (int64_t p = 0; p < S; ++p) s += part[p * n + idx];
    const int64_t c = idx / r, j = idx % r;
    out[transpose ? j * C + c : idx] = cast_to<Out>(s * scale);
  }
}

template <typename Out, typename Acc>
inline void reduce_partials(const Acc* part, int64_t S, int64_t C, int64_t r, double scale, bool transpose, Out* out,
                            int num_sms, cudaStream_t stream) {
  const int64_t n = C * r;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 8 * int64_t(num_sms))));
  auto kernel = &reduce_partials_kernel<Out, Acc>;
  LK_LAUNCH(kernel, dim3(blocks), dim3(kThreads), 0, stream, part, S, C, r, static_cast<Acc>(scale), transpose, out);
}

// Launch-time dispatch from the runtime dtype to the template (`f` is called with a T* tag).
template <typename F>
inline void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kHalf: f(static_cast<half_t*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<bf16_t*>(nullptr)); break;
    case DType::kFloat: f(static_cast<float*>(nullptr)); break;
    case DType::kDouble: f(static_cast<double*>(nullptr)); break;
  }
}

// ... and from the runtime rank-tile count to NR (only the counts the dtype allows are instantiated).
template <typename T, typename F>
inline void dispatch_rank_tiles(int nr, F&& f) {
  if (nr == 1) f(std::integral_constant<int, 1>());
  if constexpr (Tiling<T>::kEs <= 4) {
    if (nr == 2) f(std::integral_constant<int, 2>());
  }
  if constexpr (Tiling<T>::kEs <= 2) {
    if (nr == 4) f(std::integral_constant<int, 4>());
  }
}

}  // namespace gpu
}  // namespace lora_kernels
