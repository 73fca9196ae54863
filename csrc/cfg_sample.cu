// Fused classifier-free-guidance sampling: CFG combine, temperature, top-k, top-p, min-p, Philox draw.
//
// The CUDA twin of kernels/cfg_sample.py (whose docstring is the definition). One thread block
// per row. Rows up to kCacheMax entries keep the guided, temperature-scaled logits in shared
// memory for every pass; longer rows recompute them from the (L2-resident) logits each pass.
// Top-k and top-p thresholds are exact: a bisection over the order-preserving integer keys of
// the fp32 values that snaps each bound onto the nearest data key, so it stops once the
// threshold value is isolated. Top-p keeps the smallest set reaching p in descending value with
// ties broken by the lower index: every token above the threshold value tau, and of the tokens
// at tau (each of mass e) in index order the j-th iff M_above + j * e < p * Zk (M_above the mass
// above tau), so a tie group straddling the cut keeps only its lowest indices that are needed;
// top-k keeps its tie group whole. Min-p then keeps, of those, the tokens with exp(z - max) >= min_p.
// The draw is an inverse CDF in vocabulary order with one uniform per row from Philox4x32-10
// keyed by (seed, step): the same 32-bit word as the reference's philox_uniform and Triton's
// tl.randint4x(seed, step).
#include <cmath>
#include <cstdint>

#include "common.h"

namespace vqim {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// A block gets 48 KiB of shared memory without an opt-in, its static arrays and the launch's
// dynamic bytes together. The reduction scratch (red_l, red_f: 204 bytes, 208 as ptxas pads
// them) keeps 256; the cached row gets the rest.
constexpr int64_t kStaticShared = 256;
constexpr int64_t kCacheMax = (48 * 1024 - kStaticShared) / sizeof(float);  // 12224 fp32 logits
constexpr long long kBig = 1LL << 40;  // outside the key range [-2^31, 2^31)

struct MaxF { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct SumF { __device__ float operator()(float a, float b) const { return a + b; } };
struct SumL { __device__ long long operator()(long long a, long long b) const { return a + b; } };
struct MinL { __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; } };
struct MaxL { __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; } };

// Every thread gets the block-wide reduction; smem holds at least kWarps + 1 elements.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T identity, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : identity;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) smem[kWarps] = v;
  }
  __syncthreads();
  T r = smem[kWarps];
  __syncthreads();
  return r;
}

// Inclusive block scan of one value per thread; *total gets the block sum.
template <typename T>
__device__ __forceinline__ T block_inclusive_scan(T v, T* smem, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    T n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarps ? smem[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      T n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    if (lane < kWarps) smem[lane] = w;  // inclusive prefix of warp totals
  }
  __syncthreads();
  if (warp > 0) v += smem[warp - 1];
  *total = smem[kWarps - 1];
  __syncthreads();
  return v;
}

__device__ __forceinline__ void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  *hi = __umulhi(a, b);
  *lo = a * b;
}

