// torchkit CUDA kernels: fused top-k + error-feedback step (the Triton kernels' design, in CUDA C++).
//
// No torch headers: plain launchers over raw pointers, so the file compiles with nvcc alone
// (CI checks that it does; it has not run on a GPU yet, see benchmarks/README.md).
//   tk_hist:   v per element (EF14 stores v in e), 2048-bin shared-memory histogram of |v|
//              (8 exponent + 3 mantissa bits), one global atomicAdd per bin and block;
//   tk_select: entries above the threshold bin -> output, inside it -> candidates, compacted with
//              warp-aggregated tickets (one atomicAdd per warp); EControl writes e <- e + g - h;
//   tk_scatter_add: out[idx] += scale * val for one worker (indices unique within a worker).
// 64-bit offsets throughout (d up to 1e9 and beyond).
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kBins = 2048;
enum Mode { kTopK = 0, kEF14 = 1, kEF21 = 2, kEControl = 3 };

__device__ __forceinline__ int bin_of(float v) { return (__float_as_uint(v) & 0x7FFFFFFFu) >> 20; }

template <int M>
__device__ __forceinline__ float value(const float* g, const float* e, const float* h, int64_t i, float eta) {
  if (M == kTopK) return g[i];
  if (M == kEF14) return e[i] + g[i];
  if (M == kEF21) return g[i] - h[i];
  const float t = g[i] - h[i];
  return __fadd_rn(__fmul_rn(e[i], eta), t);  // no FMA contraction: same rounding as the CPU reference
}

template <int M>
__global__ void tk_hist(const float* __restrict__ g, float* e, const float* __restrict__ h, unsigned int* hist,
                        int64_t d, float eta) {
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < d; i += stride) {
    const float v = value<M>(g, e, h, i, eta);
    if (M == kEF14) e[i] = v;
    atomicAdd(&local[bin_of(v)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], local[b]);
}

template <typename I>
__device__ __forceinline__ void emit(bool take, int64_t i, float v, I* idx, float* val, unsigned int* ticket) {
  const unsigned int mask = __ballot_sync(0xFFFFFFFFu, take);
  if (!mask) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(mask) - 1;
  unsigned int base = 0;
  if (lane == leader) base = atomicAdd(ticket, static_cast<unsigned int>(__popc(mask)));
  base = __shfl_sync(0xFFFFFFFFu, base, leader);
  if (take) {
    const unsigned int pos = base + __popc(mask & ((1u << lane) - 1u));
    idx[pos] = static_cast<I>(i);
    val[pos] = v;
  }
}

template <int M, typename I>
__global__ void tk_select(const float* __restrict__ g, float* e, const float* __restrict__ h, int thr, I* out_idx,
                          float* out_val, I* cand_idx, float* cand_val, unsigned int* tickets, int64_t d, float eta) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // every lane of a warp runs the same number of iterations, so the ballots see full warps
  const int64_t warp_start = start - (threadIdx.x & 31);
  for (int64_t base = warp_start; base < d; base += stride) {
    const int64_t i = base + (threadIdx.x & 31);
    const bool live = i < d;
    float v = 0.0f;
    if (live) {
      v = (M == kEF14) ? e[i] : value<M>(g, e, h, i, eta);
      if (M == kEControl) e[i] = e[i] + (g[i] - h[i]);
    }
    const int b = live ? bin_of(v) : -1;
    emit(b > thr, i, v, out_idx, out_val, &tickets[0]);
    emit(b == thr, i, v, cand_idx, cand_val, &tickets[1]);
  }
}

__global__ void tk_scatter_add(float* out, const float* val, const int32_t* idx, float scale, int64_t k) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < k) out[idx[j]] = out[idx[j]] + val[j] * scale;
}

template <int M>
cudaError_t launch(const float* g, float* e, const float* h, int64_t d, float eta, unsigned int* hist, int thr,
                   int32_t* out_idx, float* out_val, int32_t* cand_idx, float* cand_val, unsigned int* tickets,
                   int phase, cudaStream_t stream) {
  const int threads = 256;
  int sms = 132;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t want = (d + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 4LL * sms ? want : 4LL * sms);  // persistent grid
  if (phase == 0)
    tk_hist<M><<<blocks, threads, 0, stream>>>(g, e, h, hist, d, eta);
  else
    tk_select<M, int32_t><<<blocks, threads, 0, stream>>>(g, e, h, thr, out_idx, out_val, cand_idx, cand_val,
                                                          tickets, d, eta);
  return cudaGetLastError();
}

}  // namespace

// phase 0: histogram pass; phase 1: select pass. mode: 0 top-k, 1 EF14, 2 EF21, 3 EControl.
extern "C" cudaError_t torchkit_ef_pass(int mode, int phase, const float* g, float* e, const float* h, int64_t d,
                                        float eta, unsigned int* hist, int thr, int32_t* out_idx, float* out_val,
                                        int32_t* cand_idx, float* cand_val, unsigned int* tickets,
                                        cudaStream_t stream) {
  switch (mode) {
    case kTopK: return launch<kTopK>(g, e, h, d, eta, hist, thr, out_idx, out_val, cand_idx, cand_val, tickets, phase, stream);
    case kEF14: return launch<kEF14>(g, e, h, d, eta, hist, thr, out_idx, out_val, cand_idx, cand_val, tickets, phase, stream);
    case kEF21: return launch<kEF21>(g, e, h, d, eta, hist, thr, out_idx, out_val, cand_idx, cand_val, tickets, phase, stream);
    case kEControl: return launch<kEControl>(g, e, h, d, eta, hist, thr, out_idx, out_val, cand_idx, cand_val, tickets, phase, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t torchkit_scatter_add(float* out, const float* val, const int32_t* idx, float scale, int64_t k,
                                            cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = (k + threads - 1) / threads;
  if (blocks > 0) tk_scatter_add<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(out, val, idx, scale, k);
  return cudaGetLastError();
}
