// The pybind11 module vqim.kernels._C: binds every op that registered itself (csrc/common.h).
#include <pybind11/stl.h>

#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqim CUDA kernels: one params struct per op (pointers, extents, sizes, strides, stream); no libtorch";
  std::vector<std::string> names;
  for (auto& [name, binder] : vqim::op_registry()) {
    binder(m);
    names.push_back(name);
  }
  m.attr("ops") = names;
  m.def("cuda_runtime_version", [] {
    int v = 0;
    VQIM_CUDA_CHECK(cudaRuntimeGetVersion(&v));
    return v;
  });
}
