// torchkit CUDA kernels: the radix select fused with the error-feedback step, in CUDA C++.
//
// The same four launches as the Triton kernels (torchkit/ops/_triton/ef.py); loaded with ctypes
// (torchkit/ops/_cuda.py), so no torch headers. tk_step sequences them as the Python driver
// (torchkit/ops/_select.py: run) does for Triton, in one host call:
//   tk_predict:   one block: the lowest key the one pass collects, from the hint (what the last step found) or,
//                 with no hint, from 4096 entries spread over the vector.
//   tk_hist:      v per element (EF14 stores v in e on the first pass), a 2048-bin shared-memory histogram
//                 of (key >> shift_lo) over the entries whose key >> shift_hi equals a device-side prefix,
//                 merged once per block (zero bins skipped); persistent grid.
//   tk_threshold: one block: the bin holding the k-th largest key, the counts above it; scalars stay on the
//                 device.
//   tk_select:    entries above the threshold -> one output, equal to it -> another (the first `cap` in index
//                 order), by an order-preserving compaction: a block scan, then a decoupled look-back over
//                 block tickets taken in start order. Deterministic whatever the scheduling. `ge`: entries at
//                 or above it -> the second output, counted (one atomic per block): the one pass, which also
//                 computes v (EF14 stores it in e).
//   tk_scatter_add: out[idx] += scale * val for one worker (indices unique within a worker).
//   tk_step:      one whole fused step: the workspace zeroed, the passes of _select.run (one pass or two), and the
//                 state update at the sent entries (EF14 e = 0, EF21 h += v, EControl e -= v and h += v); 13 (two
//                 passes) or 18 (one pass) launches when exact, 5 or 12 when approximate, the workspace's memset
//                 and the hint's copy counted, issued from C++, against a Python and a ctypes call per launch.
//                 Launches whose device flag is off exit at once: a one-pass hit reads the vector once.
// Indices are int32: the driver sends d >= 2^30 to the reference (the look-back word packs two 30-bit counts).
// Built with -fmad=false: the reference rounds e * eta and the add separately.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kBins = 2048;
constexpr int kSelectThreads = 256;
#ifndef TK_ITEMS
#define TK_ITEMS 16
#endif
#ifndef TK_WARP_LOOKBACK
#define TK_WARP_LOOKBACK 1
#endif
constexpr int kItems = TK_ITEMS;  // elements per thread in tk_select (a multiple of 4)
constexpr int kSample = 4096;     // entries tk_predict reads at a cold start
// int32 scalar slots in device memory: torchkit/ops/_select.py's, slot for slot (17 and 18 are Triton's own)
enum Slot { S_B1 = 0, S_ABOVE1, S_NEED1, S_N1, S_OVER, S_FITS, S_B2, S_ABOVE2, S_NEED2, S_P3, S_T, S_A, S_CAP,
            S_ZERO, S_CTR1, S_CTR2, S_CTR3, S_LO = 19, S_C, S_HIT, S_RESCAN, S_NC, S_REDO, S_CAPC, S_CTR4, S_HINT };
constexpr int kMargin = 1 << 19;  // an exact one pass collects keys from 1/16 octave below the last k-th key
enum Level { kGate = 0, kOnePassLevel1 = 4 };  // tk_threshold's one-pass steps (1-3: the radix levels)
enum Mode { kTopK = 0, kEF14 = 1, kEF21 = 2, kEControl = 3, kCand = 4 };
enum GType { kF32 = 0, kBF16 = 1, kF16 = 2 };
constexpr unsigned long long kFlagA = 1ull << 60, kFlagP = 1ull << 61, kVals = (1ull << 60) - 1;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ unsigned key_of(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

template <int M, typename G>
__device__ __forceinline__ float value(const G* g, const float* e, const float* h, int i, float eta, bool stored) {
  if (M == kTopK) return to_f(g[i]);
  if (M == kEF14) return stored ? e[i] : __fadd_rn(e[i], to_f(g[i]));
  if (M == kEF21) return __fsub_rn(to_f(g[i]), h[i]);
  if (M == kEControl) return __fadd_rn(__fmul_rn(e[i], eta), __fsub_rn(to_f(g[i]), h[i]));
  return e[i];  // kCand: e is the candidate values
}

__device__ __forceinline__ bool on(const int* scal, int slot) { return slot < 0 || scal[slot] != 0; }

// Sub-histograms per block (warp w adds into copy w % kHistCopies): fewer collisions on the few bins that
// Gaussian-like data fills. Build-time knobs, so that variants can be timed side by side.
#ifndef TK_HIST_COPIES
#define TK_HIST_COPIES 1
#endif
#ifndef TK_VEC
#define TK_VEC 1
#endif
constexpr int kHistCopies = TK_HIST_COPIES;
constexpr int kHistThreads = 512;

template <typename T>
struct Vec4;  // four consecutive elements in one load
template <>
struct Vec4<float> {
  using type = float4;
};
template <>
struct Vec4<__nv_bfloat16> {
  using type = uint2;
};
template <>
struct Vec4<__half> {
  using type = uint2;
};

__device__ __forceinline__ void unpack4(float4 x, float* out) { out[0] = x.x, out[1] = x.y, out[2] = x.z, out[3] = x.w; }
template <typename G>
__device__ __forceinline__ void load4(const G* p, int i, float* out) {  // i is a multiple of 4, p 16-byte aligned
  if constexpr (sizeof(G) == 4) {
    unpack4(*reinterpret_cast<const float4*>(p + i), out);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p + i);
    const G* q = reinterpret_cast<const G*>(&raw);
    for (int j = 0; j < 4; ++j) out[j] = to_f(q[j]);
  }
}

