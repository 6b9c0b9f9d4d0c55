// CPU kernels of hello_fast::soft_label_loss(_with_grad): rows split across threads, each row in a few vectorised
// passes (max, sum of exp with the exponentials kept, dot products), float math with double totals; the gradient
// comes from the same exponentials.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../cpu_dispatch.h"
#include "../soft_label_loss.h"

// cpu_default or cpu_avx2: this file is compiled once per CPU build (csrc/cpu_dispatch.h)
namespace hello_fast::HELLO_FAST_CPU_NAMESPACE {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
  if (n >= kW) {
    Vec vm = Vec::loadu(x);
    for (c = kW; c + kW <= n; c += kW) vm = at::vec::maximum(vm, Vec::loadu(x + c));
    m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// sum_c exp((x[c] - m) * k), keeping each exponential in e (if given)
float sum_exp(const float* x, int64_t n, float m, float k, float* e) {
  Vec acc(0.0f);
  const Vec vm(m), vk(k);
  int64_t c = 0;
  for (; c + kW <= n; c += kW) {
    const Vec v = ((Vec::loadu(x + c) - vm) * vk).exp_u20();  // arguments <= 0; 20 ulp is ~2e-6
    if (e) v.store(e + c);
    acc = acc + v;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    const float v = std::exp((x[c] - m) * k);
    if (e) e[c] = v;
    s += v;
  }
  return s;
}

// sum_c a[c] * (b[c] - d[c])
float dot_diff(const float* a, const float* b, const float* d, int64_t n) {
  Vec acc(0.0f);
  int64_t c = 0;
  for (; c + kW <= n; c += kW) acc = acc + Vec::loadu(a + c) * (Vec::loadu(b + c) - Vec::loadu(d + c));
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; c < n; ++c) s += a[c] * (b[c] - d[c]);
  return s;
}

float sum_sq_diff(const float* a, const float* b, int64_t n) {
  Vec acc(0.0f);
  int64_t c = 0;
  for (; c + kW <= n; c += kW) {
    const Vec d = Vec::loadu(a + c) - Vec::loadu(b + c);
    acc = acc + d * d;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; c < n; ++c) s += (a[c] - b[c]) * (a[c] - b[c]);
  return s;
}

// One row as float: a pointer into the input when it is float, else converted into `buf`.
template <typename T>
const float* as_float(const T* x, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    buf.resize(n);
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<float>(x[c]);
    return buf.data();
  }
}

struct Args {
  int64_t B, C;
  SoftLabelMode mode;
  float inv_t;
  double beta;
  const int64_t* hard;
  const int64_t* partner;
  const float* lam;
};

void check_label_ranges(const at::Tensor& hard, const at::Tensor& partner, int64_t B, int64_t C) {
  const int64_t* h = hard.data_ptr<int64_t>();
  const int64_t* p = partner.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(h[b] >= 0 && h[b] < C, "soft_label_loss: hard[", b, "] = ", h[b], " is not a class in [0, ", C, ")");
    TORCH_CHECK(p[b] >= 0 && p[b] < B, "soft_label_loss: partner[", b, "] = ", p[b], " is not a batch row in [0, ", B, ")");
  }
}

