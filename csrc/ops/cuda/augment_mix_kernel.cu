// CUDA kernel of hello_fast::augment_mix: one thread per output pixel of one sample, all 3 channels and every view.
// Bilinear taps follow F.interpolate(align_corners=False) in fp32; parameters are clamped, never read out of bounds
// (the Python op validates them and raises before launching).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace hello_fast {
namespace cuda {
namespace {

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

struct Taps {
  const uint8_t* r0;
  const uint8_t* r1;
  int64_t c0, c1;
  float ly, lx;
};

__device__ Taps taps(const AugmentMixArgs& a, int64_t smp, int64_t oy, int64_t ox) {
  const int64_t img = clamp64(a.index[smp], 0, a.num_images - 1);
  const int64_t* cr = a.crop + 4 * smp;
  const int64_t top = clamp64(cr[0], 0, a.height - 1), left = clamp64(cr[1], 0, a.width - 1);
  const int64_t h = clamp64(cr[2], 1, a.height - top), w = clamp64(cr[3], 1, a.width - left);
  const int64_t oxx = a.flip[smp] ? a.out_size - 1 - ox : ox;
  const float out_f = static_cast<float>(a.out_size);
  float sy = (static_cast<float>(h) / out_f) * (static_cast<float>(oy) + 0.5f) - 0.5f;
  float sx = (static_cast<float>(w) / out_f) * (static_cast<float>(oxx) + 0.5f) - 0.5f;
  sy = sy < 0.f ? 0.f : sy;
  sx = sx < 0.f ? 0.f : sx;
  const int64_t y0 = static_cast<int64_t>(sy), x0 = static_cast<int64_t>(sx);
  const int64_t y1 = y0 < h - 1 ? y0 + 1 : y0, x1 = x0 < w - 1 ? x0 + 1 : x0;
  const uint8_t* base = a.src + img * a.s_n;
  return Taps{base + (top + y0) * a.s_h, base + (top + y1) * a.s_h, (left + x0) * a.s_w, (left + x1) * a.s_w,
              sy - static_cast<float>(y0), sx - static_cast<float>(x0)};
}

__device__ __forceinline__ float bilinear(const Taps& t, int64_t c_off) {
  const float p00 = t.r0[c_off + t.c0], p01 = t.r0[c_off + t.c1];
  const float p10 = t.r1[c_off + t.c0], p11 = t.r1[c_off + t.c1];
  return (1.f - t.ly) * ((1.f - t.lx) * p00 + t.lx * p01) + t.ly * ((1.f - t.lx) * p10 + t.lx * p11);
}

__device__ __forceinline__ void store(void* base, int dtype, int64_t offset, float v) {
  switch (dtype) {
    case kF16: static_cast<__half*>(base)[offset] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(base)[offset] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[offset] = v;
  }
}

__global__ void augment_mix_kernel(const AugmentMixArgs a) {
  const int64_t b = blockIdx.y;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = a.out_size * a.out_size;
  if (pix == 0) {
    float le = 1.f;
    if (a.mode == 1) {
      le = a.lam[b];
    } else if (a.mode == 2) {
      const int64_t* k = a.cut + 4 * b;
      le = 1.f - static_cast<float>((k[2] - k[0]) * (k[3] - k[1])) / static_cast<float>(n);
    }
    a.lam_eff[b] = le;
  }
  if (pix >= n) return;
  const int64_t oy = pix / a.out_size, ox = pix % a.out_size;
  const int64_t p = clamp64(a.partner[b], 0, a.batch - 1);
  int64_t own = b;
  if (a.mode == 2) {
    const int64_t* k = a.cut + 4 * b;
    if (oy >= k[0] && oy < k[2] && ox >= k[1] && ox < k[3]) own = p;
  }
  const Taps t = taps(a, own, oy, ox);
  Taps tp;
  float lam = 1.f;
  if (a.mode == 1) {
    tp = taps(a, p, oy, ox);
    lam = a.lam[b];
  }
  for (int c = 0; c < 3; ++c) {
    float v = bilinear(t, c * a.s_c);
    if (a.mode == 1) v = lam * v + (1.f - lam) * bilinear(tp, c * a.s_c);
    const float x = v * (1.f / 255.f);
    for (int k = 0; k < a.num_views; ++k) {
      const int64_t* st = a.view_stride[k];
      store(a.view[k], a.view_dtype[k], b * st[0] + c * st[1] + oy * st[2] + ox * st[3],
            (x - a.mean[k][c]) * a.inv_std[k][c]);
    }
  }
}

}  // namespace

cudaError_t launch_augment_mix(const AugmentMixArgs& a, cudaStream_t stream) {
  const int threads = 256;
  const int64_t n = a.out_size * a.out_size;
  const dim3 grid(static_cast<unsigned>((n + threads - 1) / threads), static_cast<unsigned>(a.batch));
  augment_mix_kernel<<<grid, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace hello_fast
