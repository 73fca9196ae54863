// Adafactor with int8 first moments: the CUDA twin of kernels/adafactor8.py.
//
// A parameter is viewed as (L, R, C) with element strides (rank >= 2: leading dims merged, the
// last two factored; rank < 2: (1, 1, N)). The launches per parameter, as in the Triton path:
//   adafactor8_row_col_sums: one pass over g -> partial row and column sums of g^2;
//   adafactor8_factors:      r, c statistics and the factors a = rsqrt(r / mean r), b = rsqrt(c)
//                            (adafactor8_full_factors: v and b = rsqrt(v) for rank < 2);
//   adafactor8_sumsq:        one pass over g -> sum of u^2, u = g * a[l, r] * b[l, c]
//                            (update clipping needs the RMS of the whole update first);
//   adafactor8_step:         turns that sum into the clipping factor, then one pass reading g, p,
//                            the int8 moment and its scales, writing p and the re-quantized moment
//                            (one warp per block of 256 values).
// Every reduction has a fixed order (per-tile partials summed in index order), so results do not
// depend on scheduling. The step uses explicitly rounded multiplies/adds (no FMA contraction)
// so it computes the same fp32 numbers as the torch path.
#include <algorithm>

#include "common.h"

namespace vqim {
namespace {

constexpr int kQBlock = 256;          // values per int8 block
constexpr int kRowsPerBlock = 32;     // rows of one row_col_sums CTA
constexpr int kColsPerBlock = 256;    // columns of one row_col_sums CTA
constexpr int kSumsqThreads = 256;
constexpr int kSumsqMaxBlocks = 1024;  // also the workspace size the Python launcher allocates
constexpr int kFactorsThreads = 256;

// CTA (32 x 8 threads) = row_tiles tiles of 32 rows x kColsPerBlock columns of one slice;
// threadIdx.x walks the columns (coalesced for a contiguous grad), threadIdx.y the rows ty,
// ty + 8, ty + 16, ty + 24 of a tile. Each CTA writes its own partial row sums (one per column
// tile) and column sums (one per row group), so the sums have a fixed order; factors_kernel adds
// the partials. Row groups keep the column partials few (<= 64) for tall matrices.
template <typename T>
__global__ void row_col_sums_kernel(const T* __restrict__ g, int64_t sgl, int64_t sgr, int64_t sgc,
                                    float* __restrict__ row_part, float* __restrict__ col_part, int64_t L,
                                    int64_t R, int64_t C, int64_t row_tiles, int64_t n_row_groups) {
  const int64_t l = blockIdx.x / n_row_groups;
  const int64_t rg = blockIdx.x % n_row_groups;
  const int64_t cb = blockIdx.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  __shared__ float col_sh[8][33];
  __shared__ float col_total[kColsPerBlock];
  if (ty == 0) {
    for (int j = tx; j < kColsPerBlock; j += 32) col_total[j] = 0.f;
  }
  const T* base = g + l * sgl;
  const int64_t c_begin = cb * kColsPerBlock;
  const int64_t c_end = std::min<int64_t>(C, c_begin + kColsPerBlock);
  for (int64_t t = 0; t < row_tiles; ++t) {
    const int64_t r0 = (rg * row_tiles + t) * kRowsPerBlock;
    if (r0 >= R) break;  // uniform across the CTA
    float row_acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t c0 = c_begin; c0 < c_end; c0 += 32) {
      const int64_t c = c0 + tx;
      float col_acc = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t r = r0 + ty + 8 * k;
        if (r < R && c < c_end) {
          const float v = to_float(base[r * sgr + c * sgc]);
          row_acc[k] += v * v;
          col_acc += v * v;
        }
      }
      col_sh[ty][tx] = col_acc;
      __syncthreads();
      if (ty == 0 && c < c_end) {
        float s = 0.f;
#pragma unroll
        for (int y = 0; y < 8; ++y) s += col_sh[y][tx];
        col_total[c - c_begin] += s;
      }
      __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float s = warp_sum(row_acc[k]);
      const int64_t r = r0 + ty + 8 * k;
      if (tx == 0 && r < R) row_part[(cb * L + l) * R + r] = s;
    }
  }
  if (ty == 0) {
    for (int64_t c = c_begin + tx; c < c_end; c += 32) col_part[(rg * L + l) * C + c] = col_total[c - c_begin];
  }
}

