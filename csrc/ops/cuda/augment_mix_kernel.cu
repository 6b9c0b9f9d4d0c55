// CUDA kernel of hello_fast::augment_mix: one thread per output pixel, all 3 channels and every view, looping over
// the samples of the batch along grid.y. Bilinear taps follow F.interpolate(align_corners=False) in fp32; with
// ShufflePatches each tap's row and column are mapped to the source through the sample's strip orders.
// The Python op checks the parameters and raises before launching (one check for every backend); the kernel
// still never reads outside its inputs: a sample whose parameters are out of range (reachable only with
// check=False or from C++) gets NaN views rather than a clamped, plausible-looking image.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>

#include "launch.h"

namespace hello_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxGridY = 65535;  // CUDA's limit on grid.y: larger batches loop

// Whether each of sample smp's two strip orders is a permutation of 0..factor-1 (factor <= kMaxShuffleFactor = 64).
__device__ bool orders_valid(const AugmentMixArgs& a, int64_t smp) {
  const int64_t F = a.shuffle_factor;
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t* order = a.shuffle + (2 * smp + axis) * F;
    unsigned long long seen = 0;
    for (int64_t k = 0; k < F; ++k) {
      const int64_t j = order[k];
      if (j < 0 || j >= F || ((seen >> j) & 1ull)) return false;
      seen |= 1ull << j;
    }
  }
  return true;
}

// Whether sample smp's image, crop and (kShuffle) strip orders lie inside the source set.
template <bool kShuffle>
__device__ __forceinline__ bool crop_inside(const AugmentMixArgs& a, int64_t smp) {
  const int64_t img = a.index[smp];
  const int64_t* cr = a.crop + 4 * smp;
  return img >= 0 && img < a.num_images && cr[0] >= 0 && cr[1] >= 0 && cr[2] >= 1 && cr[3] >= 1 &&
         cr[0] + cr[2] <= a.height && cr[1] + cr[3] <= a.width && (!kShuffle || orders_valid(a, smp));
}

// The source coordinate of coordinate y of a shuffled axis of n pixels: `factor` strips of n / factor (the last source
// strip also takes the remainder), shuffled strip k being source strip order[k]
// (hello_fast.ops.augment_mix.strip_source_index is the rule). y < n and a valid order always find a strip.
__device__ __forceinline__ int64_t strip_source(const int64_t* order, int64_t factor, int64_t n, int64_t y) {
  const int64_t t = n / factor, rem = n - factor * t;
  int64_t start = 0;
  for (int64_t k = 0; k < factor; ++k) {
    const int64_t len = t + (order[k] == factor - 1 ? rem : 0);
    if (y < start + len) return order[k] * t + (y - start);
    start += len;
  }
  return y;
}

// Whether everything sample b reads (its crop, its partner's crop when mixing, its CutMix box) is in range.
template <bool kShuffle>
__device__ bool params_in_range(const AugmentMixArgs& a, int64_t b) {
  if (!crop_inside<kShuffle>(a, b)) return false;
  if (a.mode == kNoMix) return true;
  const int64_t p = a.partner[b];
  if (p < 0 || p >= a.batch || !crop_inside<kShuffle>(a, p)) return false;
  if (a.mode == kCutmix) {
    const int64_t* k = a.cut + 4 * b;
    return k[0] >= 0 && k[1] >= 0 && k[0] <= k[2] && k[1] <= k[3] && k[2] <= a.out_size && k[3] <= a.out_size;
  }
  return true;
}

struct Taps {
  const uint8_t* r0;
  const uint8_t* r1;
  int64_t c0, c1;
  float ly, lx;
};