// Per row: the loss terms, and (if grad != nullptr) d loss / d row, from one set of passes over the logits.
template <typename T>
void rows(const T* s_in, const T* t_in, const Args& a, double* main_out, double* ce_out, T* grad) {
  const int64_t B = a.B, C = a.C;
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
    std::vector<float> bs, bt, es, et, e1, gbuf;
    for (int64_t b = begin; b < end; ++b) {
      const float* s = as_float(s_in + b * C, C, bs);
      // the gradient row: the output itself for float logits, else a float buffer converted at the end
      float* g = nullptr;
      if (grad) {
        if constexpr (std::is_same_v<T, float>) {
          g = grad + b * C;
        } else {
          gbuf.resize(C);
          g = gbuf.data();
        }
      }
      double main = 0;
      float m_s = 0, lse1 = 0;
      bool have_lse1 = false, have_m_s = false;
      const float* softmax_e = nullptr;  // exp(s - m_s) when T == 1 (shared with the CE term)
      float softmax_sum = 0;
      int64_t c;
      if (t_in != nullptr) {
        const float* t = as_float(t_in + b * C, C, bt);
        if (a.mode == SoftLabelMode::kMSE) {
          if (grad) {  // squared error and its gradient in one pass
            const float kf = 2.0f / (static_cast<float>(B) * C);
            const Vec k(kf);
            Vec acc(0.0f);
            for (c = 0; c + kW <= C; c += kW) {
              const Vec d = Vec::loadu(s + c) - Vec::loadu(t + c);
              acc = acc + d * d;
              (k * d).store(g + c);
            }
            float sq = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
            for (; c < C; ++c) {
              const float d = s[c] - t[c];
              sq += d * d;
              g[c] = kf * d;
            }
            main = sq;
          } else {
            main = sum_sq_diff(s, t, C);
          }
        } else {
          es.resize(C);
          et.resize(C);
          m_s = row_max(s, C);
          have_m_s = true;
          const float m_t = row_max(t, C);
          const float sum_t = sum_exp(t, C, m_t, a.inv_t, et.data());
          const float sum_s = sum_exp(s, C, m_s, a.inv_t, es.data());
          const double lse_t = static_cast<double>(m_t) * a.inv_t + std::log(static_cast<double>(sum_t));
          const double lse_s = static_cast<double>(m_s) * a.inv_t + std::log(static_cast<double>(sum_s));
          // KL = sum p (t - s) / T - lse_t + lse_s, with p = et / sum_t
          main = a.inv_t * static_cast<double>(dot_diff(et.data(), t, s, C)) / sum_t - lse_t + lse_s;
          if (grad) {  // (softmax(s/T) - p) / (T B)
            const float k = a.inv_t / static_cast<float>(B);
            const Vec kq(k / sum_s), kp(k / sum_t);
            for (c = 0; c + kW <= C; c += kW)
              (kq * Vec::loadu(es.data() + c) - kp * Vec::loadu(et.data() + c)).store(g + c);
            for (; c < C; ++c) g[c] = k / sum_s * es[c] - k / sum_t * et[c];
          }
          if (a.inv_t == 1.0f) {
            lse1 = static_cast<float>(lse_s);
            have_lse1 = true;
            softmax_e = es.data();
            softmax_sum = sum_s;
          }
        }
      } else if (grad) {
        std::fill(g, g + C, 0.0f);
      }
      main_out[b] = main;
      double ce = 0;
      if (a.beta != 0) {
        if (!have_lse1) {
          const float m = have_m_s ? m_s : row_max(s, C);
          e1.resize(C);
          softmax_sum = sum_exp(s, C, m, 1.0f, e1.data());
          softmax_e = e1.data();
          lse1 = m + std::log(softmax_sum);
        }
        const float l = a.lam[b];
        const int64_t h = a.hard[b], hp = a.hard[a.partner[b]];
        ce = l * (static_cast<double>(lse1) - s[h]) + (1 - l) * (static_cast<double>(lse1) - s[hp]);
        if (grad) {  // beta / B * (softmax(s) - lam onehot(h) - (1 - lam) onehot(h_partner))
          const float kb = static_cast<float>(a.beta / B);
          const Vec kc(kb / softmax_sum);
          for (c = 0; c + kW <= C; c += kW) (Vec::loadu(g + c) + kc * Vec::loadu(softmax_e + c)).store(g + c);
          for (; c < C; ++c) g[c] += kb / softmax_sum * softmax_e[c];
          g[h] -= kb * l;
          g[hp] -= kb * (1 - l);
        }
      }
      ce_out[b] = ce;
      if constexpr (!std::is_same_v<T, float>) {
        if (grad) {
          T* o = grad + b * C;
          for (c = 0; c < C; ++c) o[c] = static_cast<T>(g[c]);
        }
      }
    }
  });
}