// One block per (slice, side): side 0 sums the row partials, updates r and writes
// a = 1 / sqrt(r / mean r); side 1 does the same for the columns (c, b = 1 / sqrt(c)).
// Each thread re-reads only the r values it wrote itself, so one barrier (for the mean) suffices.
__global__ void factors_kernel(const float* __restrict__ rowpart, const float* __restrict__ colpart,
                               float* __restrict__ r, float* __restrict__ c, float* __restrict__ a,
                               float* __restrict__ b, int64_t L, int64_t R, int64_t C, int64_t n_rowparts,
                               int64_t n_colparts, float beta2_t, float one_minus_beta2_t, float eps1) {
  const int64_t l = blockIdx.x;
  if (blockIdx.y == 0) {
    float local = 0.f;
    for (int64_t i = threadIdx.x; i < R; i += blockDim.x) {
      float s = 0.f;
      for (int64_t k = 0; k < n_rowparts; ++k) s += rowpart[(k * L + l) * R + i];
      const float rn = beta2_t * r[l * R + i] + one_minus_beta2_t * (s / static_cast<float>(C) + eps1);
      r[l * R + i] = rn;
      local += rn;
    }
    __shared__ float warp_part[kFactorsThreads / 32];
    __shared__ float mean_sh;
    local = warp_sum(local);
    if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = local;
    __syncthreads();
    if (threadIdx.x < 32) {
      float v = threadIdx.x < kFactorsThreads / 32 ? warp_part[threadIdx.x] : 0.f;
      v = warp_sum(v);
      if (threadIdx.x == 0) mean_sh = v / static_cast<float>(R);
    }
    __syncthreads();
    const float mean = mean_sh;
    for (int64_t i = threadIdx.x; i < R; i += blockDim.x) a[l * R + i] = 1.f / sqrtf(r[l * R + i] / mean);
  } else {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      float s = 0.f;
      for (int64_t k = 0; k < n_colparts; ++k) s += colpart[(k * L + l) * C + j];
      const float cn = beta2_t * c[l * C + j] + one_minus_beta2_t * (s / static_cast<float>(R) + eps1);
      c[l * C + j] = cn;
      b[l * C + j] = 1.f / sqrtf(cn);
    }
  }
}

// Unfactored (rank < 2) tensors: v <- beta2_t * v + (1 - beta2_t) * (g^2 + eps1), b = 1 / sqrt(v).
template <typename T>
__global__ void full_factors_kernel(const T* __restrict__ g, int64_t stride_g, float* __restrict__ v,
                                    float* __restrict__ b, int64_t N, float beta2_t, float one_minus_beta2_t,
                                    float eps1) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const float gv = to_float(g[i * stride_g]);
  const float vn = beta2_t * v[i] + one_minus_beta2_t * (gv * gv + eps1);
  v[i] = vn;
  b[i] = 1.f / sqrtf(vn);
}

struct View3 {
  int64_t R, C, s0, s1, s2;
};

// How the flat logical index of a value maps to (slice l, row, col): a template parameter so the
// integer divisions (slow on GPUs) run per element only where they must (kernels/adafactor8.py).
enum Layout : int { kGeneral = 0, kRows = 1 /* C % 256 == 0: a block lies in one row */, kFlat = 2 /* L = R = 1 */ };

struct Pos {
  int64_t lr, l, row, col;  // lr = l * R + row, the index into a
};

template <int kLayout>
struct BlockLocator {
  int64_t lr_b = 0, l_b = 0, row_b = 0, col0 = 0;
  __device__ __forceinline__ BlockLocator(int64_t R, int64_t C, int64_t blk) {
    if constexpr (kLayout == kRows) {
      const int64_t start = blk * kQBlock;
      lr_b = start / C;
      col0 = start % C;
      l_b = lr_b / R;
      row_b = lr_b % R;
    }
  }
  // idx = blk * 256 + within.
  __device__ __forceinline__ Pos at(int64_t R, int64_t C, int64_t idx, int within) const {
    if constexpr (kLayout == kFlat) {
      return {0, 0, 0, idx};
    } else if constexpr (kLayout == kRows) {
      return {lr_b, l_b, row_b, col0 + within};
    } else {
      const int64_t lr = idx / C;
      return {lr, lr / R, lr % R, idx % C};
    }
  }
};

