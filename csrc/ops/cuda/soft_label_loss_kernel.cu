// CUDA kernel of hello_fast::soft_label_loss(_with_grad): one block per row. Pass 1 reduces the row's max and
// sums of exponentials (s/T, t/T and s); pass 2 accumulates the loss terms and writes d loss / d s.
// The Python op checks the labels and raises before launching; the kernel still never reads outside its inputs:
// a row whose hard label or partner is out of range (reachable only from C++) gets NaN terms and gradient.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <cfloat>

#include "launch.h"

namespace hello_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Block-wide reductions of one float (all threads get the result).
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

__device__ float block_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : -FLT_MAX;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

template <typename T>
__device__ float row_lse(const T* x, int64_t C, float k, float* shared) {
  float m = -FLT_MAX;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) m = fmaxf(m, to_f(x[c]) * k);
  m = block_max(m, shared);
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) s += __expf(to_f(x[c]) * k - m);
  return m + __logf(block_sum(s, shared));
}

template <typename T>
__global__ void soft_label_loss_kernel(const SoftLabelLossArgs a) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.x, C = a.classes, B = a.batch;
  const T* s = static_cast<const T*>(a.student) + b * a.s_row;
  const T* t = a.target ? static_cast<const T*>(a.target) + b * a.t_row : nullptr;
  T* g = a.grad ? static_cast<T*>(a.grad) + b * C : nullptr;
  float lse_s = 0.f, lse_t = 0.f, lse_1 = 0.f;
  if (t && a.kl) {
    lse_s = row_lse(s, C, a.inv_t, shared);
    lse_t = row_lse(t, C, a.inv_t, shared);
  }
  int64_t h = 0, hp = 0;
  float lam = 1.f;
  if (a.with_ce) {
    const int64_t pb = a.partner[b];
    h = a.hard[b];
    hp = pb >= 0 && pb < B ? a.hard[pb] : -1;
    if (h < 0 || h >= C || hp < 0 || hp >= C) {  // the same for every thread of the block: all return here
      for (int64_t c = threadIdx.x; g && c < C; c += kThreads) g[c] = from_f<T>(nanf(""));
      if (threadIdx.x == 0) a.rows[2 * b] = a.rows[2 * b + 1] = nanf("");
      return;
    }
    lse_1 = row_lse(s, C, 1.f, shared);
    lam = a.lam[b];
  }
  const float k_mse = 2.f / (static_cast<float>(B) * C), k_kl = a.inv_t / B, k_ce = a.beta / B;
  float main = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float sv = to_f(s[c]);
    float gv = 0.f;
    if (t) {
      const float tv = to_f(t[c]);
      if (a.kl) {
        const float p = __expf(tv * a.inv_t - lse_t), q = __expf(sv * a.inv_t - lse_s);
        main += p * (tv - sv) * a.inv_t;
        gv = (q - p) * k_kl;
      } else {
        const float d = sv - tv;
        main += d * d;
        gv = d * k_mse;
      }
    }
    if (a.with_ce) {
      const float onehot = (c == h ? lam : 0.f) + (c == hp ? 1.f - lam : 0.f);
      gv += (__expf(sv - lse_1) - onehot) * k_ce;
    }
    if (g) g[c] = from_f<T>(gv);
  }
  main = block_sum(main, shared);
  if (threadIdx.x == 0) {
    if (t && a.kl) main += lse_s - lse_t;
    float ce = 0.f;
    if (a.with_ce) ce = lam * (lse_1 - to_f(s[h])) + (1.f - lam) * (lse_1 - to_f(s[hp]));
    a.rows[2 * b] = main;
    a.rows[2 * b + 1] = ce;
  }
}

}  // namespace

cudaError_t launch_soft_label_loss(const SoftLabelLossArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.batch));
  switch (a.dtype) {
    case kF16: soft_label_loss_kernel<__half><<<grid, kThreads, 0, stream>>>(a); break;
    case kBF16: soft_label_loss_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a); break;
    default: soft_label_loss_kernel<float><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace hello_fast
