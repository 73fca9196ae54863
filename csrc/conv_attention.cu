// conv_decode_attention: one decode step of conv-shaped masked attention (DESIGN §4), the CUDA
// twin of kernels/conv_attention.py::_conv_decode_kernel.
//
// One block per (batch row, head). The candidate keys are the prefix (causal) and the window
// around the row's position: NROWS grid rows ending at the query's row, NCOLS columns from
// max(0, c - HW). Only those keys are read, from the plain cache (slot = position) or the ring
// layout (slot = P + t % SPAN, see conv_cache_slot). Phase 1: one warp per key computes the
// score (lanes split Dh, shuffle reduction) into shared memory. Phase 2: block max and sum.
// Phase 3: threads split Dh (and keys, in groups when Dh < blockDim) to accumulate P @ V.
#include "common.h"

namespace vqim {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 256;
constexpr int kMaxDPerLane = kMaxD / 32;

// Block-wide reduction through shared scratch of kWarps floats; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

struct DecodeGeometry {
  int64_t P, GW, HH, HW, SPAN, NROWS, NCOLS;
  bool ring;
};

// Slot of candidate i for a query at sequence position p, or -1 where it is not visible.
__device__ __forceinline__ int64_t candidate_slot(int64_t i, int64_t p, const DecodeGeometry& g) {
  if (i < g.P) return i <= p ? i : -1;
  if (p < g.P) return -1;
  const int64_t j = i - g.P;
  const int64_t t = p - g.P, r = t / g.GW, c = t % g.GW;
  const int64_t kr = r - g.NROWS + 1 + j / g.NCOLS;
  const int64_t kc = (c - g.HW > 0 ? c - g.HW : 0) + j % g.NCOLS;
  const int64_t kt = kr * g.GW + kc;
  if (kr < 0 || kc >= g.GW || kc > c + g.HW || kt > t) return -1;
  return g.ring ? g.P + kt % g.SPAN : g.P + kt;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
conv_decode_attention_kernel(const scalar_t* __restrict__ q, int64_t sqb, int64_t sqh, int64_t sqd,
                             const scalar_t* __restrict__ k, int64_t skb, int64_t skh, int64_t sks, int64_t skd,
                             const scalar_t* __restrict__ v, int64_t svb, int64_t svh, int64_t svs, int64_t svd,
                             scalar_t* __restrict__ o, int64_t sob, int64_t soh, int64_t sod,
                             const int64_t* __restrict__ pos, int H, int D, DecodeGeometry g, int n_cand,
                             float scale) {
  extern __shared__ float smem[];
  float* scores = smem;                                          // [n_cand]
  int64_t* slots = reinterpret_cast<int64_t*>(scores + ((n_cand + 1) / 2) * 2);  // [n_cand], 8-byte aligned
  float* partial = reinterpret_cast<float*>(slots + n_cand);     // [kThreads]
  __shared__ float scratch[kWarps];

  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t p = pos[b];
  const scalar_t* qb = q + b * sqb + h * sqh;
  const scalar_t* kb = k + b * skb + h * skh;
  const scalar_t* vb = v + b * svb + h * svh;

  float qreg[kMaxDPerLane];
#pragma unroll
  for (int u = 0; u < kMaxDPerLane; ++u) {
    const int d = lane + 32 * u;
    qreg[u] = d < D ? to_float(qb[d * sqd]) * scale : 0.f;
  }

  // Phase 1: scores of the visible candidates; -inf elsewhere.
  for (int i = warp; i < n_cand; i += kWarps) {
    const int64_t slot = candidate_slot(i, p, g);
    float s = -INFINITY;
    if (slot >= 0) {
      const scalar_t* kr = kb + slot * sks;
      float acc = 0.f;
#pragma unroll
      for (int u = 0; u < kMaxDPerLane; ++u) {
        const int d = lane + 32 * u;
        if (d < D) acc += qreg[u] * to_float(kr[d * skd]);
      }
      s = warp_sum(acc);
    }
    if (lane == 0) {
      scores[i] = s;
      slots[i] = slot;
    }
  }
  __syncthreads();

  // Phase 2: softmax weights. The query sees itself, so the max is finite.
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n_cand; i += kThreads) m = fmaxf(m, scores[i]);
  m = block_reduce<true>(m, scratch);
  float l = 0.f;
  for (int i = threadIdx.x; i < n_cand; i += kThreads) {
    const float e = slots[i] >= 0 ? __expf(scores[i] - m) : 0.f;
    scores[i] = e;
    l += e;
  }
  l = block_reduce<false>(l, scratch);  // its __syncthreads also publishes the weights

  // Phase 3: out[d] = sum_i w_i v[slot_i, d] / l; threads in `groups` split the keys.
  const int groups = D < kThreads ? kThreads / D : 1;
  const int g_id = threadIdx.x / (D < kThreads ? D : kThreads);
  const int d0 = threadIdx.x % (D < kThreads ? D : kThreads);
  const int d_step = D < kThreads ? D : kThreads;
  for (int d = d0; d < D; d += d_step) {
    float acc = 0.f;
    if (g_id < groups) {
      for (int i = g_id; i < n_cand; i += groups) {
        const int64_t slot = slots[i];
        if (slot >= 0) acc += scores[i] * to_float(vb[slot * svs + d * svd]);
      }
    }
    if (groups > 1) {
      partial[threadIdx.x] = acc;
      __syncthreads();
      if (g_id == 0) {
        for (int gg = 1; gg < groups; ++gg) acc += partial[gg * D + d0];
        o[b * sob + h * soh + d * sod] = from_float<scalar_t>(acc / l);
      }
    } else {
      o[b * sob + h * soh + d * sod] = from_float<scalar_t>(acc / l);
    }
  }
}

void conv_decode_attention(std::uintptr_t q, int64_t sqb, int64_t sqh, int64_t sqd,
                           std::uintptr_t k, int64_t skb, int64_t skh, int64_t sks, int64_t skd,
                           std::uintptr_t v, int64_t svb, int64_t svh, int64_t svs, int64_t svd,
                           std::uintptr_t o, int64_t sob, int64_t soh, int64_t sod, std::uintptr_t pos,
                           int64_t B, int64_t H, int64_t D, int64_t P, int64_t GW, int64_t HH, int64_t HW,
                           int64_t SPAN, int64_t NROWS, int64_t NCOLS, bool ring, double scale, int dtype,
                           std::uintptr_t stream) {
  VQIM_CHECK(D >= 1 && D <= kMaxD, "conv_decode_attention: Dh must be in [1, ", kMaxD, "], got ", D);
  VQIM_CHECK(B >= 0 && H >= 1 && B * H < (int64_t{1} << 31), "conv_decode_attention: bad B, H: ", B, ", ", H);
  VQIM_CHECK(P >= 0 && GW >= 1 && HH >= 0 && HW >= 0 && NROWS >= 1 && NCOLS >= 1 && SPAN >= 1,
             "conv_decode_attention: bad geometry P=", P, " GW=", GW, " HH=", HH, " HW=", HW, " SPAN=", SPAN,
             " NROWS=", NROWS, " NCOLS=", NCOLS);
  if (B == 0) return;
  const int64_t n_cand = P + NROWS * NCOLS;
  const size_t shmem = sizeof(float) * ((n_cand + 1) / 2) * 2 + sizeof(int64_t) * n_cand + sizeof(float) * kThreads;
  VQIM_CHECK(shmem <= 48 * 1024, "conv_decode_attention: prefix + window keys (", n_cand,
             ") need more than 48 KiB of shared memory; at most ~4000 are supported");
  const DecodeGeometry g{P, GW, HH, HW, SPAN, NROWS, NCOLS, ring};
  VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] {
    conv_decode_attention_kernel<scalar_t><<<static_cast<unsigned>(B * H), kThreads, shmem, as_stream(stream)>>>(
        as_ptr<const scalar_t>(q), sqb, sqh, sqd, as_ptr<const scalar_t>(k), skb, skh, sks, skd,
        as_ptr<const scalar_t>(v), svb, svh, svs, svd, as_ptr<scalar_t>(o), sob, soh, sod,
        as_ptr<const int64_t>(pos), static_cast<int>(H), static_cast<int>(D), g, static_cast<int>(n_cand),
        static_cast<float>(scale));
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace vqim

VQIM_REGISTER_OP(conv_decode_attention, [](vqim::py::module_& m) {
  namespace py = vqim::py;
  m.def("conv_decode_attention", &vqim::conv_decode_attention,
        "one decode step of conv-shaped attention -> o[B, H, 1, Dh]; pointers, element strides, geometry, "
        "dtype code, stream",
        py::arg("q"), py::arg("sqb"), py::arg("sqh"), py::arg("sqd"), py::arg("k"), py::arg("skb"), py::arg("skh"),
        py::arg("sks"), py::arg("skd"), py::arg("v"), py::arg("svb"), py::arg("svh"), py::arg("svs"),
        py::arg("svd"), py::arg("o"), py::arg("sob"), py::arg("soh"), py::arg("sod"), py::arg("pos"), py::arg("B"),
        py::arg("H"), py::arg("D"), py::arg("P"), py::arg("GW"), py::arg("HH"), py::arg("HW"), py::arg("SPAN"),
        py::arg("NROWS"), py::arg("NCOLS"), py::arg("ring"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"));
});
