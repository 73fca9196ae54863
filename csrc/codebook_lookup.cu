// codebook_lookup: argmax_k <z/|z|, e_k/|e_k|>, the CUDA twin of kernels/codebook_lookup.py.
//
// One block = 8 warps over 32 rows of z. Lane l owns row l (held in registers, zero-padded to
// DMAX); warp w scores the codes k = w, w + 8, ... of each shared-memory codebook tile, so all
// lanes of a warp read the same code (a shared-memory broadcast). As in the Triton kernel, the
// code norms come from the tile in shared memory, 1/|z| is applied once per row, and the [N, K]
// score matrix never exists.
//
// Ties (kernels/codebook_lookup.py): the answer is the lowest index whose fp32 score is not below
// the row's best minus kTieTol. That needs the final best, so the kernel makes two passes over
// the codebook: the best, then the lowest index that ties it.
//
// z and the codebook share one dtype here. Every load converts to fp32, so for mixed dtypes
// kernels/codebook_lookup.py calls the fp32 kernel on upcast copies (bf16/fp16 -> fp32 is exact):
// the same scores a two-dtype kernel would compute, never one operand rounded to the other's dtype.
#include "common.h"

namespace vqim {
namespace {

constexpr int kRows = 32;               // rows of z per block (one per lane)
constexpr int kWarps = 8;               // warps per block, each scores every 8th code
constexpr int kTileFloats = 8192;       // 32 KiB codebook tile in shared memory
// kernels/codebook_lookup.py's TIE_TOL (2^-17): a code ties the best when its score is not
// below best - kTieTol. tests/test_cuda_harness.py checks codes on either side of it.
constexpr float kTieTol = 0x1p-17f;

// Calls visit(k, s) for each code k = warp, warp + 8, ... of the codebook in increasing order,
// s being its fp32 cosine with this lane's row. Block-collective: every thread of the block calls
// it, as the tiles are loaded together; both passes call it, so a code scores the same in each.
template <typename scalar_t, int DMAX, typename Visit>
__device__ __forceinline__ void score_codes(const scalar_t* __restrict__ cb, int64_t cb_s0, int64_t cb_s1, int64_t K,
                                            int D, bool normalized, const float (&zr)[DMAX], float inv_z,
                                            float* tile, float* inv_norm, Visit&& visit) {
  constexpr int TILE_K = kTileFloats / DMAX;
  const int warp = threadIdx.x / 32;
  for (int64_t k0 = 0; k0 < K; k0 += TILE_K) {
    for (int i = threadIdx.x; i < TILE_K * DMAX; i += blockDim.x) {
      const int kk = i / DMAX, d = i % DMAX;
      const int64_t k = k0 + kk;
      tile[i] = (k < K && d < D) ? to_float(cb[k * cb_s0 + d * cb_s1]) : 0.f;
    }
    __syncthreads();
    for (int kk = threadIdx.x; kk < TILE_K; kk += blockDim.x) {
      if (normalized) {
        inv_norm[kk] = 1.f;
      } else {
        float sq = 0.f;
#pragma unroll
        for (int d = 0; d < DMAX; ++d) sq += tile[kk * DMAX + d] * tile[kk * DMAX + d];
        // A zero code scores 0 against everything, as in the reference.
        inv_norm[kk] = sq > 0.f ? 1.f / sqrtf(sq) : 0.f;
      }
    }
    __syncthreads();
    const int tile_k = K - k0 < TILE_K ? static_cast<int>(K - k0) : TILE_K;
    for (int kk = warp; kk < tile_k; kk += kWarps) {
      const float* code = tile + kk * DMAX;
      float dot = 0.f;
#pragma unroll
      for (int d = 0; d < DMAX; ++d) dot = fmaf(zr[d], code[d], dot);
      visit(k0 + kk, dot * inv_norm[kk] * inv_z);
    }
    __syncthreads();
  }
}

template <typename scalar_t, int DMAX>
__global__ void __launch_bounds__(kRows * kWarps)
codebook_lookup_kernel(const scalar_t* __restrict__ z, int64_t z_s0, int64_t z_s1,
                       const scalar_t* __restrict__ cb, int64_t cb_s0, int64_t cb_s1,
                       int64_t* __restrict__ out, int64_t N, int64_t K, int D, bool normalized) {
  constexpr int TILE_K = kTileFloats / DMAX;
  __shared__ float tile[TILE_K * DMAX];  // (TILE_K, DMAX), zero-padded past D and K
  __shared__ float inv_norm[TILE_K];
  __shared__ float red_score[kWarps][kRows];
  __shared__ int64_t red_index[kWarps][kRows];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + lane;

  float zr[DMAX];
  float sq = 0.f;
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    zr[d] = (row < N && d < D) ? to_float(z[row * z_s0 + d * z_s1]) : 0.f;
    sq += zr[d] * zr[d];
  }
  // A zero row scores 0 against every code, so every code ties and it gets index 0.
  const float inv_z = sq > 0.f ? 1.f / sqrtf(sq) : 0.f;

  // Pass 1: the row's best score (a NaN score never passes '>').
  float best = -INFINITY;
  score_codes<scalar_t, DMAX>(cb, cb_s0, cb_s1, K, D, normalized, zr, inv_z, tile, inv_norm,
                              [&](int64_t, float s) { best = s > best ? s : best; });
  red_score[warp][lane] = best;
  __syncthreads();
  float row_best = red_score[0][lane];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) row_best = fmaxf(row_best, red_score[w][lane]);