// Philox4x32-10, key (seed_lo, seed_hi), counter (step_lo, step_hi, 0, 0): the first output word.
__device__ __forceinline__ uint32_t philox_word(uint64_t seed, uint64_t step) {
  uint32_t c0 = static_cast<uint32_t>(step), c1 = static_cast<uint32_t>(step >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    uint32_t hi_b, lo_b, hi_a, lo_a;
    mulhilo(0xCD9E8D57u, c2, &hi_b, &lo_b);
    mulhilo(0xD2511F53u, c0, &hi_a, &lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Order-preserving map of a finite fp32 to an integer (-0.0 maps like +0.0).
__device__ __forceinline__ long long ordered_key(float z) {
  int bits = __float_as_int(z == 0.0f ? 0.0f : z);
  return static_cast<long long>(bits >= 0 ? bits : bits ^ 0x7FFFFFFF);
}

template <typename scalar_t, bool HAS_UNCOND>
struct RowLogits {
  const scalar_t* c;
  const scalar_t* u;
  int64_t scv, suv;
  float s, tdiv;
  // Guided, temperature-scaled logit; -inf where masked (non-finite input or result).
  __device__ __forceinline__ float operator()(int64_t j) const {
    float cv = to_float(c[j * scv]);
    float x;
    bool ok;
    if constexpr (HAS_UNCOND) {
      float uv = to_float(u[j * suv]);
      ok = isfinite(cv) && isfinite(uv);
      x = uv + s * (cv - uv);
    } else {
      ok = true;
      x = cv;
    }
    float z = x / tdiv;
    return ok && isfinite(z) ? z : -INFINITY;
  }
};

template <typename scalar_t, bool HAS_UNCOND, bool CACHED>
__global__ void __launch_bounds__(kThreads) cfg_sample_kernel(
    const scalar_t* __restrict__ cond, int64_t c_s0, int64_t c_s1,
    const scalar_t* __restrict__ uncond, int64_t u_s0, int64_t u_s1,
    const float* __restrict__ scale, const float* __restrict__ temp, const int64_t* __restrict__ topk,
    const float* __restrict__ topp, const float* __restrict__ minp, const int64_t* __restrict__ seeds,
    const int64_t* __restrict__ steps, int64_t* __restrict__ tokens, float* __restrict__ logprob, int64_t V) {
  extern __shared__ float zcache[];
  __shared__ long long red_l[kWarps + 1];
  __shared__ float red_f[kWarps + 1];
  static_assert(sizeof(red_l) + sizeof(red_f) + 16 <= kStaticShared, "kCacheMax must leave room for the scratch");
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const float t = temp[row];
  const bool greedy = t == 0.0f;
  RowLogits<scalar_t, HAS_UNCOND> logits{cond + row * c_s0, HAS_UNCOND ? uncond + row * u_s0 : nullptr, c_s1, u_s1,
                                         scale[row], greedy ? 1.0f : t};
  auto zat = [&](int64_t j) -> float {
    if constexpr (CACHED) return zcache[j];
    else return logits(j);
  };

  // Pass 1: max, first argmax, number of finite entries, smallest finite key.
  float m_loc = -INFINITY;
  long long am_loc = V, n_loc = 0, kmin_loc = kBig;
  for (int64_t j = tid; j < V; j += kThreads) {
    float z = logits(j);
    if constexpr (CACHED) zcache[j] = z;
    if (z > m_loc) { m_loc = z; am_loc = j; }  // j increases per thread: keeps the first maximum
    if (z > -INFINITY) {
      ++n_loc;
      long long k = ordered_key(z);
      kmin_loc = k < kmin_loc ? k : kmin_loc;
    }
  }
  const float m = block_allreduce(m_loc, MaxF(), -INFINITY, red_f);
  const long long amax = block_allreduce(m_loc == m && m > -INFINITY ? am_loc : (long long)V, MinL(), kBig, red_l);
  const long long n = block_allreduce(n_loc, SumL(), 0LL, red_l);
  const long long kmin = block_allreduce(kmin_loc, MinL(), kBig, red_l);
  const bool sampling = n > 0 && t > 0.0f;
  const long long kmax = n > 0 ? ordered_key(m) : 0;

  // Top-k: the largest key lo with count(key >= lo) >= k (the k-th largest value).
  const long long k = topk[row];
  const bool k_on = sampling && k > 0 && k < n;
  long long lo = kmin, hi = k_on ? kmax + 1 : kmin + 1;
  while (hi - lo > 1) {
    const long long mid = lo + (hi - lo) / 2;
    long long cnt = 0, nxt = kBig, prv = -kBig;
    for (int64_t j = tid; j < V; j += kThreads) {
      float z = zat(j);
      if (!(z > -INFINITY)) continue;
      long long key = ordered_key(z);
      if (key >= mid) { ++cnt; nxt = key < nxt ? key : nxt; }
      else prv = key > prv ? key : prv;
    }
    cnt = block_allreduce(cnt, SumL(), 0LL, red_l);
    nxt = block_allreduce(nxt, MinL(), kBig, red_l);
    prv = block_allreduce(prv, MaxL(), -kBig, red_l);
    // The count is constant between the data keys prv and nxt: snap the bound onto them.
    if (cnt >= k) lo = nxt;
    else hi = prv + 1;
  }
  const long long tau_k = lo;

  // Top-p: the smallest key tau with M_above = mass(key > tau) < p * Zk, Zk = mass(key >= tau_k).
  const float p = topp[row];
  const bool p_on = sampling && p < 1.0f;
  float zk = 0.0f;
  if (p_on) {
    float acc = 0.0f;
    for (int64_t j = tid; j < V; j += kThreads) {
      float z = zat(j);
      if (z > -INFINITY && ordered_key(z) >= tau_k) acc += expf(z - m);
    }
    zk = block_allreduce(acc, SumF(), 0.0f, red_f);
  }
  const float target = p * zk;
  lo = tau_k - 1;
  hi = p_on ? kmax : tau_k;
  while (hi - lo > 1) {
    const long long mid = lo + (hi - lo) / 2;
    float mass = 0.0f;
    long long nxt = kBig, prv = -kBig;
    for (int64_t j = tid; j < V; j += kThreads) {
      float z = zat(j);
      if (!(z > -INFINITY)) continue;
      long long key = ordered_key(z);
      if (key > mid) { mass += expf(z - m); nxt = key < nxt ? key : nxt; }
      else prv = key > prv ? key : prv;
    }
    mass = block_allreduce(mass, SumF(), 0.0f, red_f);
    nxt = block_allreduce(nxt, MinL(), kBig, red_l);
    prv = block_allreduce(prv, MaxL(), -kBig, red_l);
    if (mass < target) hi = prv;
    else lo = nxt - 1;
  }
  const long long tau = hi;

  // The tokens at tau (each of mass e_tau) in index order: the j-th is kept iff
  // M_above + j * e_tau < target, i.e. the first c of the g of them. Kept: key > tau, or key == tau
  // and index <= cut. Off (or c == g) keeps the whole group, as top-k does.
  long long cut = V;
  if (p_on) {
    float above_loc = 0.0f, e_loc = 0.0f;
    long long g_loc = 0;
    for (int64_t j = tid; j < V; j += kThreads) {
      float z = zat(j);
      if (!(z > -INFINITY)) continue;
      long long key = ordered_key(z);
      if (key > tau) above_loc += expf(z - m);
      else if (key == tau) { ++g_loc; e_loc = expf(z - m); }
    }
    const float m_above = block_allreduce(above_loc, SumF(), 0.0f, red_f);
    const long long g = block_allreduce(g_loc, SumL(), 0LL, red_l);
    const float e_tau = block_allreduce(e_loc, MaxF(), 0.0f, red_f);
    // Bisection over j; j = 0 is always kept (the search leaves M_above < target, and the largest
    // token is kept even where p * Zk rounds to 0). Invariant: j < c_lo kept, j >= c_hi not. The
    // _rn intrinsics keep the product and the sum separately rounded (no FMA), as the reference.
    long long c_lo = 1, c_hi = g;
    while (c_lo < c_hi) {
      const long long mid = (c_lo + c_hi + 1) / 2;
      if (__fadd_rn(m_above, __fmul_rn(static_cast<float>(mid - 1), e_tau)) < target) c_lo = mid;
      else c_hi = mid - 1;
    }
    if (c_lo < g) {
      // cut = the index of the c_lo-th token at tau: a running count in index order.
      long long seen = 0;
      for (int64_t base = 0; base < V && seen < c_lo; base += kThreads) {
        const int64_t j = base + tid;
        long long at = 0;
        if (j < V) {
          float z = zat(j);
          at = z > -INFINITY && ordered_key(z) == tau;
        }
        long long chunk;
        const long long rank = block_inclusive_scan(at, red_l, &chunk) + seen;  // 1-based
        const long long hit = block_allreduce(at && rank == c_lo ? static_cast<long long>(j) : -1LL, MaxL(), -1LL,
                                              red_l);
        if (hit >= 0) cut = hit;
        seen += chunk;
      }
    }
  }
  // Top-k and top-p keep key > tau, or key == tau and index <= cut; min-p then compares the
  // token's *e = exp(z - m) (computed only for the tokens those keep) with min_p.
  const float min_p = minp[row];
  auto kept = [&](int64_t j, float z, float* e) {
    if (!(z > -INFINITY)) return false;
    const long long key = ordered_key(z);
    if (!(key > tau || (key == tau && j <= cut))) return false;
    *e = expf(z - m);
    return *e >= min_p;
  };

  // The draw: total kept mass, then the first index whose running sum exceeds u * total.
  float tot_loc = 0.0f;
  long long last_loc = -1;
  for (int64_t j = tid; j < V; j += kThreads) {
    float e;
    if (kept(j, zat(j), &e)) { tot_loc += e; last_loc = j; }
  }
  const float total = block_allreduce(tot_loc, SumF(), 0.0f, red_f);
  const long long last = block_allreduce(last_loc, MaxL(), -1LL, red_l);
  const uint32_t word = philox_word(static_cast<uint64_t>(seeds[row]), static_cast<uint64_t>(steps[row]));
  const float thresh = static_cast<float>(word >> 8) * (1.0f / 16777216.0f) * total;
  long long idx = -1;
  float carry = 0.0f;
  if (sampling) {
    for (int64_t base = 0; base < V && idx < 0; base += kThreads) {
      const int64_t j = base + tid;
      float w = 0.0f;
      if (j < V) {
        float e;
        if (kept(j, zat(j), &e)) w = e;
      }
      float chunk_total;
      const float cs = block_inclusive_scan(w, red_f, &chunk_total) + carry;
      const long long first = block_allreduce(j < V && cs > thresh ? j : kBig, MinL(), kBig, red_l);
      if (first < kBig) idx = first;
      carry += chunk_total;
    }
  }
  if (tid == 0) {
    long long tok;
    float lp;
    if (n == 0) {
      tok = -1;
      lp = NAN;
    } else if (greedy) {
      tok = amax;
      lp = 0.0f;
    } else {
      tok = idx >= 0 ? idx : last;  // rounding can leave u * total past the running sum's end
      lp = zat(tok) - m - logf(total);
    }
    tokens[row] = tok;
    logprob[row] = lp;
  }
}

template <typename scalar_t>
void launch(std::uintptr_t cond, int64_t c_s0, int64_t c_s1, std::uintptr_t uncond, int64_t u_s0, int64_t u_s1,
            bool has_uncond, std::uintptr_t scale, std::uintptr_t temp, std::uintptr_t topk, std::uintptr_t topp,
            std::uintptr_t minp, std::uintptr_t seed, std::uintptr_t step, std::uintptr_t tokens,
            std::uintptr_t logprob, int64_t B, int64_t V, cudaStream_t stream) {
  const bool cached = V <= kCacheMax;
  const size_t smem = cached ? static_cast<size_t>(V) * sizeof(float) : 0;
  auto go = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
        as_ptr<const scalar_t>(cond), c_s0, c_s1, as_ptr<const scalar_t>(uncond), u_s0, u_s1,
        as_ptr<const float>(scale), as_ptr<const float>(temp), as_ptr<const int64_t>(topk), as_ptr<const float>(topp),
        as_ptr<const float>(minp), as_ptr<const int64_t>(seed), as_ptr<const int64_t>(step), as_ptr<int64_t>(tokens),
        as_ptr<float>(logprob), V);
  };
  if (has_uncond) {
    if (cached) go(cfg_sample_kernel<scalar_t, true, true>);
    else go(cfg_sample_kernel<scalar_t, true, false>);
  } else {
    if (cached) go(cfg_sample_kernel<scalar_t, false, true>);
    else go(cfg_sample_kernel<scalar_t, false, false>);
  }
  VQIM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

#define VQIM_CFG_SAMPLE_FIELDS(X)                                                                        \
  X(std::uintptr_t, cond) X(int64_t, cond_extent) X(int64_t, cond_stride0) X(int64_t, cond_stride1)         \
  X(std::uintptr_t, uncond) X(int64_t, uncond_extent) X(int64_t, uncond_stride0) X(int64_t, uncond_stride1) \
  X(bool, has_uncond) X(std::uintptr_t, cfg_scale) X(int64_t, cfg_scale_extent) X(std::uintptr_t, temperature) \
  X(int64_t, temperature_extent) X(std::uintptr_t, top_k) X(int64_t, top_k_extent) X(std::uintptr_t, top_p)    \
  X(int64_t, top_p_extent) X(std::uintptr_t, min_p) X(int64_t, min_p_extent) X(std::uintptr_t, seed)          \
  X(int64_t, seed_extent) X(std::uintptr_t, step) X(int64_t, step_extent) X(std::uintptr_t, tokens)             \
  X(int64_t, tokens_extent) X(std::uintptr_t, logprob) X(int64_t, logprob_extent) X(int64_t, B) X(int64_t, V)   \
  X(int, dtype) X(std::uintptr_t, stream)

// cond/uncond [B, V] logits (one dtype, any non-negative strides); cfg_scale, temperature, top_p,
// min_p (fp32), top_k, seed, step (int64), tokens (int64) and logprob (fp32): B contiguous elements each.
// Every pointer comes with its extent (elements addressable from it).
struct CfgSampleParams {
  VQIM_CFG_SAMPLE_FIELDS(VQIM_DECLARE_FIELD)
};

void cfg_sample(const CfgSampleParams& p) {
  constexpr const char* op = "cfg_sample";
  const int64_t B = p.B, V = p.V;
  VQIM_CHECK(B >= 0, "cfg_sample: B must be >= 0, got ", B);
  VQIM_CHECK(V >= 1, "cfg_sample: V must be >= 1, got ", V);
  VQIM_CHECK(B < (1LL << 31), "cfg_sample: B must be < 2^31, got ", B);
  check_dtype(op, "dtype", p.dtype);
  if (B == 0) return;
  check_operand(op, "cond", p.cond, p.cond_extent,
                {{"B", B, "cond_stride0", p.cond_stride0}, {"V", V, "cond_stride1", p.cond_stride1}}, false);
  // Without uncond the kernel never reads it; the launcher passes cond there.
  if (p.has_uncond) {
    check_operand(op, "uncond", p.uncond, p.uncond_extent,
                  {{"B", B, "uncond_stride0", p.uncond_stride0}, {"V", V, "uncond_stride1", p.uncond_stride1}}, false);
  }
  const auto row = [&](const char* name, std::uintptr_t ptr, int64_t extent, bool written) {
    check_operand(op, name, ptr, extent, {{"B", B, nullptr, 1}}, written);
  };
  row("cfg_scale", p.cfg_scale, p.cfg_scale_extent, false);
  row("temperature", p.temperature, p.temperature_extent, false);
  row("top_k", p.top_k, p.top_k_extent, false);
  row("top_p", p.top_p, p.top_p_extent, false);
  row("min_p", p.min_p, p.min_p_extent, false);
  row("seed", p.seed, p.seed_extent, false);
  row("step", p.step, p.step_extent, false);
  row("tokens", p.tokens, p.tokens_extent, true);
  row("logprob", p.logprob, p.logprob_extent, true);
  check_device_pointers(op, {{"cond", p.cond}, {"cfg_scale", p.cfg_scale}, {"temperature", p.temperature},
                             {"top_k", p.top_k}, {"top_p", p.top_p}, {"min_p", p.min_p}, {"seed", p.seed},
                             {"step", p.step}, {"tokens", p.tokens}, {"logprob", p.logprob}});
  if (p.has_uncond) check_device_pointers(op, {{"uncond", p.uncond}});
  VQIM_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    launch<scalar_t>(p.cond, p.cond_stride0, p.cond_stride1, p.uncond, p.uncond_stride0, p.uncond_stride1,
                     p.has_uncond, p.cfg_scale, p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.step,
                     p.tokens, p.logprob, B, V, as_stream(p.stream));
  });
}

}  // namespace vqim

VQIM_REGISTER_OP(cfg_sample, [](vqim::py::module_& m) {
  VQIM_BIND_PARAMS(m, vqim::CfgSampleParams, "CfgSampleParams", VQIM_CFG_SAMPLE_FIELDS);
  m.def("cfg_sample", &vqim::cfg_sample,
        "fused CFG sampling -> tokens[B] (int64), logprob[B] (fp32), from a CfgSampleParams (pointers, element "
        "strides and extents, per-row parameter arrays, dtype code, stream)",
        vqim::py::arg("params"));
});
