// SPDX-License-Identifier: Apache-2.0
// CPU emulation of the small part of CUDA the lora_kernels kernels use, so that the kernel files
// (../*.cu) compile with a host compiler (-DLK_EMULATE) and run on CPU tensors. It exists because
// the CUDA backend is developed and tested on machines without a GPU: the emulation checks the
// indexing, tiling, span/partial-sum plans, dropout masks and barriers; it says nothing about speed.
//
// What is emulated, and how strictly:
// * a block's threads are fibers (ucontext) run round-robin on one OS thread; __syncthreads and
//   __syncwarp are real barriers (a divergent barrier or a thread exiting while others wait is an error);
// * shared memory is one buffer per launch, filled with 0xFF bytes (NaN) before every block so reads
//   of unwritten shared memory show up as NaN in the results;
// * WMMA fragments hold the whole 16x16 tile in every lane (the hardware layout is opaque, only the
//   API's semantics matter); load/store check the 32-byte pointer and ldm alignment rules, and
//   store_matrix_sync writes only 1/32 of the tile per lane, so a missing __syncwarp before other
//   lanes read the tile is caught;
// * blocks run one after another (a kernel must not rely on block concurrency anyway).
#pragma once

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// --- runtime API: the per-kernel dynamic shared-memory attribute, as the driver keeps it ---------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define C10_CUDA_CHECK(expr)                                                                 \
  do {                                                                                       \
    if ((expr) != cudaSuccess) throw std::runtime_error("lk_emu: " #expr " failed");       \
  } while (0)

namespace lk_emu {

// The attribute of each kernel (by its address): a launch with more dynamic shared memory than
// max(48 KiB, attribute) fails, as on a GPU.
inline std::map<const void*, int>& smem_attributes() {
  static std::map<const void*, int> attrs;
  return attrs;
}
constexpr int kEmulatedSmemOptin = 99 * 1024;

}  // namespace lk_emu

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int value) {
  if (value < 0 || value > ::lk_emu::kEmulatedSmemOptin) return cudaErrorInvalidValue;
  ::lk_emu::smem_attributes()[kernel] = value;
  return cudaSuccess;
}

namespace lk_emu {

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state = State::kDone;
  dim3 tid;
};

struct Launch {
  dim3 grid, block, bid;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  unsigned char* smem = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}

inline Fiber& self() {
  Launch* l = active();
  return l->fibers[l->current];
}

inline const dim3& thread_index() { return self().tid; }
inline const dim3& block_index() { return active()->bid; }
inline const dim3& block_dim() { return active()->block; }
inline const dim3& grid_dim() { return active()->grid; }
inline unsigned char* shared_memory() { return active()->smem; }

inline void yield_as(State s) {
  Launch* l = active();
  Fiber& f = l->fibers[l->current];
  f.state = s;
  swapcontext(&f.ctx, &l->scheduler);
}

// Called from kernel code: records the error and ends this thread; the launch then throws.
[[noreturn]] inline void fail(const std::string& msg) {
  Launch* l = active();
  if (l->error.empty()) l->error = msg;
  yield_as(State::kDone);
  std::abort();  // never resumed
}

inline void trampoline() {
  active()->body();
  yield_as(State::kDone);
}

struct Stacks {
  static constexpr size_t kBytes = 256 * 1024;
  std::vector<std::unique_ptr<char[]>> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) stacks.emplace_back(new char[kBytes]);
    return stacks[i].get();
  }
};

