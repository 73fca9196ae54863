// Kernels that test the harness itself (tests/test_cuda_harness.py), built into the harness module
// beside csrc/ and through the same path: thread and block indices, shared memory per block, the
// warp shuffles against CUDA's definition, launch-configuration errors, the half/bfloat16
// conversions, and the misuses a GPU would hang on (a barrier or shuffle not every thread reaches).
#include "common.h"

namespace vqim {
namespace {

// out[global linear thread id] = (block linear id, thread linear id), CUDA's x-fastest order.
__global__ void probe_indices(int64_t* out) {
  const int64_t block = blockIdx.x + gridDim.x * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  const int64_t thread = threadIdx.x + blockDim.x * (threadIdx.y + static_cast<int64_t>(blockDim.y) * threadIdx.z);
  const int64_t per_block = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  out[2 * (block * per_block + thread)] = block;
  out[2 * (block * per_block + thread) + 1] = thread;
}

// Per thread: what its static and dynamic shared slots held before any write (the harness's
// 0xFF poison, never another block's values), then a neighbour's value written in this block.
__global__ void probe_shared(uint32_t* before, uint32_t* neighbour) {
  __shared__ uint32_t fixed[64];
  extern __shared__ uint32_t dynamic[];
  const int t = threadIdx.x, n = blockDim.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * n + t;
  before[2 * i] = fixed[t];
  before[2 * i + 1] = dynamic[t];
  __syncthreads();
  fixed[t] = blockIdx.x * 1000 + t;
  dynamic[t] = blockIdx.x * 1000 + t + 500;
  __syncthreads();
  neighbour[2 * i] = fixed[(t + 1) % n];
  neighbour[2 * i + 1] = dynamic[(t + n - 1) % n];
}

// Every thread shuffles its own id: out[t] = the source lane's thread id (or its own) for xor
// with `operand`, then for up by `operand`, both with `width`; the mask is every lane its warp has.
__global__ void probe_shuffle(int* out, int operand, int width) {
  const int t = threadIdx.x;
  const int rest = static_cast<int>(blockDim.x) - t / 32 * 32;
  const int lanes = rest < 32 ? rest : 32;
  const unsigned mask = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
  out[2 * t] = __shfl_xor_sync(mask, t, operand, width);
  out[2 * t + 1] = __shfl_up_sync(mask, t, static_cast<unsigned>(operand), width);
}

// Threads below `leave` return; the others wait at a barrier they alone reach.
__global__ void probe_partial_barrier(int leave) {
  if (static_cast<int>(threadIdx.x) < leave) return;
  __syncthreads();
}

// Even and odd threads wait at two different barriers.
__global__ void probe_divergent_barrier() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Lane `leave` returns; the rest of the warp shuffles with the full mask.
__global__ void probe_partial_shuffle(int leave, float* out) {
  if (static_cast<int>(threadIdx.x) == leave) return;
  out[threadIdx.x] = warp_sum(1.f);
}

template <typename T>
void to_storage(std::uintptr_t in, std::uintptr_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) as_ptr<T>(out)[i] = from_float<T>(as_ptr<const float>(in)[i]);
}

template <typename T>
void from_storage(std::uintptr_t in, std::uintptr_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) as_ptr<float>(out)[i] = to_float(as_ptr<const T>(in)[i]);
}

}  // namespace
}  // namespace vqim

VQIM_REGISTER_OP(cuda_host_probes, [](vqim::py::module_& m) {
  using vqim::as_ptr;
  m.def("probe_indices", [](std::uintptr_t out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz) {
    vqim::probe_indices<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(as_ptr<int64_t>(out));
    VQIM_CUDA_CHECK(cudaGetLastError());
  });
  m.def("probe_shared", [](std::uintptr_t before, std::uintptr_t neighbour, unsigned blocks, unsigned threads,
                           std::size_t smem) {
    vqim::probe_shared<<<blocks, threads, smem>>>(as_ptr<uint32_t>(before), as_ptr<uint32_t>(neighbour));
    VQIM_CUDA_CHECK(cudaGetLastError());
  });
  m.def("probe_shuffle", [](std::uintptr_t out, unsigned threads, int operand, int width) {
    vqim::probe_shuffle<<<1, threads>>>(as_ptr<int>(out), operand, width);
    VQIM_CUDA_CHECK(cudaGetLastError());
  });
  m.def("probe_partial_barrier", [](unsigned threads, int leave) {
    vqim::probe_partial_barrier<<<2, threads>>>(leave);
    VQIM_CUDA_CHECK(cudaGetLastError());
  });
  m.def("probe_divergent_barrier", [](unsigned threads) {
    vqim::probe_divergent_barrier<<<1, threads>>>();
    VQIM_CUDA_CHECK(cudaGetLastError());
  });
  m.def("probe_partial_shuffle", [](int leave, std::uintptr_t out) {
    vqim::probe_partial_shuffle<<<1, 32>>>(leave, as_ptr<float>(out));
    VQIM_CUDA_CHECK(cudaGetLastError());
  });
  m.def("to_storage", [](int dtype, std::uintptr_t in, std::uintptr_t out, int64_t n) {
    VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] { vqim::to_storage<scalar_t>(in, out, n); });
  }, "float32 -> the dtype's storage, rounded as the kernels' stores round (from_float)");
  m.def("from_storage", [](int dtype, std::uintptr_t in, std::uintptr_t out, int64_t n) {
    VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] { vqim::from_storage<scalar_t>(in, out, n); });
  }, "the dtype's storage -> float32, as the kernels' loads convert (to_float)");
});
