// CUDA launcher of hello_fast::augment_mix: checks the tensors, allocates the views, fills the POD arguments of
// augment_mix_kernel.cu and launches it on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../augment_mix.h"
#include "launch.h"

namespace hello_fast {
namespace {

std::vector<at::Tensor> augment_mix_cuda(const at::Tensor& src, const at::Tensor& index_in,
                                                                 const at::Tensor& crop_in, const at::Tensor& flip_in,
                                                                 const at::Tensor& partner_in, const at::Tensor& lam_in,
                                                                 const at::Tensor& cut_in, c10::string_view mode_name,
                                                                 int64_t out, at::ArrayRef<double> mean,
                                                                 at::ArrayRef<double> std, at::IntArrayRef dtypes,
                                                                 bool channels_last,
                                                                 const c10::optional<at::Tensor>& shuffle_in) {
  const int64_t B = check_augment_shapes(src, index_in, crop_in, flip_in, partner_in, lam_in, cut_in, out, mean, std, dtypes,
                                         shuffle_in);
  const c10::cuda::CUDAGuard guard(src.device());
  const auto index = index_in.contiguous(), crop = crop_in.contiguous(), flip = flip_in.contiguous();
  const auto partner = partner_in.contiguous(), lam = lam_in.contiguous(), cut = cut_in.contiguous();
  const auto shuffle = shuffle_in.has_value() ? shuffle_in->contiguous() : at::Tensor();
  auto views = allocate_views(src, B, out, dtypes, channels_last);
  cuda::AugmentMixArgs a{};
  a.src = src.data_ptr<uint8_t>();
  a.s_n = src.stride(0);
  a.s_c = src.stride(1);
  a.s_h = src.stride(2);
  a.s_w = src.stride(3);
  a.num_images = src.size(0);
  a.height = src.size(2);
  a.width = src.size(3);
  a.index = index.data_ptr<int64_t>();
  a.crop = crop.data_ptr<int64_t>();
  a.flip = flip.data_ptr<bool>();
  a.partner = partner.data_ptr<int64_t>();
  a.lam = lam.data_ptr<float>();
  a.cut = cut.data_ptr<int64_t>();
  a.shuffle = shuffle.defined() ? shuffle.data_ptr<int64_t>() : nullptr;
  a.shuffle_factor = shuffle.defined() ? shuffle.size(2) : 0;
  a.batch = B;
  a.out_size = out;
  a.mode = static_cast<int>(parse_mix_mode(std::string(mode_name)));
  a.num_views = static_cast<int>(views.size());
  for (int k = 0; k < a.num_views; ++k) {
    a.view[k] = views[k].data_ptr();
    a.view_dtype[k] = static_cast<int>(dtypes[k]);
    for (int d = 0; d < 4; ++d) a.view_stride[k][d] = views[k].stride(d);
    for (int c = 0; c < 3; ++c) {
      a.mean[k][c] = static_cast<float>(mean[3 * k + c]);
      a.inv_std[k][c] = static_cast<float>(1.0 / std[3 * k + c]);
    }
  }
  const cudaError_t err = cuda::launch_augment_mix(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "augment_mix: CUDA launch failed: ", cudaGetErrorString(err));
  return views;
}

}  // namespace

TORCH_LIBRARY_IMPL(hello_fast, CUDA, m) { m.impl("augment_mix", &augment_mix_cuda); }

}  // namespace hello_fast