// u = g * a[l * R + row] * b[l * C + col] (= g / sqrt(V)).
template <typename T>
__device__ __forceinline__ float update_direction(const T* g, const View3& gv, const float* a, const float* b,
                                                  const Pos& ps) {
  const float gval = to_float(g[ps.l * gv.s0 + ps.row * gv.s1 + ps.col * gv.s2]);
  return __fmul_rn(__fmul_rn(gval, a[ps.lr]), b[ps.l * gv.C + ps.col]);
}

// Warps stride over the quantization blocks (lane k: values k, k + 32, ...); one partial per CTA.
template <typename T, int kLayout>
__global__ void sumsq_partial_kernel(const T* __restrict__ g, View3 gv, const float* __restrict__ a,
                                     const float* __restrict__ b, float* __restrict__ part, int64_t N,
                                     int64_t n_blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  float acc = 0.f;
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); blk < n_blocks;
       blk += warps) {
    const BlockLocator<kLayout> loc(gv.R, gv.C, blk);
#pragma unroll
    for (int k = 0; k < kQBlock / 32; ++k) {
      const int within = lane + 32 * k;
      const int64_t idx = blk * kQBlock + within;
      if (idx < N) {
        const float u = update_direction(g, gv, a, b, loc.at(gv.R, gv.C, idx, within));
        acc += u * u;
      }
    }
  }
  __shared__ float warp_part[kSumsqThreads / 32];
  acc = warp_sum(acc);
  if (lane == 0) warp_part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kSumsqThreads / 32 ? warp_part[threadIdx.x] : 0.f;
    v = warp_sum(v);
    if (threadIdx.x == 0) part[blockIdx.x] = v;
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int n) {
  float acc = 0.f;
  for (int i = threadIdx.x; i < n; i += 32) acc += part[i];
  acc = warp_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

// One warp per quantization block; lane k handles values k, k + 32, ..., k + 224 (coalesced).
// p shares the (L, R, C) view of g (its own strides).
template <typename T, int kLayout>
__global__ void step_kernel(const T* __restrict__ g, View3 gv, T* __restrict__ p, View3 pv,
                            int8_t* __restrict__ q, float* __restrict__ scale, const float* __restrict__ a,
                            const float* __restrict__ b, const float* __restrict__ sumsq_parts, int n_parts,
                            int64_t N, int64_t n_blocks, float lr, float decay, float beta1,
                            float one_minus_beta1, float clip_threshold) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (blk >= n_blocks) return;  // whole warps exit together
  const int lane = threadIdx.x & 31;
  // Update clipping from the partial sums of u^2 (few, in L2): clip = 1 / max(1, RMS(u) / d).
  float sumsq = 0.f;
  for (int i = lane; i < n_parts; i += 32) sumsq += sumsq_parts[i];
  sumsq = warp_sum(sumsq);
  const float rms = sqrtf(__fdiv_rn(sumsq, static_cast<float>(N)));
  const float clip = __fdiv_rn(1.f, fmaxf(__fdiv_rn(rms, clip_threshold), 1.f));
  const float s_old = scale[blk];
  const BlockLocator<kLayout> loc(gv.R, gv.C, blk);
  float m[kQBlock / 32];
  float absmax = 0.f;
#pragma unroll
  for (int k = 0; k < kQBlock / 32; ++k) {
    const int within = lane + 32 * k;
    const int64_t idx = blk * kQBlock + within;
    m[k] = 0.f;
    if (idx < N) {
      const Pos ps = loc.at(gv.R, gv.C, idx, within);
      const float u = update_direction(g, gv, a, b, ps);
      const float m_old = __fmul_rn(static_cast<float>(q[idx]), s_old);
      m[k] = __fadd_rn(__fmul_rn(beta1, m_old), __fmul_rn(one_minus_beta1, __fmul_rn(u, clip)));
      const int64_t po = ps.l * pv.s0 + ps.row * pv.s1 + ps.col * pv.s2;
      const float pval = to_float(p[po]);
      p[po] = from_float<T>(__fsub_rn(__fmul_rn(pval, decay), __fmul_rn(lr, m[k])));
      absmax = fmaxf(absmax, fabsf(m[k]));
    }
  }
  absmax = warp_max(absmax);
  const float inv = absmax > 0.f ? __fdiv_rn(127.f, absmax) : 0.f;
#pragma unroll
  for (int k = 0; k < kQBlock / 32; ++k) {
    const int64_t idx = blk * kQBlock + lane + 32 * k;
    if (idx < N) {
      const float x = roundf(__fmul_rn(m[k], inv));  // half away from zero, as the Triton kernel
      q[idx] = static_cast<int8_t>(fminf(fmaxf(x, -127.f), 127.f));
    }
  }
  if (lane == 0) scale[blk] = __fdiv_rn(absmax, 127.f);
}

