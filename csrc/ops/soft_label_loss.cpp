// Declares hello_fast::soft_label_loss and soft_label_loss_with_grad (the schemas); kernels live in cpu/ and cuda/.
//
// loss = main + beta * ce, where main is the mean squared error over all elements (mode "mse") or
// KL(softmax(target/T) || softmax(student/T)) averaged over the batch (mode "kl", no T^2 factor),
// and ce = mean_b[lam_b * CE(s_b, hard_b) + (1 - lam_b) * CE(s_b, hard[partner_b])]. A missing
// target drops the main term (hard labels only). The _with_grad form also returns d loss / d student
// from the same pass over the logits (autograd then only scales it by the incoming gradient).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(hello_fast, m) {
  m.def(
      "soft_label_loss(Tensor student, Tensor? target, Tensor hard, Tensor partner, Tensor lam, "
      "str mode, float temperature, float beta) -> Tensor");
  m.def(
      "soft_label_loss_with_grad(Tensor student, Tensor? target, Tensor hard, Tensor partner, Tensor lam, "
      "str mode, float temperature, float beta) -> (Tensor, Tensor)");
}
