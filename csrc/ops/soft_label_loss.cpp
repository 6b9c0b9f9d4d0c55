// Declares hello_fast::soft_label_loss and its backward (the schema); kernels live in cpu/ and cuda/.
//
// loss = main + beta * ce, where main is the mean squared error over all elements (mode "mse") or
// KL(softmax(target/T) || softmax(student/T)) averaged over the batch (mode "kl", no T^2 factor),
// and ce = mean_b[lam_b * CE(s_b, hard_b) + (1 - lam_b) * CE(s_b, hard[partner_b])]. A missing
// target drops the main term (hard labels only).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(hello_fast, m) {
  m.def(
      "soft_label_loss(Tensor student, Tensor? target, Tensor hard, Tensor partner, Tensor lam, "
      "str mode, float temperature, float beta) -> Tensor");
  m.def(
      "soft_label_loss_backward(Tensor grad, Tensor student, Tensor? target, Tensor hard, "
      "Tensor partner, Tensor lam, str mode, float temperature, float beta) -> Tensor");
}
