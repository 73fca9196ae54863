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

#define VQIM_ADAFACTOR8_ROW_COL_SUMS_FIELDS(X)                                                          \
  X(std::uintptr_t, g) X(int64_t, g_extent) X(int64_t, g_stride_l) X(int64_t, g_stride_r)                 \
  X(int64_t, g_stride_c) X(std::uintptr_t, row_part) X(int64_t, row_part_extent) X(std::uintptr_t, col_part) \
  X(int64_t, col_part_extent) X(int64_t, L) X(int64_t, R) X(int64_t, C) X(int64_t, row_tiles) X(int, dtype) \
  X(std::uintptr_t, stream)
#define VQIM_ADAFACTOR8_FACTORS_FIELDS(X)                                                                  \
  X(std::uintptr_t, row_part) X(int64_t, row_part_extent) X(std::uintptr_t, col_part)                     \
  X(int64_t, col_part_extent) X(std::uintptr_t, r) X(int64_t, r_extent) X(std::uintptr_t, c)               \
  X(int64_t, c_extent) X(std::uintptr_t, a) X(int64_t, a_extent) X(std::uintptr_t, b) X(int64_t, b_extent)  \
  X(int64_t, L) X(int64_t, R) X(int64_t, C) X(int64_t, n_rowparts) X(int64_t, n_colparts)                  \
  X(double, beta2_t) X(double, one_minus_beta2_t) X(double, eps1) X(std::uintptr_t, stream)
#define VQIM_ADAFACTOR8_FULL_FACTORS_FIELDS(X)                                                             \
  X(std::uintptr_t, g) X(int64_t, g_extent) X(int64_t, g_stride) X(std::uintptr_t, v) X(int64_t, v_extent) \
  X(std::uintptr_t, b) X(int64_t, b_extent) X(int64_t, N) X(double, beta2_t) X(double, one_minus_beta2_t)   \
  X(double, eps1) X(int, dtype) X(std::uintptr_t, stream)
#define VQIM_ADAFACTOR8_SUMSQ_FIELDS(X)                                                                    \
  X(std::uintptr_t, g) X(int64_t, g_extent) X(int64_t, g_stride_l) X(int64_t, g_stride_r)                 \
  X(int64_t, g_stride_c) X(std::uintptr_t, a) X(int64_t, a_extent) X(std::uintptr_t, b) X(int64_t, b_extent) \
  X(std::uintptr_t, out) X(int64_t, out_extent) X(std::uintptr_t, workspace) X(int64_t, workspace_extent)  \
  X(int64_t, L) X(int64_t, R) X(int64_t, C) X(int, dtype) X(std::uintptr_t, stream)
#define VQIM_ADAFACTOR8_STEP_FIELDS(X)                                                                     \
  X(std::uintptr_t, g) X(int64_t, g_extent) X(int64_t, g_stride_l) X(int64_t, g_stride_r)                 \
  X(int64_t, g_stride_c) X(std::uintptr_t, p) X(int64_t, p_extent) X(int64_t, p_stride_l)                  \
  X(int64_t, p_stride_r) X(int64_t, p_stride_c) X(std::uintptr_t, q) X(int64_t, q_extent)                  \
  X(std::uintptr_t, scale) X(int64_t, scale_extent) X(std::uintptr_t, a) X(int64_t, a_extent)              \
  X(std::uintptr_t, b) X(int64_t, b_extent) X(std::uintptr_t, sumsq_parts) X(int64_t, sumsq_parts_extent)  \
  X(int64_t, n_parts) X(int64_t, L) X(int64_t, R) X(int64_t, C) X(double, lr) X(double, decay)             \
  X(double, beta1) X(double, one_minus_beta1) X(double, clip_threshold) X(int, dtype) X(std::uintptr_t, stream)

// g and p are (L, R, C) strided views; every other operand is contiguous fp32 (q int8): the row
// and column partials (P, L, R) / (P, L, C), r and a (L * R), c and b (L * C), the int8 moment q
// (L * R * C) with one scale per kQBlock values.
struct RowColSumsParams {
  VQIM_ADAFACTOR8_ROW_COL_SUMS_FIELDS(VQIM_DECLARE_FIELD)
};
struct FactorsParams {
  VQIM_ADAFACTOR8_FACTORS_FIELDS(VQIM_DECLARE_FIELD)
};
struct FullFactorsParams {
  VQIM_ADAFACTOR8_FULL_FACTORS_FIELDS(VQIM_DECLARE_FIELD)
};
struct SumsqParams {
  VQIM_ADAFACTOR8_SUMSQ_FIELDS(VQIM_DECLARE_FIELD)
};
struct StepParams {
  VQIM_ADAFACTOR8_STEP_FIELDS(VQIM_DECLARE_FIELD)
};