// the four v of elements i..i+3 (and, for EF14's first pass, store them in e)
template <int M, typename G>
__device__ __forceinline__ void value4(const G* g, float* e, const float* h, int i, float eta, bool stored, float* v) {
  float a[4], b[4], c[4];
  if (M == kTopK) {
    load4(g, i, v);
  } else if (M == kEF14) {
    load4(e, i, a);
    if (stored) {
      for (int j = 0; j < 4; ++j) v[j] = a[j];
    } else {
      load4(g, i, b);
      for (int j = 0; j < 4; ++j) v[j] = __fadd_rn(a[j], b[j]);
      *reinterpret_cast<float4*>(e + i) = make_float4(v[0], v[1], v[2], v[3]);
    }
  } else if (M == kEF21) {
    load4(g, i, a), load4(h, i, b);
    for (int j = 0; j < 4; ++j) v[j] = __fsub_rn(a[j], b[j]);
  } else if (M == kEControl) {
    load4(g, i, a), load4(h, i, b), load4(e, i, c);
    for (int j = 0; j < 4; ++j) v[j] = __fadd_rn(__fmul_rn(c[j], eta), __fsub_rn(a[j], b[j]));
  } else {
    load4(e, i, v);
  }
}

template <int M, typename G>
__global__ void __launch_bounds__(kHistThreads) tk_hist(const G* g, float* e, const float* h, int* hist,
                                                         const int* scal, int d, float eta, bool stored, bool vec,
                                                         int active_slot, int n_slot, int prefix_slot, int shift_hi,
                                                         int shift_lo) {
  if (!on(scal, active_slot)) return;
  __shared__ int local[kHistCopies][kBins];
  for (int b = threadIdx.x; b < kHistCopies * kBins; b += blockDim.x) (&local[0][0])[b] = 0;
  __syncthreads();
  int* mine = local[(threadIdx.x >> 5) % kHistCopies];
  const int n = n_slot < 0 ? d : scal[n_slot];
  const unsigned prefix = prefix_slot < 0 ? 0u : static_cast<unsigned>(scal[prefix_slot]);
  const unsigned width = (1u << (shift_hi - shift_lo)) - 1u;
  const int stride = gridDim.x * blockDim.x;
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  auto add = [&](float v) {
    const unsigned key = key_of(v);
    if (prefix_slot < 0 || (key >> shift_hi) == prefix) atomicAdd(&mine[(key >> shift_lo) & width], 1);
  };
  int done = 0;
  if (TK_VEC && vec) {
    const int n4 = n / 4;
    for (int q = tid; q < n4; q += stride) {
      float v[4];
      value4<M>(g, e, h, 4 * q, eta, stored, v);
      for (int j = 0; j < 4; ++j) add(v[j]);
    }
    done = 4 * n4;
  }
  for (int i = done + tid; i < n; i += stride) {
    const float v = value<M>(g, e, h, i, eta, stored);
    if (M == kEF14 && !stored) e[i] = v;
    add(v);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    int c = 0;
    for (int j = 0; j < kHistCopies; ++j) c += local[j][b];
    if (c) atomicAdd(&hist[b], c);
  }
}

// one block of 1024 threads, two bins each, scanned from the top bin down. kGate: whether the one pass's
// candidates hold the answer; kOnePassLevel1: level 1 over what it counted (the buffer takes every entry from the
// bin up, not only the bin's)
__global__ void tk_threshold(const int* hist, int* scal, int k, int cap, int level) {
  const int t = threadIdx.x;
  if (level == kGate) {
    if (t == 0) {
      const int c = scal[S_C];
      const bool hit = c >= k && c <= cap;
      scal[S_HIT] = hit, scal[S_RESCAN] = !hit, scal[S_NC] = c < cap ? c : cap;
    }
    return;
  }
  __shared__ int s[1024];
  const int a = hist[kBins - 1 - 2 * t], b = hist[kBins - 2 - 2 * t];
  s[t] = a + b;
  __syncthreads();
  for (int off = 1; off < 1024; off <<= 1) {
    const int x = t >= off ? s[t - off] : 0;
    __syncthreads();
    s[t] += x;
    __syncthreads();
  }
  const int before = t ? s[t - 1] : 0;  // entries in the bins above this thread's two
  const bool first = level == 1 || level == kOnePassLevel1;
  const int need = first ? k : scal[level == 2 ? S_NEED1 : S_NEED2];
  int bin = -1, above = 0, in_bin = 0;
  if (before < need && before + a >= need) {
    bin = kBins - 1 - 2 * t, above = before, in_bin = a;
  } else if (before + a < need && before + a + b >= need) {
    bin = kBins - 2 - 2 * t, above = before + a, in_bin = b;
  }
  if (bin < 0) return;  // exactly one thread holds the threshold bin
  if (first) {
    const int held = level == 1 ? in_bin : above + in_bin;
    scal[S_B1] = bin, scal[S_ABOVE1] = above, scal[S_NEED1] = need - above, scal[S_N1] = in_bin;
    scal[S_HINT] = bin << 20;  // the bin's lowest key: the next approximate one pass's hint
    scal[S_OVER] = held > cap, scal[S_FITS] = held <= cap;
    if (level == kOnePassLevel1) {
      const bool rescan = scal[S_RESCAN] != 0;
      scal[S_REDO] = rescan && held <= cap;
      if (rescan) scal[S_NC] = held;
    }
  } else if (level == 2) {
    scal[S_B2] = bin, scal[S_ABOVE2] = above, scal[S_NEED2] = need - above, scal[S_P3] = (scal[S_B1] << 11) | bin;
  } else {
    scal[S_T] = (scal[S_B1] << 20) | (scal[S_B2] << 9) | bin;
    scal[S_HINT] = scal[S_T];  // the k-th key: the next exact one pass's hint
    scal[S_A] = k - (need - above);
    scal[S_CAP] = need - above;
  }
}

