// The CUDA device-side language, on the host: lets the csrc/*.cu files compile with the host C++
// compiler so the tests run every CUDA kernel on the CPU (DESIGN §6). The build
// (tests/cuda_harness.py) force-includes this header ahead of each unmodified source and swaps
// the `kernel<<<grid, block, smem, stream>>>(args)` launch tokens, the one piece of CUDA syntax no
// header can express, for `kernel % vqim_host::LaunchConfig(grid, block, smem, stream)(args)`.
//
// A launch runs its blocks one after another; a block's threads are fibers on one OS thread
// (runtime.cpp), switched only where CUDA threads may wait for each other: __syncthreads (every
// thread of the block) and the warp shuffles (the lanes of the mask). Everything is deterministic,
// and a barrier that not every thread reaches is reported, never waited on forever.
//
// The half and bfloat16 types and their conversions are the CUDA toolkit's own host code
// (cuda_fp16.hpp, cuda_bf16.hpp). What is not modelled: warp-synchronous code without a shuffle,
// races between blocks, timing, FMA contraction (host code is compiled without it; the kernels'
// __f*_rn intrinsics are exact either way) and the last-bit error of the GPU's approximate math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// csrc/common.h defines the warp reductions for device code only; the harness is device code.
#define VQIM_HOST_HARNESS 1

// Shared memory is one copy per block. thread_local, not static: `extern __shared__ float smem[];`
// must stay a declaration (`extern static` is ill-formed), and every fiber of a block runs on the
// one OS thread that launched it, so a thread_local is exactly one copy per running block. The
// build defines each dynamic (`extern`) array and the runtime fills all of them with 0xFF bytes
// (NaN, -1) before every block, as a GPU leaves shared memory uninitialized.
#undef __shared__
#define __shared__ thread_local
// Register limits are the GPU compiler's business (benchmarks/results/ptxas_*.txt).
#define __launch_bounds__(...)

namespace vqim_host {

// The CUDA thread now running: threadIdx and friends read it.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern ThreadState current;

void syncthreads(const char* file, int line);

enum class Shuffle : int { kXor = 0, kUp = 1 };
// The value `bits` of this lane goes to the warp's exchange; returns the source lane's bits.
std::uint64_t shuffle(Shuffle kind, unsigned mask, std::uint64_t bits, int operand, int width, const char* file,
                      int line);

struct LaunchConfig {
  dim3 grid, block;
  std::size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 grid_, dim3 block_, std::size_t smem_ = 0, cudaStream_t stream_ = nullptr)
      : grid(grid_), block(block_), smem(smem_), stream(stream_) {}
  template <typename... A>
  auto operator()(A&&... args) const;
};

// Runs every block of the grid; `body(ctx)` is one CUDA thread's call of the kernel.
void launch(const void* kernel, const LaunchConfig& cfg, void (*body)(void*), void* ctx);

template <typename... A>
struct BoundLaunch {
  LaunchConfig cfg;
  std::tuple<A...> args;
};

template <typename... A>
auto LaunchConfig::operator()(A&&... args) const {
  return BoundLaunch<std::decay_t<A>...>{*this, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
}

// `kernel % config(args)`: the launch. As on a GPU, the arguments are converted to the kernel's
// parameter types once, at the launch.
template <typename... P, typename... A>
void operator%(void (*kernel)(P...), BoundLaunch<A...>&& bound) {
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } call{kernel, std::apply([](auto&&... a) { return std::tuple<std::decay_t<P>...>(a...); }, bound.args)};
  launch(reinterpret_cast<const void*>(kernel), bound.cfg,
         [](void* ctx) {
           auto* c = static_cast<Call*>(ctx);
           std::apply(c->kernel, c->params);
         },
         &call);
}

template <typename T>
std::uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t),
                "the harness shuffles trivially copyable values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(std::uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace vqim_host

inline const uint3& threadIdx = vqim_host::current.thread_idx;
inline const uint3& blockIdx = vqim_host::current.block_idx;
inline const dim3& blockDim = vqim_host::current.block_dim;
inline const dim3& gridDim = vqim_host::current.grid_dim;
inline const int warpSize = 32;

// The call site travels with each wait, so a report names the barrier or shuffle.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  vqim_host::syncthreads(file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return vqim_host::from_bits<T>(
      vqim_host::shuffle(vqim_host::Shuffle::kXor, mask, vqim_host::to_bits(var), lane_mask, width, file, line));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return vqim_host::from_bits<T>(vqim_host::shuffle(vqim_host::Shuffle::kUp, mask, vqim_host::to_bits(var),
                                                    static_cast<int>(delta), width, file, line));
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<std::uint64_t>(a) * b) >> 32);
}

inline int __float_as_int(float x) { return vqim_host::from_bits<int>(vqim_host::to_bits(x)); }

// The GPU's ex2.approx(x * log2(e)): the same rounding of the argument, which dominates its error
// for large |x|; the approximation's last bits are not modelled.
inline float __expf(float x) { return std::exp2(x * 1.4426950408889634f); }

// Correctly rounded single operations: what host float arithmetic is without contraction.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
