// CPU kernel of hello_fast::augment_mix: per sample, separable bilinear resampling (horizontal taps per needed
// source row, then a vectorised vertical blend), mixing, and every normalised view written in one pass. With
// ShufflePatches the crop's rows and columns are read through the strip orders (one source index per crop row and
// column, built once per sample).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../cpu_dispatch.h"
#include "../augment_mix.h"

// cpu_default or cpu_avx2: this file is compiled once per CPU build (csrc/cpu_dispatch.h)
namespace hello_fast::HELLO_FAST_CPU_NAMESPACE {
namespace {

using Vec = at::vec::Vectorized<float>;

// Bilinear taps of F.interpolate(align_corners=False) from `in` to `out` samples, in float as PyTorch
// computes them; `mirror` reads the output left-right reversed (the flip).
struct Taps {
  std::vector<int32_t> i0, i1;
  std::vector<float> l;
  void build(int64_t in, int64_t out, bool mirror) {
    i0.resize(out);
    i1.resize(out);
    l.resize(out);
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int64_t o = 0; o < out; ++o) {
      const int64_t oo = mirror ? out - 1 - o : o;
      float s = scale * (static_cast<float>(oo) + 0.5f) - 0.5f;
      if (s < 0) s = 0;
      const int64_t a = static_cast<int64_t>(s);
      i0[o] = static_cast<int32_t>(a);
      i1[o] = static_cast<int32_t>(a + (a < in - 1 ? 1 : 0));
      l[o] = s - static_cast<float>(a);
    }
  }
};

struct Sample {
  const uint8_t* image;  // src[index[b]]
  int64_t top, left, h, w;
  bool flip;
  const int64_t* order;  // ShufflePatches: (2, factor) row then column strip orders, or null
  int64_t factor, height, width;
};

struct Scratch {
  Taps xs, ys;
  std::vector<float> rows;    // horizontally resampled source rows: (h, out)
  std::vector<float> line;    // one source row of the crop as floats
  std::vector<uint8_t> need;  // which source rows the output needs
  // ShufflePatches: the source row / column (times its stride) of each row / column of the crop
  std::vector<int64_t> src_row, src_col;
};

// The source coordinate of shuffled coordinates first, first + 1, ..., first + count - 1 of an axis of n pixels cut
// into `factor` strips of n / factor (the last source strip also takes the remainder), shuffled strip k being source
// strip order[k]; each times `stride`. hello_fast.ops.augment_mix.strip_source_index is the rule.
void strip_sources(const int64_t* order, int64_t factor, int64_t n, int64_t first, int64_t count, int64_t stride,
                   std::vector<int64_t>& out) {
  const int64_t t = n / factor, rem = n - factor * t;
  auto length = [&](int64_t k) { return t + (order[k] == factor - 1 ? rem : 0); };
  out.resize(static_cast<size_t>(count));
  int64_t k = 0, start = 0;  // shuffled strip k covers [start, start + length(k))
  for (int64_t i = 0; i < count; ++i) {
    const int64_t y = first + i;
    while (start + length(k) <= y) start += length(k++);
    out[i] = (order[k] * t + (y - start)) * stride;
  }
}

// dst[o] = lerp(line[i0[o]], line[i1[o]], l[o]) for o < out: gathers from the row converted to float once
void horizontal(const float* line, const Taps& xs, int64_t out, float* dst) {
  int64_t o = 0;
#if defined(CPU_CAPABILITY_AVX2)
  using IVec = at::vec::Vectorized<int32_t>;
  for (; o + Vec::size() <= out; o += Vec::size()) {
    const Vec a = at::vec::gather<sizeof(float)>(line, IVec::loadu(xs.i0.data() + o));
    const Vec b = at::vec::gather<sizeof(float)>(line, IVec::loadu(xs.i1.data() + o));
    (a + Vec::loadu(xs.l.data() + o) * (b - a)).store(dst + o);
  }
#endif
  for (; o < out; ++o) {
    const float a = line[xs.i0[o]], b = line[xs.i1[o]];
    dst[o] = a + xs.l[o] * (b - a);
  }
}

// base (3, out, out) floats in [0, 255] of one sample, for output rows [r0, r1) (others untouched)
void resample(const Sample& s, int64_t out, int64_t s_c, int64_t s_h, int64_t s_w, int64_t r0, int64_t r1, Scratch& k,
              float* base) {
  k.xs.build(s.w, out, s.flip);
  k.ys.build(s.h, out, false);
  k.rows.resize(static_cast<size_t>(s.h * out));
  k.line.resize(static_cast<size_t>(s.w));
  k.need.assign(static_cast<size_t>(s.h), 0);
  for (int64_t oy = r0; oy < r1; ++oy) {
    k.need[k.ys.i0[oy]] = 1;
    k.need[k.ys.i1[oy]] = 1;
  }
  if (s.order != nullptr) {
    strip_sources(s.order, s.factor, s.height, s.top, s.h, s_h, k.src_row);
    strip_sources(s.order + s.factor, s.factor, s.width, s.left, s.w, s_w, k.src_col);
  }
  for (int64_t c = 0; c < 3; ++c) {
    const uint8_t* plane = s.image + c * s_c + s.top * s_h + s.left * s_w;
    for (int64_t r = 0; r < s.h; ++r) {
      if (!k.need[r]) continue;
      float* line = k.line.data();
      if (s.order != nullptr) {  // a gather through the strip orders
        const uint8_t* row = s.image + c * s_c + k.src_row[r];
        const int64_t* col = k.src_col.data();
        for (int64_t x = 0; x < s.w; ++x) line[x] = row[col[x]];
        horizontal(line, k.xs, out, k.rows.data() + r * out);
        continue;
      }
      const uint8_t* row = plane + r * s_h;
      if (s_w == 1) {
        for (int64_t x = 0; x < s.w; ++x) line[x] = row[x];  // auto-vectorised u8 -> f32
      } else {
        for (int64_t x = 0; x < s.w; ++x) line[x] = row[x * s_w];
      }
      horizontal(line, k.xs, out, k.rows.data() + r * out);
    }
    float* plane_out = base + c * out * out;
    for (int64_t oy = r0; oy < r1; ++oy) {
      const float* a = k.rows.data() + k.ys.i0[oy] * out;
      const float* b = k.rows.data() + k.ys.i1[oy] * out;
      const Vec l(k.ys.l[oy]);
      float* dst = plane_out + oy * out;
      int64_t ox = 0;
      for (; ox + Vec::size() <= out; ox += Vec::size()) {
        const Vec va = Vec::loadu(a + ox), vb = Vec::loadu(b + ox);
        (va + l * (vb - va)).store(dst + ox);
      }
      const float ls = k.ys.l[oy];
      for (; ox < out; ++ox) dst[ox] = a[ox] + ls * (b[ox] - a[ox]);
    }
  }
}

template <typename T>
void write_view(const float* x, int64_t out, const float* mean, const float* inv_std, T* dst, int64_t s_c, int64_t s_h,
                int64_t s_w) {
  constexpr float inv255 = 1.0f / 255.0f;
  for (int64_t c = 0; c < 3; ++c) {
    const float m = mean[c], is = inv_std[c];
    const float* src = x + c * out * out;
    if (s_w == 1) {  // contiguous rows: normalise and convert 2 float vectors at a time
      const Vec vk(inv255 * is), vm(m * is);
      for (int64_t oy = 0; oy < out; ++oy) {
        const float* a = src + oy * out;
        T* d = dst + c * s_c + oy * s_h;
        int64_t ox = 0;
        if constexpr (std::is_same_v<T, float>) {
          for (; ox + Vec::size() <= out; ox += Vec::size()) (Vec::loadu(a + ox) * vk - vm).store(d + ox);
        } else {
          for (; ox + 2 * Vec::size() <= out; ox += 2 * Vec::size()) {
            const Vec lo = Vec::loadu(a + ox) * vk - vm, hi = Vec::loadu(a + ox + Vec::size()) * vk - vm;
            at::vec::convert_from_float<T>(lo, hi).store(d + ox);
          }
        }
        for (; ox < out; ++ox) d[ox] = static_cast<T>(a[ox] * (inv255 * is) - m * is);
      }
      continue;
    }
    for (int64_t oy = 0; oy < out; ++oy) {
      const float* a = src + oy * out;
      T* d = dst + c * s_c + oy * s_h;
      for (int64_t ox = 0; ox < out; ++ox) d[ox * s_w] = static_cast<T>(a[ox] * (inv255 * is) - m * is);
    }
  }
}

void check_ranges(const at::Tensor& index, const at::Tensor& crop, const at::Tensor& partner, const at::Tensor& cut,
                  const at::Tensor& shuffle, int64_t S, int64_t H, int64_t W, int64_t out, MixMode mode) {
  const int64_t B = index.size(0);
  const int64_t* ix = index.data_ptr<int64_t>();
  const int64_t* cr = crop.data_ptr<int64_t>();
  const int64_t* pa = partner.data_ptr<int64_t>();
  const int64_t* cu = cut.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ix[b] >= 0 && ix[b] < S, "augment_mix: index[", b, "] = ", ix[b], " is not an image of the set [0, ", S, ")");
    const int64_t t = cr[4 * b], l = cr[4 * b + 1], h = cr[4 * b + 2], w = cr[4 * b + 3];
    TORCH_CHECK(t >= 0 && l >= 0 && h >= 1 && w >= 1 && t + h <= H && l + w <= W, "augment_mix: crop[", b,
                "] = (", t, ", ", l, ", ", h, ", ", w, ") is not inside a ", H, "x", W, " image");
    TORCH_CHECK(pa[b] >= 0 && pa[b] < B, "augment_mix: partner[", b, "] = ", pa[b], " is not a batch row");
    if (mode == MixMode::kCutmix) {
      const int64_t t0 = cu[4 * b], l0 = cu[4 * b + 1], b1 = cu[4 * b + 2], r1 = cu[4 * b + 3];
      TORCH_CHECK(t0 >= 0 && l0 >= 0 && t0 <= b1 && l0 <= r1 && b1 <= out && r1 <= out, "augment_mix: cut[", b,
                  "] is not a box inside ", out, "x", out);
    }
    if (shuffle.defined()) {
      const int64_t F = shuffle.size(2);
      const int64_t* order = shuffle.data_ptr<int64_t>() + 2 * F * b;
      for (int64_t axis = 0; axis < 2; ++axis) {
        std::vector<uint8_t> seen(static_cast<size_t>(F), 0);
        for (int64_t k = 0; k < F; ++k) {
          const int64_t j = order[axis * F + k];
          TORCH_CHECK(j >= 0 && j < F && !seen[j], "augment_mix: shuffle[", b, ", ", axis, "] is not an order of the ",
                      F, " strips (a permutation of 0..", F - 1, ")");
          seen[j] = 1;
        }
      }
    }
  }
}