// One block of 1024 threads: slot S_LO, the lowest key the one pass collects. With a hint (>= 0): kMargin below it
// (exact: the last k-th key), or its bin's lowest key (approximate: a whole bin); else the lowest key of the largest
// bin from which at least `need` of kSample entries spread over the vector lie (all of it when d <= kSample), found
// bit by bit with block counts. Slot S_CAPC: the candidate buffer's capacity.
template <int M, typename G>
__global__ void __launch_bounds__(1024) tk_predict(const G* g, const float* e, const float* h, int* scal,
                                                   const int* hint, int d, float eta, int need, int cap, int approx) {
  const int prev = hint ? *hint : -1;
  if (threadIdx.x == 0) scal[S_CAPC] = cap;
  if (prev >= 0) {
    if (threadIdx.x == 0) scal[S_LO] = approx ? prev >> 20 << 20 : (prev > kMargin ? prev - kMargin : 0);
    return;
  }
  int bins[kSample / 1024];
  for (int j = 0; j < kSample / 1024; ++j) {
    const int i = threadIdx.x + 1024 * j;
    const int pos = d <= kSample ? i : static_cast<int>(static_cast<long long>(i) * d / kSample);
    bins[j] = i < d ? static_cast<int>(key_of(value<M>(g, e, h, pos, eta, false)) >> 20) : -1;
  }
  int b = 0;
  for (int bit = 10; bit >= 0; --bit) {
    const int c = b | (1 << bit);
    int n = 0;
    for (int j = 0; j < kSample / 1024; ++j) n += __syncthreads_count(bins[j] >= c);
    if (n >= need) b = c;
  }
  if (threadIdx.x == 0) scal[S_LO] = b << 20;
}

// exclusive prefix over the blocks before vpid, one predecessor at a time (run by one thread)
__device__ unsigned long long look_back(unsigned long long* lb, int vpid, unsigned long long agg) {
  if (vpid == 0) {
    atomicExch(&lb[0], agg | kFlagP);
    return 0;
  }
  atomicExch(&lb[vpid], agg | kFlagA);
  unsigned long long excl = 0;
  for (int j = vpid - 1; j >= 0;) {
    const unsigned long long w = atomicAdd(&lb[j], 0ull);  // flags and counts in one word: no fence needed
    if (w & kFlagP) {
      excl += w & kVals;
      break;
    }
    if (w & kFlagA) {
      excl += w & kVals;
      --j;
    }
  }
  atomicExch(&lb[vpid], (excl + agg) | kFlagP);
  return excl;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long x) {
  for (int off = 16; off; off >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, off);
  return x;
}

// the same, by a whole warp reading 32 predecessors at once with plain (volatile) loads, as CUB's look-back
__device__ unsigned long long warp_look_back(unsigned long long* lb, int vpid, unsigned long long agg) {
  const int lane = threadIdx.x & 31;
  if (lane == 0) atomicExch(&lb[vpid], agg | (vpid == 0 ? kFlagP : kFlagA));
  if (vpid == 0) return 0;
  const volatile unsigned long long* vlb = lb;
  unsigned long long excl = 0;
  for (int base = vpid - 1;; base -= 32) {
    const int j = base - lane;
    unsigned long long w = j >= 0 ? vlb[j] : kFlagP;  // before block 0: an inclusive prefix of zero
    while (__any_sync(0xFFFFFFFFu, (w & (kFlagA | kFlagP)) == 0)) {
      if ((w & (kFlagA | kFlagP)) == 0) w = vlb[j];
    }
    const unsigned p = __ballot_sync(0xFFFFFFFFu, (w & kFlagP) != 0);
    const int stop = p ? __ffs(p) - 1 : 31;  // the nearest inclusive prefix ends the walk
    excl += warp_sum(lane <= stop ? (w & kVals) : 0ull);
    if (p) break;
  }
  if (lane == 0) atomicExch(&lb[vpid], (excl + agg) | kFlagP);
  return excl;
}

// block-wide exclusive scan of one int per thread; returns the block total through *total
__device__ int block_exclusive_scan(int x, int* total) {
  __shared__ int warp_sums[kSelectThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = x;
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xFFFFFFFFu, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kSelectThreads / 32 ? warp_sums[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xFFFFFFFFu, w, off);
      if (lane >= off) w += y;
    }
    if (lane < kSelectThreads / 32) warp_sums[lane] = w;
  }
  __syncthreads();
  const int warp_base = warp ? warp_sums[warp - 1] : 0;
  *total = warp_sums[kSelectThreads / 32 - 1];
  return warp_base + incl - x;
}

template <int M, typename G>
__global__ void tk_select(const G* g, float* e, const float* h, const int* ci, int* scal, unsigned long long* lb,
                          int* hi_idx, float* hi_val, int* eq_idx, float* eq_val, int d, float eta, bool stored,
                          bool write_e, bool vec, int active_slot, int n_slot, int thr_slot, int shift, int hi_base_slot,
                          int eq_base_slot, int cap_slot, int ctr_slot, bool ge, int count_slot) {
  if (!on(scal, active_slot)) return;
  __shared__ int vpid_s;
  __shared__ unsigned long long excl_s;
  if (threadIdx.x == 0) vpid_s = atomicAdd(&scal[ctr_slot], 1);  // tickets in start order: no deadlock
  __syncthreads();
  const int vpid = vpid_s;
  const int n = n_slot < 0 ? d : scal[n_slot];
  const unsigned thr = static_cast<unsigned>(scal[thr_slot]);
  const int first = vpid * (kSelectThreads * kItems) + threadIdx.x * kItems;
  float v[kItems];
  unsigned char cls[kItems];  // 0 none, 1 above, 2 equal
  int c = 0;                  // above count << 16 | equal count
  const bool whole = TK_VEC && vec && first + kItems <= n;
  if (whole) {  // two 16-byte loads per operand (first is a multiple of 8)
    #pragma unroll
    for (int j = 0; j < kItems; j += 4) {
      if constexpr (M == kEControl) {  // v and the new e from one load of g, h and e
        float a[4], b[4], c4[4], o[4];
        load4(g, first + j, a), load4(h, first + j, b), load4(e, first + j, c4);
        for (int q = 0; q < 4; ++q) {
          const float t = __fsub_rn(a[q], b[q]);
          v[j + q] = __fadd_rn(__fmul_rn(c4[q], eta), t);
          o[q] = __fadd_rn(c4[q], t);
        }
        if (write_e) *reinterpret_cast<float4*>(e + first + j) = make_float4(o[0], o[1], o[2], o[3]);
      } else {
        value4<M>(g, e, h, first + j, eta, stored, v + j);  // EF14 not stored: stores v in e
      }
    }
  }
  #pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = first + j;
    cls[j] = 0;
    if (i < n) {
      if (!whole) {
        v[j] = value<M>(g, e, h, i, eta, stored);
        if (M == kEF14 && !stored) e[i] = v[j];
        if (M == kEControl && write_e) e[i] = __fadd_rn(e[i], __fsub_rn(to_f(g[i]), h[i]));
      }
      const unsigned b = key_of(v[j]) >> shift;
      cls[j] = ge ? (b >= thr ? 2 : 0) : (b > thr ? 1 : (b == thr ? 2 : 0));
      c += cls[j] == 1 ? (1 << 16) : (cls[j] == 2 ? 1 : 0);
    }
  }
  int total = 0;
  const int mine = block_exclusive_scan(c, &total);
  if (count_slot >= 0 && threadIdx.x == 0) atomicAdd(&scal[count_slot], total & 0xFFFF);
  const unsigned long long agg =
      (static_cast<unsigned long long>(total >> 16) << 30) | static_cast<unsigned long long>(total & 0xFFFF);
  if (TK_WARP_LOOKBACK) {
    if (threadIdx.x < 32) {
      const unsigned long long x = warp_look_back(lb, vpid, agg);
      if (threadIdx.x == 0) excl_s = x;
    }
  } else if (threadIdx.x == 0) {
    excl_s = look_back(lb, vpid, agg);
  }
  __syncthreads();
  const long long pos_hi0 = scal[hi_base_slot] + static_cast<long long>(excl_s >> 30) + (mine >> 16);
  long long pos_eq = static_cast<long long>(excl_s & ((1ull << 30) - 1)) + (mine & 0xFFFF);
  const long long cap = scal[cap_slot], eq_base = scal[eq_base_slot];
  long long pos_hi = pos_hi0;
  #pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (cls[j] == 0) continue;
    const int idx = M == kCand ? ci[first + j] : first + j;
    if (cls[j] == 1) {
      hi_idx[pos_hi] = idx, hi_val[pos_hi] = v[j];
      ++pos_hi;
    } else {
      if (pos_eq < cap) eq_idx[eq_base + pos_eq] = idx, eq_val[eq_base + pos_eq] = v[j];
      ++pos_eq;
    }
  }
}