struct Prepared {
  at::Tensor s, t, hard, partner, lam;
  Args args;
};

Prepared prepare(const at::Tensor& student, const c10::optional<at::Tensor>& target, const at::Tensor& hard,
                 const at::Tensor& partner, const at::Tensor& lam, c10::string_view mode_name, double temperature,
                 double beta) {
  check_soft_label_args(student, target, hard, partner, lam, temperature);
  Prepared p;
  p.s = student.contiguous();
  if (target.has_value() && target->defined()) p.t = target->to(student.scalar_type()).contiguous();
  p.hard = hard.contiguous();
  p.partner = partner.contiguous();
  p.lam = lam.contiguous();
  const int64_t B = student.size(0), C = student.size(1);
  check_label_ranges(p.hard, p.partner, B, C);
  p.args = Args{B, C, parse_soft_label_mode(std::string(mode_name)), static_cast<float>(1.0 / temperature), beta,
                p.hard.data_ptr<int64_t>(), p.partner.data_ptr<int64_t>(), p.lam.data_ptr<float>()};
  return p;
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& student, const c10::optional<at::Tensor>& target,
                                       const at::Tensor& hard, const at::Tensor& partner, const at::Tensor& lam,
                                       c10::string_view mode, double temperature, double beta, bool with_grad) {
  auto p = prepare(student, target, hard, partner, lam, mode, temperature, beta);
  const int64_t B = p.args.B, C = p.args.C;
  std::vector<double> main(B), ce(B);
  at::Tensor grad = with_grad ? at::empty_like(p.s) : at::Tensor();
  auto call = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    rows<T>(p.s.data_ptr<T>(), p.t.defined() ? p.t.data_ptr<T>() : nullptr, p.args, main.data(), ce.data(),
            with_grad ? grad.data_ptr<T>() : nullptr);
  };
  switch (p.s.scalar_type()) {  // check_soft_label_args admits float32, float16 and bfloat16 only
    case at::kFloat: call(static_cast<float*>(nullptr)); break;
    case at::kHalf: call(static_cast<at::Half*>(nullptr)); break;
    default: call(static_cast<at::BFloat16*>(nullptr));
  }
  double main_sum = 0, ce_sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    main_sum += main[b];
    ce_sum += ce[b];
  }
  const double main_mean = p.args.mode == SoftLabelMode::kMSE ? main_sum / (static_cast<double>(B) * C) : main_sum / B;
  return {at::scalar_tensor(main_mean + beta * ce_sum / B, student.options().dtype(at::kFloat)), grad};
}

at::Tensor soft_label_loss_cpu(const at::Tensor& student, const c10::optional<at::Tensor>& target, const at::Tensor& hard,
                               const at::Tensor& partner, const at::Tensor& lam, c10::string_view mode, double temperature,
                               double beta) {
  return std::get<0>(run(student, target, hard, partner, lam, mode, temperature, beta, false));
}

std::tuple<at::Tensor, at::Tensor> soft_label_loss_with_grad_cpu(const at::Tensor& student,
                                                                 const c10::optional<at::Tensor>& target,
                                                                 const at::Tensor& hard, const at::Tensor& partner,
                                                                 const at::Tensor& lam, c10::string_view mode,
                                                                 double temperature, double beta) {
  return run(student, target, hard, partner, lam, mode, temperature, beta, true);
}

}  // namespace
}  // namespace hello_fast::HELLO_FAST_CPU_NAMESPACE

HELLO_FAST_CPU_KERNEL(soft_label_loss, soft_label_loss_cpu)
HELLO_FAST_CPU_KERNEL(soft_label_loss_with_grad, soft_label_loss_with_grad_cpu)
