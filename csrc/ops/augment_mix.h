// Shared argument checks, mode parsing and output allocation for the augment_mix kernels (CPU and CUDA): the same
// limits as the Python op (hello_fast/ops/augment_mix.py), which checks them first; these are the net for C++ callers.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "limits.h"

namespace hello_fast {

enum class MixMode { kNone = 0, kMixup = 1, kCutmix = 2 };

inline MixMode parse_mix_mode(const std::string& mode) {
  if (mode == "none") return MixMode::kNone;
  if (mode == "mixup") return MixMode::kMixup;
  if (mode == "cutmix") return MixMode::kCutmix;
  TORCH_CHECK(false, "augment_mix: mode must be none, mixup or cutmix, got '", mode, "'");
}

inline at::ScalarType view_dtype(int64_t code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kHalf;
    case 2: return at::kBFloat16;
  }
  TORCH_CHECK(false, "augment_mix: view dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", code);
}

// Checks shapes and dtypes. Ranges need the parameters' values: the CPU op checks them (cpu/augment_mix_kernel.cpp);
// the CUDA kernel, which cannot raise, writes NaN for a sample whose parameters are out of range.
inline int64_t check_augment_shapes(const at::Tensor& src, const at::Tensor& index, const at::Tensor& crop,
                                    const at::Tensor& flip, const at::Tensor& partner, const at::Tensor& lam,
                                    const at::Tensor& cut, int64_t out_size, at::ArrayRef<double> mean,
                                    at::ArrayRef<double> std, at::IntArrayRef dtypes,
                                    const c10::optional<at::Tensor>& shuffle) {
  TORCH_CHECK(src.dim() == 4 && src.size(1) == 3 && src.scalar_type() == at::kByte,
              "augment_mix: src must be uint8 (S, 3, H, W), got ", src.scalar_type(), " ", src.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "augment_mix: index must be int64 (B,)");
  const int64_t B = index.size(0);
  TORCH_CHECK(B > 0, "augment_mix: empty batch");
  TORCH_CHECK(crop.sizes() == at::IntArrayRef({B, 4}) && crop.scalar_type() == at::kLong, "augment_mix: crop must be int64 (B, 4)");
  TORCH_CHECK(cut.sizes() == at::IntArrayRef({B, 4}) && cut.scalar_type() == at::kLong, "augment_mix: cut must be int64 (B, 4)");
  TORCH_CHECK(flip.sizes() == at::IntArrayRef({B}) && flip.scalar_type() == at::kBool, "augment_mix: flip must be bool (B,)");
  TORCH_CHECK(partner.sizes() == at::IntArrayRef({B}) && partner.scalar_type() == at::kLong, "augment_mix: partner must be int64 (B,)");
  TORCH_CHECK(lam.sizes() == at::IntArrayRef({B}) && lam.scalar_type() == at::kFloat, "augment_mix: lam must be float32 (B,)");
  for (const auto& t : {index, crop, cut, flip, partner, lam}) {
    TORCH_CHECK(t.device() == src.device(), "augment_mix: all tensors must be on src's device");
  }
  TORCH_CHECK(out_size >= 1, "augment_mix: out_size must be >= 1");
  const size_t V = dtypes.size();
  TORCH_CHECK(V >= 1 && mean.size() == 3 * V && std.size() == 3 * V,
              "augment_mix: give 3 means, 3 stds and a dtype per view");
  TORCH_CHECK(V <= static_cast<size_t>(kMaxViews), "augment_mix: at most ", kMaxViews,
              " views are written in one pass, got ", V);
  for (double s : std) TORCH_CHECK(s > 0, "augment_mix: std must be > 0");
  for (int64_t d : dtypes) view_dtype(d);
  if (shuffle.has_value()) {
    const auto& s = *shuffle;
    TORCH_CHECK(s.dim() == 3 && s.size(0) == B && s.size(1) == 2 && s.scalar_type() == at::kLong,
                "augment_mix: shuffle must be int64 (B, 2, factor)");
    TORCH_CHECK(s.device() == src.device(), "augment_mix: all tensors must be on src's device");
    const int64_t factor = s.size(2);
    TORCH_CHECK(factor >= 1 && factor <= kMaxShuffleFactor && factor <= src.size(2) && factor <= src.size(3),
                "augment_mix: the shuffle factor must lie in [1, ", kMaxShuffleFactor,
                "] and not exceed the image's sides, got ", factor);
  }
  return B;
}

inline std::vector<at::Tensor> allocate_views(const at::Tensor& src, int64_t B, int64_t out_size, at::IntArrayRef dtypes,
                                              bool channels_last) {
  std::vector<at::Tensor> views;
  for (int64_t d : dtypes) {
    auto opts = src.options().dtype(view_dtype(d));
    views.push_back(at::empty({B, 3, out_size, out_size}, opts,
                              channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  return views;
}

}  // namespace hello_fast
