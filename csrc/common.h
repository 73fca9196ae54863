// Shared helpers for the vqim CUDA kernels.
//
// The extension links no libtorch: each op takes a params struct that Python fills by field name
// with raw data pointers (as integers), their extents, shapes, strides, a dtype code and the
// current CUDA stream, checked here before any CUDA call. Each op file registers its own pybind11
// bindings through VQIM_REGISTER_OP, so adding an op touches no shared file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <type_traits>
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

// ---- Params structs -----------------------------------------------------------------------
// Each op's binding takes one struct, filled by field name from Python (p = C.XParams(); p.z = ...)
// instead of a long positional list where a swapped pair goes unnoticed. A field list
// X(type, name) declares the struct and binds every field. Pointers default to null and integers
// to -1, so a field the launcher forgets fails a check instead of passing as a plausible 0.
template <typename T>
constexpr T unset_value() {
  if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) return T(-1);
  else return T{};
}

#define VQIM_DECLARE_FIELD(type, name) type name = ::vqim::unset_value<type>();
#define VQIM_BIND_FIELD(type, name) cls.def_readwrite(#name, &Params::name);

// Binds a params struct as a Python class with one attribute per field (an unknown name raises
// AttributeError, so a misspelt field cannot pass unnoticed). Module-local: the test suite loads
// the CPU harness's build of these files (tests/cuda_harness.py) beside the real _C, and two
// modules registering one C++ type globally is an ImportError in pybind11.
#define VQIM_BIND_PARAMS(m, Struct, name, FIELDS)                       \
  do {                                                                  \
    using Params = Struct;                                              \
    vqim::py::class_<Params> cls(m, name, vqim::py::module_local());    \
    cls.def(vqim::py::init<>());                                        \
    FIELDS(VQIM_BIND_FIELD)                                             \
  } while (0)

// One axis of an operand: its size and its stride in elements, each with the field name to report.
struct Axis {
  const char* size_name;
  int64_t size;
  const char* stride_name;  // nullptr: a unit stride the kernel assumes (contiguous operand)
  int64_t stride;
};

// Host-side checks of one operand: a non-null pointer, non-negative strides, and every element the
// kernel addresses (the sum of (size - 1) * stride) inside `extent`, the elements addressable from
// the pointer (the storage past the tensor's offset). Any strides that would reach outside the
// allocation, swapped or not, fail the extent check, so none becomes an out-of-bounds access; a
// written operand must also not alias itself (sorted by stride, each stride covers the axes
// below it), which catches a swapped pair on an output that still fits its extent.
// Sizes are checked >= 1 by the caller before this runs.
inline void check_operand(const char* op, const char* name, std::uintptr_t ptr, int64_t extent,
                          std::initializer_list<Axis> axes, bool written) {
  VQIM_CHECK(ptr != 0, op, ": ", name, " is a null pointer; pass the tensor's data_ptr()");
  VQIM_CHECK(extent >= 1, op, ": ", name, "_extent must be >= 1 (the elements addressable from ", name,
             "), got ", extent);
  std::ostringstream shape;
  int64_t last = 0;
  std::vector<Axis> sorted;
  for (const Axis& a : axes) {
    const char* sname = a.stride_name ? a.stride_name : "(unit stride)";
    VQIM_CHECK(a.stride >= 0, op, ": ", sname, " must be >= 0 (negative strides are not supported), got ",
               a.stride);
    shape << (sorted.empty() ? "" : ", ") << a.size_name << "=" << a.size << " at " << sname << "=" << a.stride;
    last += (a.size - 1) * a.stride;
    sorted.push_back(a);
  }
  VQIM_CHECK(last < extent, op, ": ", name, " with sizes and strides (", shape.str(), ") reaches element ", last,
             " but ", name, "_extent is ", extent, ": strides swapped, or the wrong size or tensor");
  if (!written) return;
  std::sort(sorted.begin(), sorted.end(), [](const Axis& x, const Axis& y) { return x.stride < y.stride; });
  int64_t span = 1;  // elements covered by the axes of smaller stride
  for (const Axis& a : sorted) {
    if (a.size == 1) continue;
    VQIM_CHECK(a.stride >= span, op, ": ", name, " is written, so its axes must not overlap, but (", shape.str(),
               ") does: strides swapped or wrong");
    span = a.stride * a.size;
  }
}

inline void check_dtype(const char* op, const char* field, int code) {
  VQIM_CHECK(code >= 0 && code <= 2, op, ": ", field,
             " must be a known dtype code (0 float32, 1 float16, 2 bfloat16), got ", code);
}

// Runs after the host-side checks (so those work without a GPU): every pointer must be device (or
// managed) memory on the current device; a host or another device's pointer would fault or be read
// across the bus.
inline void check_device_pointers(const char* op, std::initializer_list<std::pair<const char*, std::uintptr_t>> ptrs) {
  int device = -1;
  VQIM_CUDA_CHECK(cudaGetDevice(&device));
  for (const auto& [name, ptr] : ptrs) {
    cudaPointerAttributes attr{};
    VQIM_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)));
    VQIM_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, op, ": ", name,
               " is not device memory (CUDA memory type ", static_cast<int>(attr.type),
               "); only CUDA tensors are supported");
    VQIM_CHECK(attr.device == device, op, ": ", name, " is on cuda:", attr.device, " but the current device is cuda:",
               device, "; launch under the tensors' device");
  }
}

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

// module.cpp includes this header through the host compiler; tests/cuda_host compiles the
// device code for the CPU (VQIM_HOST_HARNESS), where the shuffles are the harness's.
#if defined(__CUDACC__) || defined(VQIM_HOST_HARNESS)
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
