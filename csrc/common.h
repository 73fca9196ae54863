// Shared helpers for the vqim CUDA kernels.
//
// The extension links no libtorch: Python passes raw data pointers (as integers), shapes,
// strides, a dtype code and the current CUDA stream. Each op file registers its own pybind11
// bindings through VQIM_REGISTER_OP, so adding an op touches no shared file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace vqim {

namespace py = pybind11;

// Must match kernels/_ext.py DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

using Binder = std::function<void(py::module_&)>;

// Function-local static: safe against static-initialization order across translation units.
inline std::vector<std::pair<std::string, Binder>>& op_registry() {
  static std::vector<std::pair<std::string, Binder>> registry;
  return registry;
}

struct OpRegistrar {
  OpRegistrar(const char* name, Binder binder) { op_registry().emplace_back(name, std::move(binder)); }
};

#define VQIM_CONCAT_INNER(a, b) a##b
#define VQIM_CONCAT(a, b) VQIM_CONCAT_INNER(a, b)
// Usage at file scope: VQIM_REGISTER_OP(codebook_lookup, [](py::module_& m) { m.def(...); });
#define VQIM_REGISTER_OP(name, ...) \
  static ::vqim::OpRegistrar VQIM_CONCAT(vqim_registrar_, name)(#name, __VA_ARGS__)

template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// Errors surface in Python as ValueError (pybind11 maps std::invalid_argument) with the message.
#define VQIM_CHECK(cond, ...)                                                        \
  do {                                                                               \
    if (!(cond)) throw std::invalid_argument(::vqim::str_cat("vqim._C: ", __VA_ARGS__)); \
  } while (0)

#define VQIM_CUDA_CHECK(expr)                                                                   \
  do {                                                                                          \
    cudaError_t _err = (expr);                                                                  \
    if (_err != cudaSuccess)                                                                    \
      throw std::runtime_error(::vqim::str_cat("vqim._C: CUDA error ", cudaGetErrorString(_err), \
                                               " at ", __FILE__, ":", __LINE__));               \
  } while (0)

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Loads any supported storage type as float.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

#if defined(__CUDACC__)  // module.cpp includes this header through the host compiler
// Butterfly reductions over a full warp: every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
#endif

// Runtime dtype code -> template parameter (flash-attention's BOOL_SWITCH idea for dtypes).
#define VQIM_DISPATCH_FLOAT(dtype_code, scalar_t, ...)                                  \
  [&] {                                                                                 \
    switch (static_cast<::vqim::DType>(dtype_code)) {                                   \
      case ::vqim::DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }   \
      case ::vqim::DType::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); }  \
      case ::vqim::DType::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: throw std::invalid_argument(::vqim::str_cat("vqim._C: unsupported dtype code ", dtype_code, \
                                                           " (0 float32, 1 float16, 2 bfloat16)")); \
    }                                                                                   \
  }()

}  // namespace vqim
