// CUDA launcher of hello_fast::soft_label_loss(_with_grad): checks the tensors, fills the POD arguments of
// soft_label_loss_kernel.cu, launches it on the current stream and sums the per-row terms.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../soft_label_loss.h"
#include "launch.h"

namespace hello_fast {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kF32;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    default: TORCH_CHECK(false, "soft_label_loss: the CUDA kernel takes float32, float16 or bfloat16 logits, not ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& student_in, const c10::optional<at::Tensor>& target_in,
                                       const at::Tensor& hard_in, const at::Tensor& partner_in, const at::Tensor& lam_in,
                                       c10::string_view mode_name, double temperature, double beta, bool with_grad) {
  check_soft_label_args(student_in, target_in, hard_in, partner_in, lam_in, temperature);
  const auto mode = parse_soft_label_mode(std::string(mode_name));
  const c10::cuda::CUDAGuard guard(student_in.device());
  auto student = student_in.stride(1) == 1 ? student_in : student_in.contiguous();
  at::Tensor target;
  if (target_in.has_value() && target_in->defined()) {
    target = target_in->to(student.scalar_type());
    if (target.stride(1) != 1) target = target.contiguous();
  }
  const auto hard = hard_in.contiguous(), partner = partner_in.contiguous(), lam = lam_in.contiguous();
  const int64_t B = student.size(0), C = student.size(1);
  auto rows = at::empty({B, 2}, student.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty({B, C}, student.options()) : at::Tensor();
  cuda::SoftLabelLossArgs a{};
  a.student = student.data_ptr();
  a.target = target.defined() ? target.data_ptr() : nullptr;
  a.dtype = dtype_code(student.scalar_type());
  a.s_row = student.stride(0);
  a.t_row = target.defined() ? target.stride(0) : 0;
  a.hard = hard.data_ptr<int64_t>();
  a.partner = partner.data_ptr<int64_t>();
  a.lam = lam.data_ptr<float>();
  a.rows = rows.data_ptr<float>();
  a.grad = with_grad ? grad.data_ptr() : nullptr;
  a.batch = B;
  a.classes = C;
  a.inv_t = static_cast<float>(1.0 / temperature);
  a.beta = static_cast<float>(beta);
  a.kl = mode == SoftLabelMode::kKL;
  a.with_ce = beta != 0;
  const cudaError_t err = cuda::launch_soft_label_loss(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "soft_label_loss: CUDA launch failed: ", cudaGetErrorString(err));
  const double main_div = mode == SoftLabelMode::kMSE ? static_cast<double>(B) * C : static_cast<double>(B);
  auto loss = rows.select(1, 0).sum() / main_div + rows.select(1, 1).sum() * (beta / B);
  return {loss, grad};
}

at::Tensor soft_label_loss_cuda(const at::Tensor& s, const c10::optional<at::Tensor>& t, const at::Tensor& hard,
                                const at::Tensor& partner, const at::Tensor& lam, c10::string_view mode, double temperature,
                                double beta) {
  return std::get<0>(run(s, t, hard, partner, lam, mode, temperature, beta, false));
}

std::tuple<at::Tensor, at::Tensor> soft_label_loss_with_grad_cuda(const at::Tensor& s, const c10::optional<at::Tensor>& t,
                                                                  const at::Tensor& hard, const at::Tensor& partner,
                                                                  const at::Tensor& lam, c10::string_view mode,
                                                                  double temperature, double beta) {
  return run(s, t, hard, partner, lam, mode, temperature, beta, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(hello_fast, CUDA, m) {
  m.impl("soft_label_loss", &soft_label_loss_cuda);
  m.impl("soft_label_loss_with_grad", &soft_label_loss_with_grad_cuda);
}

}  // namespace hello_fast
