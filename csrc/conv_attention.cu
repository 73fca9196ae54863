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
// A block gets 48 KiB of shared memory without an opt-in, static and dynamic together: the
// launch's dynamic bytes get what the kernel's `scratch` leaves.
constexpr size_t kStaticShared = sizeof(float) * kWarps;
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
  static_assert(sizeof(scratch) == kStaticShared, "the launch's shared-memory check counts scratch");

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

#define VQIM_CONV_DECODE_ATTENTION_FIELDS(X)                                                              \
  X(std::uintptr_t, q) X(int64_t, q_extent) X(int64_t, q_stride_b) X(int64_t, q_stride_h) X(int64_t, q_stride_d) \
  X(std::uintptr_t, k) X(int64_t, k_extent) X(int64_t, k_stride_b) X(int64_t, k_stride_h) X(int64_t, k_stride_s) \
  X(int64_t, k_stride_d) X(std::uintptr_t, v) X(int64_t, v_extent) X(int64_t, v_stride_b) X(int64_t, v_stride_h) \
  X(int64_t, v_stride_s) X(int64_t, v_stride_d) X(std::uintptr_t, o) X(int64_t, o_extent) X(int64_t, o_stride_b)  \
  X(int64_t, o_stride_h) X(int64_t, o_stride_d) X(std::uintptr_t, pos) X(int64_t, pos_extent) X(int64_t, B)       \
  X(int64_t, H) X(int64_t, D) X(int64_t, S) X(int64_t, P) X(int64_t, GW) X(int64_t, HH) X(int64_t, HW)            \
  X(int64_t, SPAN) X(int64_t, NROWS) X(int64_t, NCOLS) X(bool, ring) X(double, scale) X(int, dtype)              \
  X(std::uintptr_t, stream)

// q [B, H, 1, D] and o [B, H, 1, D] (strides of the B, H, D axes), k/v caches [B, H, S, D], pos [B]
// int64 contiguous; one dtype for q, k, v, o. The geometry fields are kernels/conv_attention.py's
// _decode_geometry.
struct ConvDecodeAttentionParams {
  VQIM_CONV_DECODE_ATTENTION_FIELDS(VQIM_DECLARE_FIELD)
};

void conv_decode_attention(const ConvDecodeAttentionParams& p) {
  constexpr const char* op = "conv_decode_attention";
  const int64_t B = p.B, H = p.H, D = p.D, S = p.S, P = p.P, GW = p.GW, HH = p.HH, HW = p.HW, SPAN = p.SPAN,
                NROWS = p.NROWS, NCOLS = p.NCOLS;
  VQIM_CHECK(D >= 1 && D <= kMaxD, "conv_decode_attention: Dh must be in [1, ", kMaxD, "], got ", D);
  VQIM_CHECK(B >= 0 && H >= 1 && B * H < (int64_t{1} << 31), "conv_decode_attention: bad B, H: ", B, ", ", H);
  VQIM_CHECK(S >= 1, "conv_decode_attention: the caches need S >= 1 slots, got ", S);
  VQIM_CHECK(P >= 0 && GW >= 1 && HH >= 0 && HW >= 0 && NROWS >= 1 && NCOLS >= 1 && SPAN >= 1,
             "conv_decode_attention: bad geometry P=", P, " GW=", GW, " HH=", HH, " HW=", HW, " SPAN=", SPAN,
             " NROWS=", NROWS, " NCOLS=", NCOLS);
  check_dtype(op, "dtype", p.dtype);
  if (B == 0) return;
  const int64_t n_cand = P + NROWS * NCOLS;
  const size_t shmem = sizeof(float) * ((n_cand + 1) / 2) * 2 + sizeof(int64_t) * n_cand + sizeof(float) * kThreads;
  VQIM_CHECK(shmem + kStaticShared <= 48 * 1024, "conv_decode_attention: prefix + window keys (", n_cand,
             ") need more than 48 KiB of shared memory; at most 4052 are supported");
  check_operand(op, "q", p.q, p.q_extent,
                {{"B", B, "q_stride_b", p.q_stride_b}, {"H", H, "q_stride_h", p.q_stride_h},
                 {"D", D, "q_stride_d", p.q_stride_d}},
                false);
  check_operand(op, "k", p.k, p.k_extent,
                {{"B", B, "k_stride_b", p.k_stride_b}, {"H", H, "k_stride_h", p.k_stride_h},
                 {"S", S, "k_stride_s", p.k_stride_s}, {"D", D, "k_stride_d", p.k_stride_d}},
                false);
  check_operand(op, "v", p.v, p.v_extent,
                {{"B", B, "v_stride_b", p.v_stride_b}, {"H", H, "v_stride_h", p.v_stride_h},
                 {"S", S, "v_stride_s", p.v_stride_s}, {"D", D, "v_stride_d", p.v_stride_d}},
                false);
  check_operand(op, "o", p.o, p.o_extent,
                {{"B", B, "o_stride_b", p.o_stride_b}, {"H", H, "o_stride_h", p.o_stride_h},
                 {"D", D, "o_stride_d", p.o_stride_d}},
                true);
  check_operand(op, "pos", p.pos, p.pos_extent, {{"B", B, nullptr, 1}}, false);
  check_device_pointers(op, {{"q", p.q}, {"k", p.k}, {"v", p.v}, {"o", p.o}, {"pos", p.pos}});
  const DecodeGeometry g{P, GW, HH, HW, SPAN, NROWS, NCOLS, p.ring};
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    conv_decode_attention_kernel<scalar_t><<<static_cast<unsigned>(B * H), kThreads, shmem, as_stream(p.stream)>>>(
        as_ptr<const scalar_t>(p.q), p.q_stride_b, p.q_stride_h, p.q_stride_d, as_ptr<const scalar_t>(p.k),
        p.k_stride_b, p.k_stride_h, p.k_stride_s, p.k_stride_d, as_ptr<const scalar_t>(p.v), p.v_stride_b,
        p.v_stride_h, p.v_stride_s, p.v_stride_d, as_ptr<scalar_t>(p.o), p.o_stride_b, p.o_stride_h, p.o_stride_d,
        as_ptr<const int64_t>(p.pos), static_cast<int>(H), static_cast<int>(D), g, static_cast<int>(n_cand),
        static_cast<float>(p.scale));
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace vqim

VQIM_REGISTER_OP(conv_decode_attention, [](vqim::py::module_& m) {
  VQIM_BIND_PARAMS(m, vqim::ConvDecodeAttentionParams, "ConvDecodeAttentionParams", VQIM_CONV_DECODE_ATTENTION_FIELDS);
  m.def("conv_decode_attention", &vqim::conv_decode_attention,
        "one decode step of conv-shaped attention -> o[B, H, 1, Dh], from a ConvDecodeAttentionParams (pointers, "
        "element strides and extents, geometry, dtype code, stream)",
        vqim::py::arg("params"));
});