// The source coordinates of output pixel (oy, ox) of sample smp: its crop resized to out_size (align_corners=False)
// and flipped; the four bilinear taps and their weights.
template <bool kShuffle>
__device__ Taps taps(const AugmentMixArgs& a, int64_t smp, int64_t oy, int64_t ox) {
  const int64_t* cr = a.crop + 4 * smp;
  const int64_t top = cr[0], left = cr[1], h = cr[2], w = cr[3];
  const int64_t oxx = a.flip[smp] ? a.out_size - 1 - ox : ox;
  const float out_f = static_cast<float>(a.out_size);
  float sy = (static_cast<float>(h) / out_f) * (static_cast<float>(oy) + 0.5f) - 0.5f;
  float sx = (static_cast<float>(w) / out_f) * (static_cast<float>(oxx) + 0.5f) - 0.5f;
  sy = sy < 0.f ? 0.f : sy;
  sx = sx < 0.f ? 0.f : sx;
  const int64_t y0 = static_cast<int64_t>(sy), x0 = static_cast<int64_t>(sx);
  const int64_t y1 = y0 < h - 1 ? y0 + 1 : y0, x1 = x0 < w - 1 ? x0 + 1 : x0;
  const uint8_t* base = a.src + a.index[smp] * a.s_n;
  int64_t r0 = top + y0, r1 = top + y1, c0 = left + x0, c1 = left + x1;  // in the (shuffled) image
  if (kShuffle) {
    const int64_t F = a.shuffle_factor;
    const int64_t* rows = a.shuffle + 2 * smp * F;
    r0 = strip_source(rows, F, a.height, r0);
    r1 = strip_source(rows, F, a.height, r1);
    c0 = strip_source(rows + F, F, a.width, c0);
    c1 = strip_source(rows + F, F, a.width, c1);
  }
  return Taps{base + r0 * a.s_h, base + r1 * a.s_h, c0 * a.s_w, c1 * a.s_w, sy - static_cast<float>(y0),
              sx - static_cast<float>(x0)};
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

// kShuffle: a.shuffle is set (its own instantiation, so the kernel without ShufflePatches keeps its registers)
template <bool kShuffle>
__global__ void augment_mix_kernel(const AugmentMixArgs a) {
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = a.out_size * a.out_size;
  if (pix >= n) return;
  const int64_t oy = pix / a.out_size, ox = pix % a.out_size;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    if (!params_in_range<kShuffle>(a, b)) {
      for (int c = 0; c < 3; ++c) {
        for (int k = 0; k < a.num_views; ++k) {
          const int64_t* st = a.view_stride[k];
          store(a.view[k], a.view_dtype[k], b * st[0] + c * st[1] + oy * st[2] + ox * st[3], nanf(""));
        }
      }
      continue;
    }
    // the pixel's source: the sample itself or, inside its CutMix box, its partner; Mixup blends both
    int64_t own = b;
    const int64_t p = a.mode == kNoMix ? b : a.partner[b];
    if (a.mode == kCutmix) {
      const int64_t* k = a.cut + 4 * b;
      if (oy >= k[0] && oy < k[2] && ox >= k[1] && ox < k[3]) own = p;
    }
    const Taps t = taps<kShuffle>(a, own, oy, ox);
    Taps tp;
    float lam = 1.f;
    if (a.mode == kMixup) {
      tp = taps<kShuffle>(a, p, oy, ox);
      lam = a.lam[b];
    }
    for (int c = 0; c < 3; ++c) {
      float v = bilinear(t, c * a.s_c);
      if (a.mode == kMixup) v = lam * v + (1.f - lam) * bilinear(tp, c * a.s_c);
      const float x = v * (1.f / 255.f);
      for (int k = 0; k < a.num_views; ++k) {
        const int64_t* st = a.view_stride[k];
        store(a.view[k], a.view_dtype[k], b * st[0] + c * st[1] + oy * st[2] + ox * st[3],
              (x - a.mean[k][c]) * a.inv_std[k][c]);
      }
    }
  }
}

}  // namespace

cudaError_t launch_augment_mix(const AugmentMixArgs& a, cudaStream_t stream) {
  const int64_t n = a.out_size * a.out_size;
  const unsigned samples = static_cast<unsigned>(a.batch < kMaxGridY ? a.batch : kMaxGridY);
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), samples);
  if (a.shuffle != nullptr) {
    augment_mix_kernel<true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    augment_mix_kernel<false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace hello_fast
