// C++ test of the hello_fast::augment_mix CPU kernel against ATen's upsample_bilinear2d, per sample (run by ctest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(const std::string& what, bool ok, const std::string& detail = "") {
  std::cout << (ok ? "ok   " : "FAIL ") << what << (detail.empty() ? "" : " (" + detail + ")") << "\n";
  if (!ok) ++failures;
}

using Op = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, int64_t,
                                   at::ArrayRef<double>, at::ArrayRef<double>, at::IntArrayRef, bool,
                                   const c10::optional<at::Tensor>&);

at::Tensor base_of(const at::Tensor& src, int64_t idx, const int64_t* cr, bool flip, int64_t out) {
  auto crop = src[idx].slice(1, cr[0], cr[0] + cr[2]).slice(2, cr[1], cr[1] + cr[3]).to(at::kFloat).unsqueeze(0);
  auto img = at::upsample_bilinear2d(crop, {out, out}, /*align_corners=*/false)[0];
  return flip ? img.flip({2}) : img;
}

void check_mode(const std::string& mode, int64_t B, int64_t out) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("hello_fast::augment_mix", "").typed<Op>();
  const int64_t S = 5, H = 23, W = 31;
  auto src = at::randint(0, 256, {S, 3, H, W}, at::kByte);
  auto index = at::randint(0, S, {B}, at::kLong);
  auto crop = at::empty({B, 4}, at::kLong);
  auto cut = at::empty({B, 4}, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t h = 1 + at::randint(0, H, {1}).item<int64_t>(), w = 1 + at::randint(0, W, {1}).item<int64_t>();
    crop[b][0] = at::randint(0, H - h + 1, {1}).item<int64_t>();
    crop[b][1] = at::randint(0, W - w + 1, {1}).item<int64_t>();
    crop[b][2] = h;
    crop[b][3] = w;
    const int64_t t0 = at::randint(0, out + 1, {1}).item<int64_t>(), l0 = at::randint(0, out + 1, {1}).item<int64_t>();
    cut[b][0] = t0;
    cut[b][1] = l0;
    cut[b][2] = t0 + at::randint(0, out - t0 + 1, {1}).item<int64_t>();
    cut[b][3] = l0 + at::randint(0, out - l0 + 1, {1}).item<int64_t>();
  }
  auto flip = at::rand({B}) < 0.5;
  auto partner = at::randperm(B, at::kLong);
  auto lam = at::rand({B});
  const std::vector<double> mean = {0.485, 0.456, 0.406}, std = {0.229, 0.224, 0.225};
  auto views = op.call(src, index, crop, flip, partner, lam, cut, mode, out, mean, std, {0}, false, c10::nullopt);
  std::vector<at::Tensor> bases;
  for (int64_t b = 0; b < B; ++b) {
    bases.push_back(base_of(src, index[b].item<int64_t>(), crop[b].contiguous().data_ptr<int64_t>(), flip[b].item<bool>(), out));
  }
  double worst = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = partner[b].item<int64_t>();
    at::Tensor x = bases[b].clone();
    if (mode == "mixup") {
      const float l = lam[b].item<float>();
      x = bases[b] * l + bases[p] * (1 - l);
    } else if (mode == "cutmix") {
      auto k = cut[b];
      const int64_t t0 = k[0].item<int64_t>(), l0 = k[1].item<int64_t>(), b1 = k[2].item<int64_t>(), r1 = k[3].item<int64_t>();
      x.slice(1, t0, b1).slice(2, l0, r1).copy_(bases[p].slice(1, t0, b1).slice(2, l0, r1));
    }
    auto m = at::tensor(mean, at::kFloat).view({3, 1, 1}), s = at::tensor(std, at::kFloat).view({3, 1, 1});
    auto want = (x / 255 - m) / s;
    worst = std::max(worst, (views[0][b] - want).abs().max().item<double>());
  }
  expect("augment_mix " + mode + " B=" + std::to_string(B) + " out=" + std::to_string(out), worst <= 2e-3,
         "max error " + std::to_string(worst));
}

// the op refuses what every backend refuses (the Python op checks the same first)
bool refused(const std::vector<double>& mean, const std::vector<double>& std, const std::vector<int64_t>& dtypes,
             const at::Tensor& crop) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("hello_fast::augment_mix", "").typed<Op>();
  try {
    auto src = at::zeros({2, 3, 8, 8}, at::kByte);
    op.call(src, at::zeros({1}, at::kLong), crop, at::zeros({1}, at::kBool), at::zeros({1}, at::kLong), at::ones({1}),
            at::zeros({1, 4}, at::kLong), "none", 4, mean, std, dtypes, false, c10::nullopt);
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const std::string mode : {"none", "mixup", "cutmix"}) {
    for (auto [B, out] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 8}, {7, 17}, {3, 45}, {2, 224}}) {
      check_mode(mode, B, out);
    }
  }
  const auto inside = at::tensor({0, 0, 8, 8}, at::kLong).view({1, 4});
  expect("crop outside the image is refused",
         refused({0.5, 0.5, 0.5}, {0.5, 0.5, 0.5}, {0}, at::tensor({0, 0, 9, 8}, at::kLong).view({1, 4})));
  expect("four views are written", !refused(std::vector<double>(12, 0.5), std::vector<double>(12, 0.5), {0, 1, 2, 0}, inside));
  expect("a fifth view is refused", refused(std::vector<double>(15, 0.5), std::vector<double>(15, 0.5), {0, 1, 2, 0, 0}, inside));
  if (failures) {
    std::cerr << failures << " checks failed\n";
    return 1;
  }
  std::cout << "all augment_mix checks passed\n";
  return 0;
}