std::vector<at::Tensor> augment_mix_cpu(const at::Tensor& src_in, const at::Tensor& index_in,
                                                                const at::Tensor& crop_in, const at::Tensor& flip_in,
                                                                const at::Tensor& partner_in, const at::Tensor& lam_in,
                                                                const at::Tensor& cut_in, c10::string_view mode_name,
                                                                int64_t out, at::ArrayRef<double> mean,
                                                                at::ArrayRef<double> std, at::IntArrayRef dtypes,
                                                                bool channels_last,
                                                                const c10::optional<at::Tensor>& shuffle_in) {
  const int64_t B = check_augment_shapes(src_in, index_in, crop_in, flip_in, partner_in, lam_in, cut_in, out, mean, std, dtypes,
                                         shuffle_in);
  const MixMode mode = parse_mix_mode(std::string(mode_name));
  const auto index = index_in.contiguous(), crop = crop_in.contiguous(), partner = partner_in.contiguous();
  const auto cut = cut_in.contiguous(), lam = lam_in.contiguous();
  const auto flip = flip_in.contiguous();
  const auto shuffle = shuffle_in.has_value() ? shuffle_in->contiguous() : at::Tensor();
  const int64_t S = src_in.size(0), H = src_in.size(2), W = src_in.size(3);
  check_ranges(index, crop, partner, cut, shuffle, S, H, W, out, mode);
  const uint8_t* src = src_in.data_ptr<uint8_t>();
  const int64_t s_n = src_in.stride(0), s_c = src_in.stride(1), s_h = src_in.stride(2), s_w = src_in.stride(3);
  const int64_t V = static_cast<int64_t>(dtypes.size());
  std::vector<float> vmean(3 * V), vinv(3 * V);
  for (int64_t i = 0; i < 3 * V; ++i) {
    vmean[i] = static_cast<float>(mean[i]);
    vinv[i] = static_cast<float>(1.0 / std[i]);
  }
  auto views = allocate_views(src_in, B, out, dtypes, channels_last);
  const int64_t* ix = index.data_ptr<int64_t>();
  const int64_t* cr = crop.data_ptr<int64_t>();
  const int64_t* pa = partner.data_ptr<int64_t>();
  const int64_t* cu = cut.data_ptr<int64_t>();
  const bool* fl = flip.data_ptr<bool>();
  const float* lm = lam.data_ptr<float>();
  const int64_t factor = shuffle.defined() ? shuffle.size(2) : 0;
  const int64_t* orders = shuffle.defined() ? shuffle.data_ptr<int64_t>() : nullptr;
  auto sample = [&](int64_t b) {
    return Sample{src + ix[b] * s_n, cr[4 * b], cr[4 * b + 1], cr[4 * b + 2], cr[4 * b + 3], fl[b],
                  orders == nullptr ? nullptr : orders + 2 * factor * b, factor, H, W};
  };
  const int64_t plane = out * out;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch k;
    std::vector<float> mine(3 * plane), theirs;
    for (int64_t b = begin; b < end; ++b) {
      resample(sample(b), out, s_c, s_h, s_w, 0, out, k, mine.data());
      const int64_t p = pa[b];
      if (mode == MixMode::kMixup) {
        theirs.resize(3 * plane);
        resample(sample(p), out, s_c, s_h, s_w, 0, out, k, theirs.data());
        const Vec l(lm[b]), one_minus(1.0f - lm[b]);
        int64_t i = 0;
        for (; i + Vec::size() <= 3 * plane; i += Vec::size()) {
          (Vec::loadu(mine.data() + i) * l + Vec::loadu(theirs.data() + i) * one_minus).store(mine.data() + i);
        }
        for (; i < 3 * plane; ++i) mine[i] = mine[i] * lm[b] + theirs[i] * (1.0f - lm[b]);
      } else if (mode == MixMode::kCutmix) {
        const int64_t t0 = cu[4 * b], l0 = cu[4 * b + 1], b1 = cu[4 * b + 2], r1 = cu[4 * b + 3];
        if (b1 > t0 && r1 > l0) {
          theirs.resize(3 * plane);
          resample(sample(p), out, s_c, s_h, s_w, t0, b1, k, theirs.data());
          for (int64_t c = 0; c < 3; ++c) {
            for (int64_t oy = t0; oy < b1; ++oy) {
              std::copy(theirs.data() + c * plane + oy * out + l0, theirs.data() + c * plane + oy * out + r1,
                        mine.data() + c * plane + oy * out + l0);
            }
          }
        }
      }
      for (int64_t v = 0; v < V; ++v) {
        auto& view = views[v];
        const int64_t vs_c = view.stride(1), vs_h = view.stride(2), vs_w = view.stride(3);
        const float* m = vmean.data() + 3 * v;
        const float* is = vinv.data() + 3 * v;
        switch (view.scalar_type()) {
          case at::kFloat:
            write_view(mine.data(), out, m, is, view.data_ptr<float>() + b * view.stride(0), vs_c, vs_h, vs_w);
            break;
          case at::kHalf:
            write_view(mine.data(), out, m, is, view.data_ptr<at::Half>() + b * view.stride(0), vs_c, vs_h, vs_w);
            break;
          default:
            write_view(mine.data(), out, m, is, view.data_ptr<at::BFloat16>() + b * view.stride(0), vs_c, vs_h, vs_w);
        }
      }
    }
  });
  return views;
}

}  // namespace
}  // namespace hello_fast::HELLO_FAST_CPU_NAMESPACE

HELLO_FAST_CPU_KERNEL(augment_mix, augment_mix_cpu)
