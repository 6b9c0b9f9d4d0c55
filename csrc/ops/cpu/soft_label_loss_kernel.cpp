// CPU kernels of hello_fast::soft_label_loss: one pass per row, rows split across threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../soft_label_loss.h"

namespace hello_fast {
namespace {

using acc_t = double;  // per-row sums in double: the reduction is over up to ~1e3 classes

template <typename T>
inline acc_t row_max(const T* x, int64_t n, acc_t scale) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < n; ++c) m = std::max(m, static_cast<acc_t>(x[c]) * scale);
  return m;
}

// log(sum(exp(x * scale))), stable
template <typename T>
inline acc_t row_logsumexp(const T* x, int64_t n, acc_t scale) {
  const acc_t m = row_max(x, n, scale);
  acc_t s = 0;
  for (int64_t c = 0; c < n; ++c) s += std::exp(static_cast<acc_t>(x[c]) * scale - m);
  return m + std::log(s);
}

void check_label_ranges(const at::Tensor& hard, const at::Tensor& partner, int64_t B, int64_t C) {
  const int64_t* h = hard.data_ptr<int64_t>();
  const int64_t* p = partner.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(h[b] >= 0 && h[b] < C, "soft_label_loss: hard[", b, "] = ", h[b], " is not a class in [0, ", C, ")");
    TORCH_CHECK(p[b] >= 0 && p[b] < B, "soft_label_loss: partner[", b, "] = ", p[b], " is not a batch row in [0, ", B, ")");
  }
}

template <typename T>
void forward_rows(const T* s, const T* t, const int64_t* hard, const int64_t* partner, const float* lam,
                  int64_t B, int64_t C, SoftLabelMode mode, acc_t inv_temp, acc_t beta, acc_t* main_out,
                  acc_t* ce_out) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* sb = s + b * C;
      acc_t main = 0;
      if (t != nullptr) {
        const T* tb = t + b * C;
        if (mode == SoftLabelMode::kMSE) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = static_cast<acc_t>(sb[c]) - static_cast<acc_t>(tb[c]);
            main += d * d;
          }
        } else {
          const acc_t lse_t = row_logsumexp(tb, C, inv_temp);
          const acc_t lse_s = row_logsumexp(sb, C, inv_temp);
          for (int64_t c = 0; c < C; ++c) {
            const acc_t logp = static_cast<acc_t>(tb[c]) * inv_temp - lse_t;
            const acc_t p = std::exp(logp);
            if (p > 0) main += p * (logp - (static_cast<acc_t>(sb[c]) * inv_temp - lse_s));
          }
        }
      }
      main_out[b] = main;
      acc_t ce = 0;
      if (beta != 0) {
        const acc_t lse = row_logsumexp(sb, C, 1.0);
        const acc_t l = lam[b];
        ce = l * (lse - static_cast<acc_t>(sb[hard[b]])) +
             (1 - l) * (lse - static_cast<acc_t>(sb[hard[partner[b]]]));
      }
      ce_out[b] = ce;
    }
  });
}

template <typename T>
void backward_rows(acc_t g, const T* s, const T* t, const int64_t* hard, const int64_t* partner,
                   const float* lam, int64_t B, int64_t C, SoftLabelMode mode, acc_t inv_temp, acc_t beta,
                   T* gs) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(C);
    for (int64_t b = begin; b < end; ++b) {
      const T* sb = s + b * C;
      std::fill(row.begin(), row.end(), 0.0);
      if (t != nullptr) {
        const T* tb = t + b * C;
        if (mode == SoftLabelMode::kMSE) {
          const acc_t k = 2.0 / (static_cast<acc_t>(B) * C);
          for (int64_t c = 0; c < C; ++c) row[c] = k * (static_cast<acc_t>(sb[c]) - static_cast<acc_t>(tb[c]));
        } else {
          // d/ds KL(p_t || softmax(s/T)) / B = (softmax(s/T) - p_t) / (T * B)
          const acc_t lse_t = row_logsumexp(tb, C, inv_temp);
          const acc_t lse_s = row_logsumexp(sb, C, inv_temp);
          const acc_t k = inv_temp / static_cast<acc_t>(B);
          for (int64_t c = 0; c < C; ++c) {
            const acc_t q = std::exp(static_cast<acc_t>(sb[c]) * inv_temp - lse_s);
            const acc_t p = std::exp(static_cast<acc_t>(tb[c]) * inv_temp - lse_t);
            row[c] = k * (q - p);
          }
        }
      }
      if (beta != 0) {
        const acc_t lse = row_logsumexp(sb, C, 1.0);
        const acc_t k = beta / static_cast<acc_t>(B);
        for (int64_t c = 0; c < C; ++c) row[c] += k * std::exp(static_cast<acc_t>(sb[c]) - lse);
        const acc_t l = lam[b];
        row[hard[b]] -= k * l;
        row[hard[partner[b]]] -= k * (1 - l);
      }
      T* gb = gs + b * C;
      for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<T>(g * row[c]);
    }
  });
}