// A contiguous operand of n elements.
void check_flat(const char* op, const char* name, std::uintptr_t ptr, int64_t extent, const char* size_name,
                int64_t n, bool written) {
  check_operand(op, name, ptr, extent, {{size_name, n, nullptr, 1}}, written);
}

void row_col_sums(const RowColSumsParams& p) {
  constexpr const char* op = "adafactor8_row_col_sums";
  const int64_t L = p.L, R = p.R, C = p.C, row_tiles = p.row_tiles;
  check_view(L, R, C);
  VQIM_CHECK(row_tiles >= 1, "adafactor8_row_col_sums: row_tiles must be >= 1, got ", row_tiles);
  check_dtype(op, "dtype", p.dtype);
  const int64_t n_row_blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t n_row_groups = (n_row_blocks + row_tiles - 1) / row_tiles;
  const int64_t n_col_blocks = (C + kColsPerBlock - 1) / kColsPerBlock;
  VQIM_CHECK(L * n_row_groups < (int64_t{1} << 31), "adafactor8_row_col_sums: too many rows (L * R = ", L * R, ")");
  VQIM_CHECK(n_col_blocks < 65536, "adafactor8_row_col_sums: too many columns (C = ", C, ")");
  check_operand(op, "g", p.g, p.g_extent,
                {{"L", L, "g_stride_l", p.g_stride_l}, {"R", R, "g_stride_r", p.g_stride_r},
                 {"C", C, "g_stride_c", p.g_stride_c}},
                false);
  check_flat(op, "row_part", p.row_part, p.row_part_extent, "ceil(C / 256) * L * R", n_col_blocks * L * R, true);
  check_flat(op, "col_part", p.col_part, p.col_part_extent, "ceil(ceil(R / 32) / row_tiles) * L * C",
             n_row_groups * L * C, true);
  check_device_pointers(op, {{"g", p.g}, {"row_part", p.row_part}, {"col_part", p.col_part}});
  const dim3 grid(static_cast<unsigned>(L * n_row_groups), static_cast<unsigned>(n_col_blocks));
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    row_col_sums_kernel<scalar_t><<<grid, dim3(32, 8), 0, as_stream(p.stream)>>>(
        as_ptr<const scalar_t>(p.g), p.g_stride_l, p.g_stride_r, p.g_stride_c, as_ptr<float>(p.row_part),
        as_ptr<float>(p.col_part), L, R, C, row_tiles, n_row_groups);
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void factors(const FactorsParams& p) {
  constexpr const char* op = "adafactor8_factors";
  const int64_t L = p.L, R = p.R, C = p.C;
  check_view(L, R, C);
  VQIM_CHECK(p.n_rowparts >= 1 && p.n_colparts >= 1,
             "adafactor8_factors: need at least one partial sum per side, got ", p.n_rowparts, " and ", p.n_colparts);
  VQIM_CHECK(L < (int64_t{1} << 31), "adafactor8_factors: too many slices (L = ", L, ")");
  check_flat(op, "row_part", p.row_part, p.row_part_extent, "n_rowparts * L * R", p.n_rowparts * L * R, false);
  check_flat(op, "col_part", p.col_part, p.col_part_extent, "n_colparts * L * C", p.n_colparts * L * C, false);
  check_flat(op, "r", p.r, p.r_extent, "L * R", L * R, true);
  check_flat(op, "c", p.c, p.c_extent, "L * C", L * C, true);
  check_flat(op, "a", p.a, p.a_extent, "L * R", L * R, true);
  check_flat(op, "b", p.b, p.b_extent, "L * C", L * C, true);
  check_device_pointers(op, {{"row_part", p.row_part}, {"col_part", p.col_part}, {"r", p.r}, {"c", p.c},
                             {"a", p.a}, {"b", p.b}});
  factors_kernel<<<dim3(static_cast<unsigned>(L), 2), kFactorsThreads, 0, as_stream(p.stream)>>>(
      as_ptr<const float>(p.row_part), as_ptr<const float>(p.col_part), as_ptr<float>(p.r), as_ptr<float>(p.c),
      as_ptr<float>(p.a), as_ptr<float>(p.b), L, R, C, p.n_rowparts, p.n_colparts, static_cast<float>(p.beta2_t),
      static_cast<float>(p.one_minus_beta2_t), static_cast<float>(p.eps1));
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void full_factors(const FullFactorsParams& p) {
  constexpr const char* op = "adafactor8_full_factors";
  const int64_t N = p.N;
  VQIM_CHECK(N >= 1, "adafactor8_full_factors: N must be >= 1, got ", N);
  check_dtype(op, "dtype", p.dtype);
  check_operand(op, "g", p.g, p.g_extent, {{"N", N, "g_stride", p.g_stride}}, false);
  check_flat(op, "v", p.v, p.v_extent, "N", N, true);
  check_flat(op, "b", p.b, p.b_extent, "N", N, true);
  check_device_pointers(op, {{"g", p.g}, {"v", p.v}, {"b", p.b}});
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    full_factors_kernel<scalar_t><<<static_cast<unsigned>((N + 255) / 256), 256, 0, as_stream(p.stream)>>>(
        as_ptr<const scalar_t>(p.g), p.g_stride, as_ptr<float>(p.v), as_ptr<float>(p.b), N,
        static_cast<float>(p.beta2_t), static_cast<float>(p.one_minus_beta2_t), static_cast<float>(p.eps1));
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void sumsq(const SumsqParams& p) {
  constexpr const char* op = "adafactor8_sumsq";
  const int64_t L = p.L, R = p.R, C = p.C;
  check_view(L, R, C);
  check_dtype(op, "dtype", p.dtype);
  const int64_t N = L * R * C;
  const int64_t n_blocks = (N + kQBlock - 1) / kQBlock;
  constexpr int kWarps = kSumsqThreads / 32;
  // At least 4 quantization blocks per warp; at most kSumsqMaxBlocks partials.
  const int blocks = static_cast<int>(std::min<int64_t>((n_blocks + 4 * kWarps - 1) / (4 * kWarps), kSumsqMaxBlocks));
  check_operand(op, "g", p.g, p.g_extent,
                {{"L", L, "g_stride_l", p.g_stride_l}, {"R", R, "g_stride_r", p.g_stride_r},
                 {"C", C, "g_stride_c", p.g_stride_c}},
                false);
  check_flat(op, "a", p.a, p.a_extent, "L * R", L * R, false);
  check_flat(op, "b", p.b, p.b_extent, "L * C", L * C, false);
  check_flat(op, "out", p.out, p.out_extent, "1", 1, true);
  check_flat(op, "workspace", p.workspace, p.workspace_extent, "partial sums", blocks, true);
  check_device_pointers(op, {{"g", p.g}, {"a", p.a}, {"b", p.b}, {"out", p.out}, {"workspace", p.workspace}});
  cudaStream_t s = as_stream(p.stream);
  const View3 gv{R, C, p.g_stride_l, p.g_stride_r, p.g_stride_c};
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    VQIM_LAYOUT_SWITCH(layout_of(L, R, C), kLayout, [&] {
      sumsq_partial_kernel<scalar_t, kLayout><<<blocks, kSumsqThreads, 0, s>>>(
          as_ptr<const scalar_t>(p.g), gv, as_ptr<const float>(p.a), as_ptr<const float>(p.b),
          as_ptr<float>(p.workspace), N, n_blocks);
    });
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
  sum_partials_kernel<<<1, 32, 0, s>>>(as_ptr<const float>(p.workspace), as_ptr<float>(p.out), blocks);
  VQIM_CUDA_CHECK(cudaGetLastError());
}

void step(const StepParams& p) {
  constexpr const char* op = "adafactor8_step";
  const int64_t L = p.L, R = p.R, C = p.C, n_parts = p.n_parts;
  check_view(L, R, C);
  VQIM_CHECK(n_parts >= 1 && n_parts <= 4096, "adafactor8_step: n_parts must be in [1, 4096], got ", n_parts);
  VQIM_CHECK(p.clip_threshold > 0, "adafactor8_step: clip_threshold must be > 0, got ", p.clip_threshold);
  check_dtype(op, "dtype", p.dtype);
  const int64_t N = L * R * C;
  const int64_t n_blocks = (N + kQBlock - 1) / kQBlock;
  constexpr int kWarps = 8;
  const int64_t grid = (n_blocks + kWarps - 1) / kWarps;
  VQIM_CHECK(grid < (int64_t{1} << 31), "adafactor8_step: tensor too large (N = ", N, ")");
  check_operand(op, "g", p.g, p.g_extent,
                {{"L", L, "g_stride_l", p.g_stride_l}, {"R", R, "g_stride_r", p.g_stride_r},
                 {"C", C, "g_stride_c", p.g_stride_c}},
                false);
  check_operand(op, "p", p.p, p.p_extent,
                {{"L", L, "p_stride_l", p.p_stride_l}, {"R", R, "p_stride_r", p.p_stride_r},
                 {"C", C, "p_stride_c", p.p_stride_c}},
                true);
  check_flat(op, "q", p.q, p.q_extent, "L * R * C", N, true);
  check_flat(op, "scale", p.scale, p.scale_extent, "ceil(L * R * C / 256)", n_blocks, true);
  check_flat(op, "a", p.a, p.a_extent, "L * R", L * R, false);
  check_flat(op, "b", p.b, p.b_extent, "L * C", L * C, false);
  check_flat(op, "sumsq_parts", p.sumsq_parts, p.sumsq_parts_extent, "n_parts", n_parts, false);
  check_device_pointers(op, {{"g", p.g}, {"p", p.p}, {"q", p.q}, {"scale", p.scale}, {"a", p.a}, {"b", p.b},
                             {"sumsq_parts", p.sumsq_parts}});
  cudaStream_t s = as_stream(p.stream);
  const View3 gv{R, C, p.g_stride_l, p.g_stride_r, p.g_stride_c};
  const View3 pv{R, C, p.p_stride_l, p.p_stride_r, p.p_stride_c};
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    VQIM_LAYOUT_SWITCH(layout_of(L, R, C), kLayout, [&] {
      step_kernel<scalar_t, kLayout><<<static_cast<unsigned>(grid), kWarps * 32, 0, s>>>(
          as_ptr<const scalar_t>(p.g), gv, as_ptr<scalar_t>(p.p), pv, as_ptr<int8_t>(p.q), as_ptr<float>(p.scale),
          as_ptr<const float>(p.a), as_ptr<const float>(p.b), as_ptr<const float>(p.sumsq_parts),
          static_cast<int>(n_parts), N, n_blocks, static_cast<float>(p.lr), static_cast<float>(p.decay),
          static_cast<float>(p.beta1), static_cast<float>(p.one_minus_beta1), static_cast<float>(p.clip_threshold));
    });
  });
  VQIM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace vqim

VQIM_REGISTER_OP(adafactor8, [](vqim::py::module_& m) {
  namespace py = vqim::py;
  VQIM_BIND_PARAMS(m, vqim::RowColSumsParams, "Adafactor8RowColSumsParams", VQIM_ADAFACTOR8_ROW_COL_SUMS_FIELDS);
  VQIM_BIND_PARAMS(m, vqim::FactorsParams, "Adafactor8FactorsParams", VQIM_ADAFACTOR8_FACTORS_FIELDS);
  VQIM_BIND_PARAMS(m, vqim::FullFactorsParams, "Adafactor8FullFactorsParams", VQIM_ADAFACTOR8_FULL_FACTORS_FIELDS);
  VQIM_BIND_PARAMS(m, vqim::SumsqParams, "Adafactor8SumsqParams", VQIM_ADAFACTOR8_SUMSQ_FIELDS);
  VQIM_BIND_PARAMS(m, vqim::StepParams, "Adafactor8StepParams", VQIM_ADAFACTOR8_STEP_FIELDS);
  m.def("adafactor8_row_col_sums", &vqim::row_col_sums,
        "partial sums of g^2 over an (L, R, C) strided view: row_part [ceil(C / 256), L, R] (one per column "
        "tile) and col_part [ceil(ceil(R / 32) / row_tiles), L, C] (one per group of row_tiles 32-row tiles)",
        py::arg("params"));
  m.def("adafactor8_factors", &vqim::factors,
        "sum the (P, L, R) / (P, L, C) partials, update r [L, R] and c [L, C] in place, write "
        "a = 1 / sqrt(r / mean r) and b = 1 / sqrt(c)",
        py::arg("params"));
  m.def("adafactor8_full_factors", &vqim::full_factors,
        "unfactored second moment: v <- beta2_t v + (1 - beta2_t)(g^2 + eps1) in place, b = 1 / sqrt(v)",
        py::arg("params"));
  m.def("adafactor8_sumsq", &vqim::sumsq,
        "sum of (g * a[l, r] * b[l, c])^2 into out (fp32 scalar); workspace holds 1024 floats", py::arg("params"));
  m.def("adafactor8_step", &vqim::step,
        "fused step: clip from the partial sums of u^2; m = beta1 * q * scale + (1 - beta1) * u * clip; "
        "p = p * decay - lr * m; re-quantize m",
        py::arg("params"));
});
