// Plain-old-data arguments of the CUDA kernels, shared by the .cu files (no torch headers: they compile in
// about a second) and the torch-side .cpp launchers that validate tensors and fill these structs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../limits.h"

namespace hello_fast {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum MixCode : int { kNoMix = 0, kMixup = 1, kCutmix = 2 };  // the values of hello_fast::MixMode

struct AugmentMixArgs {
  const uint8_t* src;
  int64_t s_n, s_c, s_h, s_w;
  int64_t num_images, height, width;
  const int64_t* index;
  const int64_t* crop;  // (B, 4): top, left, height, width
  const bool* flip;
  const int64_t* partner;
  const float* lam;
  const int64_t* cut;  // (B, 4): top, left, bottom, right
  const int64_t* shuffle;  // (B, 2, shuffle_factor): ShufflePatches row then column strip orders, or null
  int64_t shuffle_factor;
  int64_t batch, out_size;
  int mode;  // MixCode
  int num_views;
  void* view[kMaxViews];
  int view_dtype[kMaxViews];
  int64_t view_stride[kMaxViews][4];
  float mean[kMaxViews][3];
  float inv_std[kMaxViews][3];
};

cudaError_t launch_augment_mix(const AugmentMixArgs& a, cudaStream_t stream);

struct SoftLabelLossArgs {
  const void* student;  // (B, C), row stride s_row
  const void* target;   // (B, C) or null, row stride t_row
  int dtype;            // of student, target and grad
  int64_t s_row, t_row;
  const int64_t* hard;     // (B,)
  const int64_t* partner;  // (B,)
  const float* lam;
  float* rows;  // (B, 2): main and ce term of each row
  void* grad;   // (B, C) contiguous, or null
  int64_t batch, classes;
  float inv_t, beta;
  bool kl, with_ce;
};

cudaError_t launch_soft_label_loss(const SoftLabelLossArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace hello_fast