at::Tensor soft_label_loss_cpu(const at::Tensor& student, const c10::optional<at::Tensor>& target,
                               const at::Tensor& hard, const at::Tensor& partner, const at::Tensor& lam,
                               c10::string_view mode_name, double temperature, double beta) {
  check_soft_label_args(student, target, hard, partner, lam, temperature);
  const auto mode = parse_soft_label_mode(std::string(mode_name));
  const int64_t B = student.size(0), C = student.size(1);
  auto s = student.contiguous();
  const bool has_target = target.has_value() && target->defined();
  at::Tensor t = has_target ? target->to(student.scalar_type()).contiguous() : at::Tensor();
  auto h = hard.contiguous();
  auto p = partner.contiguous();
  auto l = lam.contiguous();
  check_label_ranges(h, p, B, C);
  std::vector<acc_t> main(B), ce(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "soft_label_loss_cpu", [&] {
    forward_rows<scalar_t>(s.data_ptr<scalar_t>(), has_target ? t.data_ptr<scalar_t>() : nullptr,
                           h.data_ptr<int64_t>(), p.data_ptr<int64_t>(), l.data_ptr<float>(), B, C, mode,
                           1.0 / temperature, beta, main.data(), ce.data());
  });
  acc_t main_sum = 0, ce_sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    main_sum += main[b];
    ce_sum += ce[b];
  }
  const acc_t main_mean = mode == SoftLabelMode::kMSE ? main_sum / (static_cast<acc_t>(B) * C) : main_sum / B;
  const acc_t total = main_mean + beta * ce_sum / B;
  return at::scalar_tensor(total, student.options().dtype(at::kFloat));
}

at::Tensor soft_label_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                        const c10::optional<at::Tensor>& target, const at::Tensor& hard,
                                        const at::Tensor& partner, const at::Tensor& lam, c10::string_view mode_name,
                                        double temperature, double beta) {
  check_soft_label_args(student, target, hard, partner, lam, temperature);
  const auto mode = parse_soft_label_mode(std::string(mode_name));
  const int64_t B = student.size(0), C = student.size(1);
  auto s = student.contiguous();
  const bool has_target = target.has_value() && target->defined();
  at::Tensor t = has_target ? target->to(student.scalar_type()).contiguous() : at::Tensor();
  auto h = hard.contiguous();
  auto p = partner.contiguous();
  auto l = lam.contiguous();
  check_label_ranges(h, p, B, C);
  const acc_t g = grad.item<double>();
  auto out = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "soft_label_loss_backward_cpu", [&] {
    backward_rows<scalar_t>(g, s.data_ptr<scalar_t>(), has_target ? t.data_ptr<scalar_t>() : nullptr,
                            h.data_ptr<int64_t>(), p.data_ptr<int64_t>(), l.data_ptr<float>(), B, C, mode,
                            1.0 / temperature, beta, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hello_fast, CPU, m) {
  m.impl("soft_label_loss", &soft_label_loss_cpu);
  m.impl("soft_label_loss_backward", &soft_label_loss_backward_cpu);
}

}  // namespace hello_fast