__global__ void tk_scatter_add_kernel(float* out, const float* val, const int* idx, float scale, int k) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < k) out[idx[j]] = __fadd_rn(out[idx[j]], __fmul_rn(val[j], scale));
}

// the state at the k sent entries (indices unique): what _select.run does with index_fill_/index_add_
__global__ void tk_post_kernel(int mode, float* e, float* h, const int* idx, const float* val, int k) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int i = idx[j];
  if (mode == kEF14) {
    e[i] = 0.0f;
  } else if (mode == kEF21) {
    h[i] = __fadd_rn(h[i], val[j]);
  } else if (mode == kEControl) {
    e[i] = __fsub_rn(e[i], val[j]);
    h[i] = __fadd_rn(h[i], val[j]);
  }
}

// A decode's first pass over out: zeros (zero != 0) or out as it is, and NaN everywhere when the float64 checks
// sum to a non-finite value (a worker's message held NaN or Inf). Each thread sums the few checks itself.
__global__ void tk_prepare_kernel(float* out, const double* checks, int n_checks, long long stride, long long d,
                                  int zero) {
  double p = 0.0;
  for (int i = 0; i < n_checks; ++i) p += checks[i * stride];
  const bool bad = !isfinite(p);
  if (!zero && !bad) return;
  const float v = bad ? __int_as_float(0x7fc00000) : 0.0f;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; j < d; j += step) out[j] = v;
}