int layout_of(int64_t L, int64_t R, int64_t C) {
  if (L == 1 && R == 1) return kFlat;
  return C % kQBlock == 0 ? kRows : kGeneral;
}

// Runtime layout -> template parameter.
#define VQIM_LAYOUT_SWITCH(layout, LAYOUT, ...)                         \
  [&] {                                                                 \
    switch (layout) {                                                   \
      case kFlat: { constexpr int LAYOUT = kFlat; return __VA_ARGS__(); } \
      case kRows: { constexpr int LAYOUT = kRows; return __VA_ARGS__(); } \
      default: { constexpr int LAYOUT = kGeneral; return __VA_ARGS__(); } \
    }                                                                   \
  }()

void check_view(int64_t L, int64_t R, int64_t C) {
  VQIM_CHECK(L >= 1 && R >= 1 && C >= 1, "adafactor8: the (L, R, C) view must have positive sizes, got (", L,
             ", ", R, ", ", C, ")");
}

void row_col_sums(std::uintptr_t g, int64_t sgl, int64_t sgr, int64_t sgc, std::uintptr_t row_part,
                  std::uintptr_t col_part, int64_t L, int64_t R, int64_t C, int64_t row_tiles, int dtype,
                  std::uintptr_t stream) {
  check_view(L, R, C);
  VQIM_CHECK(row_tiles >= 1, "adafactor8_row_col_sums: row_tiles must be >= 1, got ", row_tiles);
  const int64_t n_row_blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t n_row_groups = (n_row_blocks + row_tiles - 1) / row_tiles;
  const int64_t n_col_blocks = (C + kColsPerBlock - 1) / kColsPerBlock;
  VQIM_CHECK(L * n_row_groups < (int64_t{1} << 31), "adafactor8_row_col_sums: too many rows (L * R = ", L * R, ")");
  VQIM_CHECK(n_col_blocks < 65536, "adafactor8_row_col_sums: too many columns (C = ", C, ")");
  const dim3 grid(static_cast<unsigned>(L * n_row_groups), static_cast<unsigned>(n_col_blocks));
  VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] {
    row_col_sums_kernel<scalar_t><<<grid, dim3(32, 8), 0, as_stream(stream)>>>(
        as_ptr<const scalar_t>(g), sgl, sgr, sgc, as_ptr<float>(row_part), as_ptr<float>(col_part), L, R, C,
        row_tiles, n_row_groups);
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void factors(std::uintptr_t rowpart, std::uintptr_t colpart, std::uintptr_t r, std::uintptr_t c, std::uintptr_t a,
             std::uintptr_t b, int64_t L, int64_t R, int64_t C, int64_t n_rowparts, int64_t n_colparts,
             double beta2_t, double one_minus_beta2_t, double eps1, std::uintptr_t stream) {
  check_view(L, R, C);
  VQIM_CHECK(n_rowparts >= 1 && n_colparts >= 1, "adafactor8_factors: need at least one partial sum per side, got ",
             n_rowparts, " and ", n_colparts);
  VQIM_CHECK(L < (int64_t{1} << 31), "adafactor8_factors: too many slices (L = ", L, ")");
  factors_kernel<<<dim3(static_cast<unsigned>(L), 2), kFactorsThreads, 0, as_stream(stream)>>>(
      as_ptr<const float>(rowpart), as_ptr<const float>(colpart), as_ptr<float>(r), as_ptr<float>(c),
      as_ptr<float>(a), as_ptr<float>(b), L, R, C, n_rowparts, n_colparts, static_cast<float>(beta2_t),
      static_cast<float>(one_minus_beta2_t), static_cast<float>(eps1));
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void full_factors(std::uintptr_t g, int64_t stride_g, std::uintptr_t v, std::uintptr_t b, int64_t N, double beta2_t,
                  double one_minus_beta2_t, double eps1, int dtype, std::uintptr_t stream) {
  VQIM_CHECK(N >= 1, "adafactor8_full_factors: N must be >= 1, got ", N);
  VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] {
    full_factors_kernel<scalar_t><<<static_cast<unsigned>((N + 255) / 256), 256, 0, as_stream(stream)>>>(
        as_ptr<const scalar_t>(g), stride_g, as_ptr<float>(v), as_ptr<float>(b), N, static_cast<float>(beta2_t),
        static_cast<float>(one_minus_beta2_t), static_cast<float>(eps1));
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void sumsq(std::uintptr_t g, int64_t sgl, int64_t sgr, int64_t sgc, std::uintptr_t a, std::uintptr_t b,
           std::uintptr_t out, std::uintptr_t workspace, int64_t L, int64_t R, int64_t C, int dtype,
           std::uintptr_t stream) {
  check_view(L, R, C);
  const int64_t N = L * R * C;
  const int64_t n_blocks = (N + kQBlock - 1) / kQBlock;
  constexpr int kWarps = kSumsqThreads / 32;
  // At least 4 quantization blocks per warp; at most kSumsqMaxBlocks partials.
  const int blocks = static_cast<int>(std::min<int64_t>((n_blocks + 4 * kWarps - 1) / (4 * kWarps), kSumsqMaxBlocks));
  cudaStream_t s = as_stream(stream);
  const View3 gv{R, C, sgl, sgr, sgc};
  VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] {
    VQIM_LAYOUT_SWITCH(layout_of(L, R, C), kLayout, [&] {
      sumsq_partial_kernel<scalar_t, kLayout><<<blocks, kSumsqThreads, 0, s>>>(
          as_ptr<const scalar_t>(g), gv, as_ptr<const float>(a), as_ptr<const float>(b), as_ptr<float>(workspace), N,
          n_blocks);
    });
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
  sum_partials_kernel<<<1, 32, 0, s>>>(as_ptr<const float>(workspace), as_ptr<float>(out), blocks);
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void step(std::uintptr_t g, int64_t sgl, int64_t sgr, int64_t sgc, std::uintptr_t p, int64_t spl, int64_t spr,
          int64_t spc, std::uintptr_t q, std::uintptr_t scale, std::uintptr_t a, std::uintptr_t b,
          std::uintptr_t sumsq_parts, int64_t n_parts, int64_t L, int64_t R, int64_t C, double lr, double decay,
          double beta1, double one_minus_beta1, double clip_threshold, int dtype, std::uintptr_t stream) {
  check_view(L, R, C);
  VQIM_CHECK(n_parts >= 1 && n_parts <= 4096, "adafactor8_step: n_parts must be in [1, 4096], got ", n_parts);
  VQIM_CHECK(clip_threshold > 0, "adafactor8_step: clip_threshold must be > 0, got ", clip_threshold);
  const int64_t N = L * R * C;
  const int64_t n_blocks = (N + kQBlock - 1) / kQBlock;
  constexpr int kWarps = 8;
  const int64_t grid = (n_blocks + kWarps - 1) / kWarps;
  VQIM_CHECK(grid < (int64_t{1} << 31), "adafactor8_step: tensor too large (N = ", N, ")");
  cudaStream_t s = as_stream(stream);
  const View3 gv{R, C, sgl, sgr, sgc};
  const View3 pv{R, C, spl, spr, spc};
  VQIM_DISPATCH_FLOAT(dtype, scalar_t, [&] {
    VQIM_LAYOUT_SWITCH(layout_of(L, R, C), kLayout, [&] {
      step_kernel<scalar_t, kLayout><<<static_cast<unsigned>(grid), kWarps * 32, 0, s>>>(
          as_ptr<const scalar_t>(g), gv, as_ptr<scalar_t>(p), pv, as_ptr<int8_t>(q), as_ptr<float>(scale),
          as_ptr<const float>(a), as_ptr<const float>(b), as_ptr<const float>(sumsq_parts),
          static_cast<int>(n_parts), N, n_blocks, static_cast<float>(lr), static_cast<float>(decay),
          static_cast<float>(beta1), static_cast<float>(one_minus_beta1), static_cast<float>(clip_threshold));
    });
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace vqim

VQIM_REGISTER_OP(adafactor8, [](vqim::py::module_& m) {
  namespace py = vqim::py;
  m.def("adafactor8_row_col_sums", &vqim::row_col_sums,
        "partial sums of g^2 over an (L, R, C) strided view: row_part [ceil(C / 256), L, R] (one per column "
        "tile) and col_part [ceil(ceil(R / 32) / row_tiles), L, C] (one per group of row_tiles 32-row tiles)",
        py::arg("g"), py::arg("sgl"), py::arg("sgr"), py::arg("sgc"), py::arg("row_part"), py::arg("col_part"),
        py::arg("L"), py::arg("R"), py::arg("C"), py::arg("row_tiles"), py::arg("dtype"), py::arg("stream"));
  m.def("adafactor8_factors", &vqim::factors,
        "sum the (P, L, R) / (P, L, C) partials, update r [L, R] and c [L, C] in place, write "
        "a = 1 / sqrt(r / mean r) and b = 1 / sqrt(c)",
        py::arg("rowpart"), py::arg("colpart"), py::arg("r"), py::arg("c"), py::arg("a"), py::arg("b"), py::arg("L"),
        py::arg("R"), py::arg("C"), py::arg("n_rowparts"), py::arg("n_colparts"), py::arg("beta2_t"),
        py::arg("one_minus_beta2_t"), py::arg("eps1"), py::arg("stream"));
  m.def("adafactor8_full_factors", &vqim::full_factors,
        "unfactored second moment: v <- beta2_t v + (1 - beta2_t)(g^2 + eps1) in place, b = 1 / sqrt(v)",
        py::arg("g"), py::arg("stride_g"), py::arg("v"), py::arg("b"), py::arg("N"), py::arg("beta2_t"),
        py::arg("one_minus_beta2_t"), py::arg("eps1"), py::arg("dtype"), py::arg("stream"));
  m.def("adafactor8_sumsq", &vqim::sumsq,
        "sum of (g * a[l, r] * b[l, c])^2 into out (fp32 scalar); workspace holds 1024 floats", py::arg("g"),
        py::arg("sgl"), py::arg("sgr"), py::arg("sgc"), py::arg("a"), py::arg("b"), py::arg("out"),
        py::arg("workspace"), py::arg("L"), py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("stream"));
  m.def("adafactor8_step", &vqim::step,
        "fused step: clip from the partial sums of u^2; m = beta1 * q * scale + (1 - beta1) * u * clip; "
        "p = p * decay - lr * m; re-quantize m",
        py::arg("g"), py::arg("sgl"), py::arg("sgr"), py::arg("sgc"), py::arg("p"), py::arg("spl"), py::arg("spr"),
        py::arg("spc"), py::arg("q"), py::arg("scale"), py::arg("a"), py::arg("b"), py::arg("sumsq_parts"),
        py::arg("n_parts"), py::arg("L"), py::arg("R"), py::arg("C"), py::arg("lr"), py::arg("decay"),
        py::arg("beta1"), py::arg("one_minus_beta1"), py::arg("clip_threshold"), py::arg("dtype"),
        py::arg("stream"));
});