  // Pass 2: each warp visits its codes in increasing order, so its first code not below the
  // threshold is its lowest; the row's answer is the lowest over the warps. The best code itself
  // qualifies, so the index is always < K.
  const float threshold = row_best - kTieTol;
  int64_t first = K;
  score_codes<scalar_t, DMAX>(cb, cb_s0, cb_s1, K, D, normalized, zr, inv_z, tile, inv_norm,
                              [&](int64_t k, float s) {
                                if (first == K && !(s < threshold)) first = k;
                              });
  red_index[warp][lane] = first;
  __syncthreads();
  if (warp == 0 && row < N) {
    int64_t k = red_index[0][lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) k = red_index[w][lane] < k ? red_index[w][lane] : k;
    out[row] = k;
  }
}

template <typename scalar_t, int DMAX>
void launch(std::uintptr_t z, int64_t z_s0, int64_t z_s1, std::uintptr_t cb, int64_t cb_s0, int64_t cb_s1,
            std::uintptr_t out, int64_t N, int64_t K, int D, bool normalized, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kRows - 1) / kRows));
  codebook_lookup_kernel<scalar_t, DMAX><<<grid, kRows * kWarps, 0, stream>>>(
      as_ptr<const scalar_t>(z), z_s0, z_s1, as_ptr<const scalar_t>(cb), cb_s0, cb_s1, as_ptr<int64_t>(out), N, K, D,
      normalized);
  VQIM_CUDA_CHECK(cudaGetLastError());
}

#define VQIM_CODEBOOK_LOOKUP_FIELDS(X)                                                                  \
  X(std::uintptr_t, z) X(int64_t, z_extent) X(int64_t, z_stride0) X(int64_t, z_stride1)                    \
  X(std::uintptr_t, codebook) X(int64_t, codebook_extent) X(int64_t, cb_stride0) X(int64_t, cb_stride1)    \
  X(std::uintptr_t, out) X(int64_t, out_extent) X(int64_t, N) X(int64_t, K) X(int64_t, D) X(int, dtype)     \
  X(bool, normalized) X(std::uintptr_t, stream)

// z [N, D] and codebook [K, D] (one dtype, any non-negative strides), out [N] int64 contiguous.
struct CodebookLookupParams {
  VQIM_CODEBOOK_LOOKUP_FIELDS(VQIM_DECLARE_FIELD)
};

void codebook_lookup(const CodebookLookupParams& p) {
  constexpr const char* op = "codebook_lookup";
  const int64_t N = p.N, K = p.K, D = p.D;
  VQIM_CHECK(N >= 0, "codebook_lookup: N must be >= 0, got ", N);
  VQIM_CHECK(K >= 1, "codebook_lookup: the codebook needs K >= 1 codes, got ", K);
  VQIM_CHECK(D >= 1 && D <= 256, "codebook_lookup: D must be in [1, 256] for backend='cuda', got ", D);
  VQIM_CHECK(N < (int64_t{1} << 31) * kRows, "codebook_lookup: N too large for the grid, got ", N);
  check_dtype(op, "dtype", p.dtype);
  if (N == 0) return;
  check_operand(op, "z", p.z, p.z_extent, {{"N", N, "z_stride0", p.z_stride0}, {"D", D, "z_stride1", p.z_stride1}},
                false);
  check_operand(op, "codebook", p.codebook, p.codebook_extent,
                {{"K", K, "cb_stride0", p.cb_stride0}, {"D", D, "cb_stride1", p.cb_stride1}}, false);
  check_operand(op, "out", p.out, p.out_extent, {{"N", N, nullptr, 1}}, true);
  check_device_pointers(op, {{"z", p.z}, {"codebook", p.codebook}, {"out", p.out}});
  const cudaStream_t s = as_stream(p.stream);
  const int d = static_cast<int>(D);
  const bool nz = p.normalized;
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    auto go = [&](auto dmax) {
      launch<scalar_t, decltype(dmax)::value>(p.z, p.z_stride0, p.z_stride1, p.codebook, p.cb_stride0, p.cb_stride1,
                                              p.out, N, K, d, nz, s);
    };
    if (d <= 8) go(std::integral_constant<int, 8>{});
    else if (d <= 16) go(std::integral_constant<int, 16>{});
    else if (d <= 32) go(std::integral_constant<int, 32>{});
    else if (d <= 64) go(std::integral_constant<int, 64>{});
    else if (d <= 128) go(std::integral_constant<int, 128>{});
    else go(std::integral_constant<int, 256>{});
  });
}

}  // namespace
}  // namespace vqim

VQIM_REGISTER_OP(codebook_lookup, [](vqim::py::module_& m) {
  VQIM_BIND_PARAMS(m, vqim::CodebookLookupParams, "CodebookLookupParams", VQIM_CODEBOOK_LOOKUP_FIELDS);
  m.def("codebook_lookup", &vqim::codebook_lookup,
        "argmax_k cos(z_n, e_k) -> out[N] (int64), from a CodebookLookupParams (pointers, element strides and "
        "extents, dtype code, stream)",
        vqim::py::arg("params"));
});
