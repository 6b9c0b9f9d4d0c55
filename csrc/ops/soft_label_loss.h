// Shared argument checks and mode parsing for the soft_label_loss kernels (CPU and CUDA): the same limits as the
// Python op (hello_fast/ops/soft_label_loss.py), which checks them first; these are the net for C++ callers.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <string>

namespace hello_fast {

enum class SoftLabelMode { kMSE = 0, kKL = 1 };

inline SoftLabelMode parse_soft_label_mode(const std::string& mode) {
  if (mode == "mse") return SoftLabelMode::kMSE;
  if (mode == "kl") return SoftLabelMode::kKL;
  TORCH_CHECK(false, "soft_label_loss: mode must be 'mse' or 'kl', got '", mode, "'");
}

inline void check_soft_label_args(const at::Tensor& student, const c10::optional<at::Tensor>& target,
                                  const at::Tensor& hard, const at::Tensor& partner, const at::Tensor& lam,
                                  double temperature) {
  TORCH_CHECK(student.dim() == 2, "soft_label_loss: student logits must be (B, C), got ", student.sizes());
  TORCH_CHECK(student.size(0) > 0 && student.size(1) > 0, "soft_label_loss: empty logits ", student.sizes());
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "soft_label_loss: student_logits must be float32, float16 or bfloat16 (every backend computes in float32), "
              "got ", dt);
  if (target.has_value() && target->defined()) {
    TORCH_CHECK(target->sizes() == student.sizes(), "soft_label_loss: target ", target->sizes(),
                " does not match student ", student.sizes());
    TORCH_CHECK(target->device() == student.device(), "soft_label_loss: target on another device");
    TORCH_CHECK(at::isFloatingType(target->scalar_type()), "soft_label_loss: target logits must be floating point");
  }
  const auto B = student.size(0);
  TORCH_CHECK(hard.dim() == 1 && hard.size(0) == B && hard.scalar_type() == at::kLong,
              "soft_label_loss: hard must be int64 (B,)");
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == B && partner.scalar_type() == at::kLong,
              "soft_label_loss: partner must be int64 (B,)");
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == B && lam.scalar_type() == at::kFloat,
              "soft_label_loss: lam must be float32 (B,)");
  TORCH_CHECK(hard.device() == student.device() && partner.device() == student.device() &&
                  lam.device() == student.device(),
              "soft_label_loss: all tensors must be on one device");
  TORCH_CHECK(temperature > 0, "soft_label_loss: temperature must be > 0");
}

}  // namespace hello_fast