inline Stacks& stacks() {
  static Stacks s;
  return s;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  if (block.y != 1 || block.z != 1) throw std::runtime_error("lk_emu: only 1-D blocks are emulated");
  if (smem_bytes > 48 * 1024) {
    const auto it = smem_attributes().find(reinterpret_cast<const void*>(kernel));
    if (it == smem_attributes().end() || size_t(it->second) < smem_bytes)
      throw std::runtime_error("lk_emu: launch with " + std::to_string(smem_bytes) +
                               " bytes of dynamic shared memory above the kernel's attribute " +
                               std::to_string(it == smem_attributes().end() ? 48 * 1024 : it->second));
  }
  const unsigned n = block.x;
  Launch l;
  l.grid = grid;
  l.block = block;
  l.fibers.resize(n);
  std::vector<unsigned char> smem_store(smem_bytes + 128);
  l.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_store.data()) + 127) / 128 * 128);
  l.body = [&]() { kernel(static_cast<P>(args)...); };
  Launch* outer = active();
  active() = &l;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        l.bid = dim3(bx, by, bz);
        std::memset(l.smem, 0xFF, smem_bytes);
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = l.fibers[t];
          f.tid = dim3(t, 0, 0);
          f.state = State::kRunnable;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks().get(t);
          f.ctx.uc_stack.ss_size = Stacks::kBytes;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, trampoline, 0);
        }
        for (;;) {
          for (unsigned t = 0; t < n; ++t) {
            if (l.fibers[t].state != State::kRunnable) continue;
            l.current = static_cast<int>(t);
            swapcontext(&l.scheduler, &l.fibers[t].ctx);
          }
          if (!l.error.empty()) {
            active() = outer;
            throw std::runtime_error("lk_emu: " + l.error);
          }
          unsigned done = 0, at_block = 0;
          for (auto& f : l.fibers) {
            done += f.state == State::kDone;
            at_block += f.state == State::kBlockBarrier;
          }
          if (done == n) break;
          bool released = false;
          if (at_block == n) {
            for (auto& f : l.fibers) f.state = State::kRunnable;
            released = true;
          } else if (at_block > 0 && done > 0) {
            active() = outer;
            throw std::runtime_error("lk_emu: a thread exited while others wait at __syncthreads");
          }
          // A warp barrier opens when every live lane of the warp waits at one.
          for (unsigned w0 = 0; w0 < n && !released; w0 += 32) {
            bool all = true, any = false;
            for (unsigned t = w0; t < w0 + 32 && t < n; ++t) {
              const State s = l.fibers[t].state;
              if (s == State::kDone) continue;
              any = true;
              all = all && s == State::kWarpBarrier;
            }
            if (any && all) {
              for (unsigned t = w0; t < w0 + 32 && t < n; ++t)
                if (l.fibers[t].state == State::kWarpBarrier) l.fibers[t].state = State::kRunnable;
              released = true;
            }
          }
          bool runnable = false;
          for (auto& f : l.fibers) runnable = runnable || f.state == State::kRunnable;
          if (!runnable) {
            active() = outer;
            throw std::runtime_error("lk_emu: deadlock (divergent __syncthreads/__syncwarp)");
          }
        }
      }
  active() = outer;
}

}  // namespace lk_emu

#define threadIdx (::lk_emu::thread_index())
#define blockIdx (::lk_emu::block_index())
#define blockDim (::lk_emu::block_dim())
#define gridDim (::lk_emu::grid_dim())

inline void __syncthreads() { ::lk_emu::yield_as(::lk_emu::State::kBlockBarrier); }
// Fibers of a block never run at the same time: a plain read-modify-write is atomic.
inline unsigned atomicMax(unsigned* p, unsigned v) {
  const unsigned old = *p;
  if (v > old) *p = v;
  return old;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void __syncwarp(unsigned = 0xffffffffu) { ::lk_emu::yield_as(::lk_emu::State::kWarpBarrier); }

// --- WMMA with the API's semantics -----------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 is emulated");
  static constexpr int num_elements = 256;
  T x[256];  // element (i, j) at x[i*16 + j], whatever the layout
};

inline void check_pointer(const void* p, unsigned ldm, size_t es) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::lk_emu::fail("wmma pointer is not 32-byte aligned");
  if ((ldm * es) % 16 != 0) ::lk_emu::fail("wmma ldm is not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, V v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout");
  check_pointer(p, ldm, sizeof(T));
  constexpr bool col = std::is_same<Layout, col_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = col ? p[j * ldm + i] : p[i * ldm + j];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_pointer(p, ldm, sizeof(float));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = l == mem_col_major ? p[j * ldm + i] : p[i * ldm + j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_pointer(p, ldm, sizeof(float));
  const unsigned lane = threadIdx.x & 31;
  for (int e = static_cast<int>(lane); e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    (l == mem_col_major ? p[j * ldm + i] : p[i * ldm + j]) = f.x[e];
  }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += static_cast<float>(a.x[i * 16 + k]) * static_cast<float>(b.x[k * 16 + j]);
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