template <typename G, typename F>
cudaError_t by_mode(int mode, F&& f) {
  switch (mode) {
    case kTopK: f(std::integral_constant<int, kTopK>{}, static_cast<G*>(nullptr)); break;
    case kEF14: f(std::integral_constant<int, kEF14>{}, static_cast<G*>(nullptr)); break;
    case kEF21: f(std::integral_constant<int, kEF21>{}, static_cast<G*>(nullptr)); break;
    case kEControl: f(std::integral_constant<int, kEControl>{}, static_cast<G*>(nullptr)); break;
    case kCand: f(std::integral_constant<int, kCand>{}, static_cast<G*>(nullptr)); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch(int mode, int gdtype, F&& f) {
  switch (gdtype) {
    case kF32: return by_mode<float>(mode, f);
    case kBF16: return by_mode<__nv_bfloat16>(mode, f);
    case kF16: return by_mode<__half>(mode, f);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int tk_hist(int mode, int gdtype, const void* g, float* e, const float* h, int* hist, const int* scal,
                       int d, float eta, int stored, int vec, int active_slot, int n_slot, int prefix_slot, int shift_hi,
                       int shift_lo, int grid, cudaStream_t stream) {
  return dispatch(mode, gdtype, [&](auto m, auto* gt) {
    using G = std::remove_pointer_t<decltype(gt)>;
    tk_hist<decltype(m)::value, G><<<grid, kHistThreads, 0, stream>>>(static_cast<const G*>(g), e, h, hist, scal, d,
                                                                       eta, stored, vec, active_slot, n_slot, prefix_slot, shift_hi,
                                                              shift_lo);
  });
}

extern "C" int tk_threshold(const int* hist, int* scal, int k, int cap, int level, cudaStream_t stream) {
  tk_threshold<<<1, 1024, 0, stream>>>(hist, scal, k, cap, level);
  return cudaGetLastError();
}

extern "C" int tk_select(int mode, int gdtype, const void* g, float* e, const float* h, const int* ci, int* scal,
                         unsigned long long* lb, int* hi_idx, float* hi_val, int* eq_idx, float* eq_val, int d,
                         float eta, int stored, int write_e, int vec, int active_slot, int n_slot, int thr_slot, int shift,
                         int hi_base_slot, int eq_base_slot, int cap_slot, int ctr_slot, int ge, int count_slot, int grid,
                         cudaStream_t stream) {
  return dispatch(mode, gdtype, [&](auto m, auto* gt) {
    using G = std::remove_pointer_t<decltype(gt)>;
    tk_select<decltype(m)::value, G><<<grid, kSelectThreads, 0, stream>>>(
        static_cast<const G*>(g), e, h, ci, scal, lb, hi_idx, hi_val, eq_idx, eq_val, d, eta, stored, write_e, vec,
        active_slot, n_slot, thr_slot, shift, hi_base_slot, eq_base_slot, cap_slot, ctr_slot, ge, count_slot);
  });
}

extern "C" int tk_predict(int mode, int gdtype, const void* g, const float* e, const float* h, int* scal,
                          const int* hint, int d, float eta, int need, int cap, int approx, cudaStream_t stream) {
  return dispatch(mode, gdtype, [&](auto m, auto* gt) {
    using G = std::remove_pointer_t<decltype(gt)>;
    tk_predict<decltype(m)::value, G><<<1, 1024, 0, stream>>>(static_cast<const G*>(g), e, h, scal, hint, d, eta,
                                                              need, cap, approx);
  });
}

extern "C" int tk_scatter_add(float* out, const float* val, const int* idx, float scale, int k, cudaStream_t stream) {
  const int threads = 256;
  const int blocks = (k + threads - 1) / threads;
  if (blocks > 0) tk_scatter_add_kernel<<<blocks, threads, 0, stream>>>(out, val, idx, scale, k);
  return cudaGetLastError();
}

extern "C" int tk_prepare(float* out, const double* checks, int n_checks, long long stride, long long d, int zero,
                          cudaStream_t stream) {
  const int threads = 256;
  const long long want = (d + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 4096 ? (want > 0 ? want : 1) : 4096);
  tk_prepare_kernel<<<blocks, threads, 0, stream>>>(out, checks, n_checks, stride, d, zero);
  return cudaGetLastError();
}

// A round's whole decode in one host call (what torchkit.ops.accumulate_ asks for): the first pass over out (zeros,
// NaN when the float64 checks sum to a non-finite value; skipped when neither is asked for), then each worker row's
// scatter-add in row order, one launch each (deterministic). Row w's values and indices start w * the row stride
// after the first row's; scales is a host array of n_rows floats. Refused before any launch (1,
// cudaErrorInvalidValue): a negative count or stride, a missing pointer that a launch would use.
extern "C" int tk_accumulate(float* out, const float* val, long long val_stride, const int* idx, long long idx_stride,
                             const float* scales, int n_rows, int k, const double* checks, int n_checks,
                             long long check_stride, long long d, int zero, cudaStream_t stream) {
  if (n_rows < 0 || k < 0 || n_checks < 0 || d < 0 || val_stride < 0 || idx_stride < 0 || check_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (out == nullptr || (n_checks > 0 && checks == nullptr)) return cudaErrorInvalidValue;
  if (k > 0 && n_rows > 0 && (val == nullptr || idx == nullptr || scales == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (zero || n_checks > 0) {
    const int rc = tk_prepare(out, checks, n_checks, check_stride, d, zero, stream);
    if (rc) return rc;
  }
  for (int w = 0; k > 0 && w < n_rows; ++w) {
    const int rc = tk_scatter_add(out, val + w * val_stride, idx + w * idx_stride, scales[w], k, stream);
    if (rc) return rc;
  }
  return 0;
}

// ---- tk_accumulate_tiled: a round's decode in two launches whatever the number of rows (docs/kernels.md 6.1; the
// Triton form is torchkit/ops/_triton/decode.py, the same design with the tile in L2 instead of shared memory).
//   tk_runs_kernel, grid (spans, rows): the descents idx[i + 1] < idx[i] of row w among i in span s, counted, the
//     first kMaxD positions where a new run starts kept in order: table[(w * spans + s) * 4] = {count, p1, p2, p3}.
//     Every block writes its own slot: nothing to clear.
//   tk_tiled_kernel, a persistent grid: each block owns consecutive tiles of kTile entries of out. It takes each
//     row's runs from the table (at most kMaxR; a row in more is scanned whole), finds by binary search where each
//     run reaches its first entry, then per tile: the first pass into shared memory (out's values, zeros or NaN),
//     every row's entries in the tile added in rank order (a barrier between rows; a row's indices are unique, so
//     the adds of one row never collide), and the tile written back. __fadd_rn(cur, __fmul_rn(val, scale)), as
//     tk_scatter_add_kernel: equal bit for bit to the per-row decode. When a row must be scanned, the block takes its
//     whole range at once, in global memory (the tile would not fit), reading every row whole once.
namespace {
constexpr int kMaxR = 4;              // runs per row found by binary search (the exact GPU output has at most 3)
constexpr int kMaxD = kMaxR - 1;
constexpr int kTile = 4096;           // entries of out a tile holds (16 KB of shared memory)
constexpr int kTiledThreads = 256;
constexpr int kMaxTiledRows = 64;     // rows the tiled decode takes (more: the per-row decode)
constexpr int kRunsThreads = 256;

struct RowScales {
  float v[kMaxTiledRows];
};

__global__ void __launch_bounds__(kRunsThreads) tk_runs_kernel(const int* idx, long long idx_stride, int k, int span,
                                                                 int* table, int spans) {
  const int s = blockIdx.x, w = blockIdx.y;
  const int* row = idx + w * idx_stride;
  const long long lo = static_cast<long long>(s) * span;
  const long long hi = min(lo + span, static_cast<long long>(k) - 1);  // pairs (i, i + 1), i + 1 < k
  // each thread a contiguous piece of the span, in order: its count and its first kMaxD positions
  const long long per = (hi - lo + kRunsThreads - 1) / kRunsThreads;
  const long long a = lo + threadIdx.x * per, b = min(a + per, hi);
  int count = 0, first[kMaxD] = {0, 0, 0};
  for (long long i = a; i < b; ++i) {
    if (row[i + 1] < row[i]) {
      if (count < kMaxD) first[count] = static_cast<int>(i + 1);
      ++count;
    }
  }
  __shared__ int counts[kRunsThreads];
  __shared__ int pos[kRunsThreads][kMaxD];
  counts[threadIdx.x] = count;
  for (int j = 0; j < kMaxD; ++j) pos[threadIdx.x][j] = first[j];
  __syncthreads();
  if (threadIdx.x == 0) {  // the threads' pieces in index order
    int total = 0, kept[kMaxD] = {0, 0, 0};
    for (int t = 0; t < kRunsThreads; ++t) {
      for (int j = 0; j < counts[t] && j < kMaxD; ++j) {
        if (total + j < kMaxD) kept[total + j] = pos[t][j];
      }
      total += counts[t];
    }
    int* out = table + (static_cast<long long>(w) * spans + s) * kMaxR;
    out[0] = total;
    for (int j = 0; j < kMaxD; ++j) out[1 + j] = kept[j];
  }
}

__global__ void __launch_bounds__(kTiledThreads, 1) tk_tiled_kernel(float* out, const float* val, long long val_stride,
                                                                  const int* idx, long long idx_stride,
                                                                  const __grid_constant__ RowScales scales,
                                                                  int n, int k, long long d, const int* table, int spans,
                                                                  const double* checks, int n_checks,
                                                                  long long check_stride, int zero,
                                                                  long long tiles_per_block) {
  __shared__ float tile[kTile];
  __shared__ long long pos[kMaxTiledRows * kMaxR], end[kMaxTiledRows * kMaxR];
  __shared__ int any_scan;
  const int tid = threadIdx.x;
  if (tid == 0) any_scan = 0;
  __syncthreads();
  const long long first = static_cast<long long>(blockIdx.x) * tiles_per_block * kTile;
  const long long last = min(first + tiles_per_block * kTile, d);
  if (tid < n) {  // thread w: row w's runs from the table, and where each reaches this block's first entry
    const int* row = table + static_cast<long long>(tid) * spans * kMaxR;
    int total = 0, b0 = 0, b1 = 0, b2 = 0;  // where runs 1, 2, 3 start (scalars: no local memory)
    for (int s = 0; s < spans; ++s) {
      const int c = row[s * kMaxR];
#pragma unroll
      for (int j = 0; j < kMaxD; ++j) {
        const int at = total + j;
        if (j < c && at < kMaxD) {
          const int v = row[s * kMaxR + 1 + j];
          b0 = at == 0 ? v : b0;
          b1 = at == 1 ? v : b1;
          b2 = at == 2 ? v : b2;
        }
      }
      total += c;
    }
    const bool sc = total > kMaxD;  // more than kMaxR runs: scanned whole, as run 0
    if (sc) atomicOr(&any_scan, 1);
    const int* ir = idx + tid * idx_stride;
#pragma unroll
    for (int r = 0; r < kMaxR; ++r) {
      const long long from = r == 0 ? 0 : (r == 1 ? b0 : (r == 2 ? b1 : b2));
      const long long to = r == 0 ? b0 : (r == 1 ? b1 : b2);
      long long st = sc ? (r == 0 ? 0 : k) : (r > total ? k : from);
      const long long en = sc ? k : (r > total ? k : (r < total ? to : k));
      long long hi = en;
      while (!sc && st < hi) {  // the first entry >= first
        const long long mid = (st + hi) / 2;
        if (ir[mid] < first) st = mid + 1;
        else hi = mid;
      }
      pos[tid * kMaxR + r] = st;
      end[tid * kMaxR + r] = en;
    }
  }
  double p = 0.0;
  for (int i = 0; i < n_checks; ++i) p += checks[i * check_stride];
  const bool bad = !isfinite(p);
  const float nan = __int_as_float(0x7fc00000);
  __syncthreads();
  if (any_scan) {  // a row in many runs: this block's whole range at once, in global memory
    for (long long j = first + tid; j < last; j += kTiledThreads) {
      if (bad) out[j] = nan;
      else if (zero) out[j] = 0.0f;
    }
    __syncthreads();
    for (int w = 0; w < n; ++w) {
      const float* vr = val + w * val_stride;
      const int* ir = idx + w * idx_stride;
      for (int r = 0; r < kMaxR; ++r) {
        for (long long j = pos[w * kMaxR + r] + tid; j < end[w * kMaxR + r]; j += kTiledThreads) {
          const long long i = ir[j];
          if (i >= first && i < last) out[i] = __fadd_rn(out[i], __fmul_rn(vr[j], scales.v[w]));
        }
      }
      __threadfence_block();
      __syncthreads();
    }
    return;
  }
  for (long long a = first; a < last; a += kTile) {
    const long long b = min(a + kTile, last);
    for (long long j = a + tid; j < b; j += kTiledThreads) tile[j - a] = bad ? nan : (zero ? 0.0f : out[j]);
    __syncthreads();
    for (int w = 0; w < n; ++w) {
      const float* vr = val + w * val_stride;
      const int* ir = idx + w * idx_stride;
      const float sw = scales.v[w];
      for (int r = 0; r < kMaxR; ++r) {
        long long q = pos[w * kMaxR + r];
        const long long e = end[w * kMaxR + r];
        while (q < e) {  // uniform across the block: the count of each chunk is the block's
          const long long j = q + tid;
          long long i = j < e ? ir[j] : b;
          const bool in = i < b;  // a sorted run: the entries below the tile's end come first
          if (in) tile[i - a] = __fadd_rn(tile[i - a], __fmul_rn(vr[j], sw));
          const int taken = __syncthreads_count(in);
          q += taken;
          if (taken < kTiledThreads) break;
        }
        if (tid == 0) pos[w * kMaxR + r] = q;
      }
      __syncthreads();  // this row's adds before the next row's
    }
    for (long long j = a + tid; j < b; j += kTiledThreads) out[j] = tile[j - a];
    __syncthreads();
  }
}
}  // namespace

// The tiled decode of n_rows (<= 64) rows; `table` holds n_rows * spans * 4 ints of the caller's workspace, `span`
// the pairs each block of the first launch reads; scales a host array of n_rows floats (passed by value: nothing to
// copy, capturable in a CUDA graph). Refused before any launch (cudaErrorInvalidValue): as tk_accumulate, and more
// than 64 rows, a span below 1 or spans that do not cover the row.
extern "C" int tk_accumulate_tiled(float* out, const float* val, long long val_stride, const int* idx,
                                   long long idx_stride, const float* scales, int n_rows, int k, const double* checks,
                                   int n_checks, long long check_stride, long long d, int zero, int* table, int span,
                                   int spans, int blocks, cudaStream_t stream) {
  if (n_rows < 1 || n_rows > kMaxTiledRows || k < 1 || n_checks < 0 || d < 1 || val_stride < 0 || idx_stride < 0 ||
      check_stride < 0 || span < 1 || spans < 1 || static_cast<long long>(span) * spans < k - 1 || blocks < 1) {
    return cudaErrorInvalidValue;
  }
  if (out == nullptr || val == nullptr || idx == nullptr || scales == nullptr || table == nullptr ||
      (n_checks > 0 && checks == nullptr)) {
    return cudaErrorInvalidValue;
  }
  RowScales rs{};
  for (int w = 0; w < n_rows; ++w) rs.v[w] = scales[w];
  tk_runs_kernel<<<dim3(spans, n_rows), kRunsThreads, 0, stream>>>(idx, idx_stride, k, span, table, spans);
  cudaError_t rc = cudaGetLastError();
  if (rc) return rc;
  const long long tiles = (d + kTile - 1) / kTile;
  const long long per = (tiles + blocks - 1) / blocks;
  const int grid = static_cast<int>((tiles + per - 1) / per);
  tk_tiled_kernel<<<grid, kTiledThreads, 0, stream>>>(out, val, val_stride, idx, idx_stride, rs, n_rows, k, d, table,
                                                      spans, checks, n_checks, check_stride, zero, per);
  return cudaGetLastError();
}

extern "C" int tk_tiled_rows() { return kMaxTiledRows; }

extern "C" int tk_block_elems() { return kSelectThreads * kItems; }

// ---- tk_step: the driver of torchkit/ops/_select.py (run) in C++, slot for slot
namespace {
constexpr int kScalars = 32;
constexpr int kAlways = -1;
constexpr long long kHead = (3 * kBins + kScalars) / 2;  // int64 words: three histograms and the scalars

struct Layout {  // the workspace, in int64 words: [head | look-back words] zeroed, then the candidates
  int cap, n_lb, n_lbc, n_vec;
  long long zeroed, cand_val, cand_idx, words;
};

int lookback_slots(long long n) { return static_cast<int>(n < 1 ? 1 : (n + kSelectThreads * kItems - 1) / (kSelectThreads * kItems)); }

Layout layout(int d, int k, int approx, int one_pass) {
  Layout l;
  const long long want = 4ll * k + 4096;  // _select.capacity
  l.cap = approx && !one_pass ? 0 : static_cast<int>(want < d ? want : d);
  l.n_lb = lookback_slots(d);
  l.n_lbc = l.cap ? lookback_slots(l.cap) : 0;
  l.n_vec = one_pass ? 3 : approx ? 1 : 2;  // select passes over the vector, each with its look-back words
  l.zeroed = kHead + static_cast<long long>(l.n_vec) * l.n_lb + l.n_lbc;
  const long long cand_words = (l.cap + 3ll) / 4 * 2;  // cap 4-byte entries, 16-byte aligned
  l.cand_val = (l.zeroed + 1) / 2 * 2;
  l.cand_idx = l.cand_val + cand_words;
  l.words = l.cand_idx + cand_words;
  return l;
}

// _select.sample_need: the sampled rank whose bin a cold one pass predicts (k's share plus four deviations and one)
int sample_need(int n, int k) {
  if (n <= kSample) return k;
  const double mean = static_cast<double>(k) * kSample / n;
  const double want = std::ceil(mean + 4.0 * std::sqrt(mean) + 1.0);
  return want < kSample ? static_cast<int>(want) : kSample;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Step {
  int mode, gdtype, sms;
  const void* g;
  float *e, *h, eta;
  int* scal;
  cudaStream_t stream;

  int hist(int m, bool stored, float* e_or_cand, int* hist, int n, int active, int n_slot, int prefix, int shift_hi,
           int shift_lo) const {
    const long long want = (n + 511) / 512;
    const int grid = static_cast<int>(want < 4ll * sms ? (want > 0 ? want : 1) : 4ll * sms);
    const int vec = aligned16(g) && aligned16(e_or_cand) && aligned16(h);
    return tk_hist(m, gdtype, g, e_or_cand, h, hist, scal, n, eta, stored, vec, active, n_slot, prefix, shift_hi,
                   shift_lo, grid, stream);
  }
  // stored: EF14's v is in e already; ge: the one pass's compaction from a bin up, counted in slot `count`
  int select(int m, float* e_or_cand, const int* ci, unsigned long long* lb, int* hi_idx, float* hi_val, int* eq_idx,
             float* eq_val, int n, bool write_e, int active, int n_slot, int thr, int shift, int hi_base, int eq_base,
             int cap, int ctr, bool stored = true, bool ge = false, int count = kAlways) const {
    const int vec = aligned16(g) && aligned16(e_or_cand) && aligned16(h);
    return tk_select(m, gdtype, g, e_or_cand, h, ci, scal, lb, hi_idx, hi_val, eq_idx, eq_val, n, eta,
                     m == kEF14 && stored, write_e, vec, active, n_slot, thr, shift, hi_base, eq_base, cap, ctr, ge,
                     count, lookback_slots(n), stream);
  }
};
}  // namespace

extern "C" int tk_sample_need(int n, int k) { return sample_need(n, k); }

// int64 words of workspace tk_step needs for (d, k, approx, one_pass)
extern "C" long long tk_step_words(int d, int k, int approx, int one_pass) {
  return layout(d, k, approx, one_pass).words;
}

// One fused step (mode kTopK/kEF14/kEF21/kEControl) on d < 2^30 entries: writes the k selected (index, value)
// pairs to out_idx/out_val and updates e/h in place. one_pass (not EControl): predict the lowest key to collect
// (from *hint when hint is given and >= 0; *hint is then set for the next step: _select.hint_of) and read the vector
// once when the prediction holds. ws: tk_step_words(d, k, approx, one_pass) int64 words of device memory, used only on
// this stream (zeroed here; nothing is read back on the host).
extern "C" int tk_step(int mode, int gdtype, const void* g, float* e, float* h, float eta, int d, int k, int approx,
                       int one_pass, int* hint, long long* ws, int* out_idx, float* out_val, int sms,
                       cudaStream_t stream) {
  if (mode < kTopK || mode > kEControl || gdtype < kF32 || gdtype > kF16 || d < 1 || k < 1 || k > d || !g ||
      ((mode == kEF14 || mode == kEControl) && !e) || ((mode == kEF21 || mode == kEControl) && !h) ||
      (one_pass && mode == kEControl))
    return cudaErrorInvalidValue;
  const Layout l = layout(d, k, approx, one_pass);
  cudaError_t rc = cudaMemsetAsync(ws, 0, l.zeroed * sizeof(long long), stream);
  if (rc != cudaSuccess) return rc;
  int* i32 = reinterpret_cast<int*>(ws);
  int* hists[3] = {i32, i32 + kBins, i32 + 2 * kBins};
  auto* lbs = reinterpret_cast<unsigned long long*>(ws + kHead);
  unsigned long long* lb_cand = lbs + static_cast<long long>(l.n_vec) * l.n_lb;
  auto* cand_val = reinterpret_cast<float*>(ws + l.cand_val);
  auto* cand_idx = reinterpret_cast<int*>(ws + l.cand_idx);
  const Step st{mode, gdtype, sms, g, e, h, eta, i32 + 3 * kBins, stream};
#define TK_TRY(launch)        \
  do {                         \
    const int rc_ = (launch);  \
    if (rc_) return rc_;       \
  } while (0)
  // levels 2 and 3 within the level-1 bin: from the candidates (n_slot of them) or the vector, re-read; one runs
  auto levels_2_3 = [&](int n_slot) -> int {
    const int levels[2][4] = {{2, 20, 9, S_B1}, {3, 9, 0, S_P3}};
    for (const auto& lv : levels) {
      int* hist = hists[lv[0] - 1];
      TK_TRY(st.hist(mode, true, e, hist, d, S_OVER, kAlways, lv[3], lv[1], lv[2]));
      TK_TRY(st.hist(kCand, true, cand_val, hist, l.cap, S_FITS, n_slot, lv[3], lv[1], lv[2]));
      TK_TRY(tk_threshold(hist, st.scal, k, l.cap, lv[0], stream));
    }
    return 0;
  };
  if (one_pass) {
    TK_TRY(tk_predict(mode, gdtype, g, e, h, st.scal, hint, d, eta, sample_need(d, k), l.cap, approx, stream));
    TK_TRY(st.select(mode, e, nullptr, lbs, cand_idx, cand_val, cand_idx, cand_val, d, true, kAlways, kAlways, S_LO,
                     0, S_ZERO, S_ZERO, S_CAPC, S_CTR1, false, true, S_C));
    TK_TRY(tk_threshold(hists[0], st.scal, k, l.cap, kGate, stream));
    TK_TRY(st.hist(kCand, true, cand_val, hists[0], l.cap, S_HIT, S_NC, kAlways, 31, 20));
    TK_TRY(st.hist(mode, true, e, hists[0], d, S_RESCAN, kAlways, kAlways, 31, 20));
    TK_TRY(tk_threshold(hists[0], st.scal, k, l.cap, kOnePassLevel1, stream));
    TK_TRY(st.select(mode, e, nullptr, lbs + l.n_lb, cand_idx, cand_val, cand_idx, cand_val, d, true, S_REDO, kAlways,
                     S_B1, 20, S_ZERO, S_ZERO, S_CAPC, S_CTR2, true, true));
    unsigned long long* lb_vec = lbs + 2ll * l.n_lb;
    if (approx) {  // the threshold bin's lowest-indexed entries fill the remaining slots
      TK_TRY(st.select(mode, e, nullptr, lb_vec, out_idx, out_val, out_idx, out_val, d, true, S_OVER, kAlways, S_B1,
                       20, S_ZERO, S_ABOVE1, S_NEED1, S_CTR3));
      TK_TRY(st.select(kCand, cand_val, cand_idx, lb_cand, out_idx, out_val, out_idx, out_val, l.cap, false, S_FITS,
                       S_NC, S_B1, 20, S_ZERO, S_ABOVE1, S_NEED1, S_CTR4));
    } else {
      TK_TRY(levels_2_3(S_NC));
      TK_TRY(st.select(mode, e, nullptr, lb_vec, out_idx, out_val, out_idx, out_val, d, true, S_OVER, kAlways, S_T, 0,
                       S_ZERO, S_A, S_CAP, S_CTR3));
      TK_TRY(st.select(kCand, cand_val, cand_idx, lb_cand, out_idx, out_val, out_idx, out_val, l.cap, false, S_FITS,
                       S_NC, S_T, 0, S_ZERO, S_A, S_CAP, S_CTR4));
    }
    if (hint) {  // the next step's prediction
      rc = cudaMemcpyAsync(hint, st.scal + S_HINT, sizeof(int), cudaMemcpyDeviceToDevice, stream);
      if (rc != cudaSuccess) return rc;
    }
  } else {
    TK_TRY(st.hist(mode, false, e, hists[0], d, kAlways, kAlways, kAlways, 31, 20));
    TK_TRY(tk_threshold(hists[0], st.scal, k, l.cap, 1, stream));
    if (approx) {  // the threshold bin's lowest-indexed entries fill the remaining slots
      TK_TRY(st.select(mode, e, nullptr, lbs, out_idx, out_val, out_idx, out_val, d, true, kAlways, kAlways, S_B1, 20,
                       S_ZERO, S_ABOVE1, S_NEED1, S_CTR1));
    } else {
      TK_TRY(st.select(mode, e, nullptr, lbs, out_idx, out_val, cand_idx, cand_val, d, true, S_FITS, kAlways, S_B1, 20,
                       S_ZERO, S_ZERO, S_N1, S_CTR1));
      TK_TRY(levels_2_3(S_N1));
      TK_TRY(st.select(mode, e, nullptr, lbs + l.n_lb, out_idx, out_val, out_idx, out_val, d, true, S_OVER, kAlways,
                       S_T, 0, S_ZERO, S_A, S_CAP, S_CTR2));
      TK_TRY(st.select(kCand, cand_val, cand_idx, lb_cand, out_idx, out_val, out_idx, out_val, l.cap, false, S_FITS,
                       S_N1, S_T, 0, S_ABOVE1, S_A, S_CAP, S_CTR3));
    }
  }
  if (mode != kTopK) tk_post_kernel<<<(k + 255) / 256, 256, 0, stream>>>(mode, e, h, out_idx, out_val, k);
  return cudaGetLastError();
}
#undef TK_TRY
