// C++ test of the hello_fast::soft_label_loss(_with_grad) CPU kernels against ATen expressions (run by ctest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>
#include <string>

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.to(at::kDouble).abs().max().item<double>());
  if (!(err <= tol * scale)) {
    std::cerr << "FAIL " << what << ": max error " << err << " > " << tol * scale << "\n";
    ++failures;
  } else {
    std::cout << "ok   " << what << " (max error " << err << ")\n";
  }
}

// the reference, in double
at::Tensor reference(const at::Tensor& s, const at::Tensor& t, const at::Tensor& hard, const at::Tensor& partner,
                     const at::Tensor& lam, const std::string& mode, double T, double beta) {
  auto sd = s.to(at::kDouble);
  at::Tensor main;
  if (!t.defined()) {
    main = at::zeros({}, sd.options());
  } else if (mode == "mse") {
    main = (sd - t.to(at::kDouble)).pow(2).mean();
  } else {
    auto logp = at::log_softmax(t.to(at::kDouble) / T, 1);
    auto logq = at::log_softmax(sd / T, 1);
    main = (logp.exp() * (logp - logq)).sum() / s.size(0);
  }
  auto logq1 = at::log_softmax(sd, 1);
  auto own = -logq1.gather(1, hard.unsqueeze(1)).squeeze(1);
  auto other = -logq1.gather(1, hard.index_select(0, partner).unsqueeze(1)).squeeze(1);
  auto l = lam.to(at::kDouble);
  return main + beta * (l * own + (1 - l) * other).mean();
}

void check_case(int64_t B, int64_t C, const std::string& mode, double T, double beta, bool with_target) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("hello_fast::soft_label_loss", "")
                .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, c10::string_view, double, double)>();
  auto with_grad = c10::Dispatcher::singleton().findSchemaOrThrow("hello_fast::soft_label_loss_with_grad", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::string_view, double, double)>();
  auto s = at::randn({B, C}) * 3;
  auto t = with_target ? at::randn({B, C}) * 3 : at::Tensor();
  auto hard = at::randint(0, C, {B}, at::kLong);
  auto partner = at::randperm(B, at::kLong);
  auto lam = at::rand({B});
  std::optional<at::Tensor> topt = with_target ? std::optional<at::Tensor>(t) : std::nullopt;
  const std::string name = mode + " B=" + std::to_string(B) + " C=" + std::to_string(C) + " beta=" +
                           std::to_string(beta) + (with_target ? "" : " (no target)");
  auto got = op.call(s, topt, hard, partner, lam, mode, T, beta);
  expect_close("loss     " + name, got, reference(s, t, hard, partner, lam, mode, T, beta), 1e-5);
  // gradient by central differences of the reference, along a random direction
  auto dir = at::randn({B, C}, at::kDouble);
  const double eps = 1e-4;
  auto sd = s.to(at::kDouble);
  auto plus = reference(sd + eps * dir, t, hard, partner, lam, mode, T, beta).item<double>();
  auto minus = reference(sd - eps * dir, t, hard, partner, lam, mode, T, beta).item<double>();
  auto [loss, grad] = with_grad.call(s, topt, hard, partner, lam, mode, T, beta);
  expect_close("with_grad loss " + name, loss, got, 1e-6);
  auto directional = (grad.to(at::kDouble) * dir).sum();
  expect_close("gradient " + name, directional, at::scalar_tensor((plus - minus) / (2 * eps), at::kDouble), 1e-3);
}

}  // namespace

void expect(const std::string& what, bool ok) {
  (ok ? std::cout : std::cerr) << (ok ? "ok   " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}

// what every backend refuses (the Python op checks the same first): float64 logits, out-of-range labels
bool refused(const at::Tensor& s, const at::Tensor& hard) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("hello_fast::soft_label_loss", "")
                .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, c10::string_view, double, double)>();
  try {
    op.call(s, std::nullopt, hard, at::zeros({2}, at::kLong), at::ones({2}), "mse", 1.0, 1.0);
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

int main() {
  at::manual_seed(0);
  expect("float32 logits are taken", !refused(at::randn({2, 5}), at::tensor({0, 4}, at::kLong)));
  expect("float64 logits are refused", refused(at::randn({2, 5}, at::kDouble), at::tensor({0, 4}, at::kLong)));
  expect("a hard label >= C is refused", refused(at::randn({2, 5}), at::tensor({0, 5}, at::kLong)));
  for (int64_t B : {1, 7, 37}) {
    for (int64_t C : {1, 13, 1001}) {
      check_case(B, C, "mse", 1.0, 0.0, true);
      check_case(B, C, "mse", 1.0, 0.5, true);
      check_case(B, C, "kl", 4.0, 0.3, true);
      check_case(B, C, "kl", 1.0, 0.0, true);
      check_case(B, C, "mse", 1.0, 1.0, false);
    }
  }
  if (failures) {
    std::cerr << failures << " checks failed\n";
    return 1;
  }
  std::cout << "all soft_label_loss checks passed\n";
  return 0;
}
