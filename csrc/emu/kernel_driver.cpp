// Runs the project's CUDA kernels, compiled for the CPU through the SIMT emulation in cuda_runtime.h, on inputs
// written by tests/test_cuda_emulated.py:
//   kernel_driver augment_mix DIR | soft_label_loss DIR | selftest NAME DIR
// DIR holds args.txt ("name value..." per line) and raw little-endian arrays NAME.bin; outputs are written beside
// them, with status.txt holding the launch's cudaError_t. It fills the kernels' argument structs as the torch
// launchers (csrc/ops/cuda/*_cuda.cpp) do. Every array is allocated at its exact size and outputs start as NaN
// bytes (0xff), so a read or write past an array is a heap overflow for AddressSanitizer and an unwritten output
// element shows up as NaN.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "launch.h"
#include "selftest.h"

namespace {

using hello_fast::cuda::AugmentMixArgs;
using hello_fast::cuda::SoftLabelLossArgs;

struct Args {
  std::map<std::string, std::vector<std::string>> v;
  std::string dir;

  explicit Args(const std::string& d) : dir(d) {
    std::ifstream f(dir + "/args.txt");
    if (!f) emu::fail("cannot read " + dir + "/args.txt");
    std::string line;
    while (std::getline(f, line)) {
      std::istringstream ss(line);
      std::string key, word;
      ss >> key;
      while (ss >> word) v[key].push_back(word);
    }
  }
  const std::string& word(const std::string& k, size_t i = 0) const {
    auto it = v.find(k);
    if (it == v.end() || it->second.size() <= i) emu::fail("args.txt lacks " + k + "[" + std::to_string(i) + "]");
    return it->second[i];
  }
  int64_t i(const std::string& k, size_t j = 0) const { return std::stoll(word(k, j)); }
  double d(const std::string& k, size_t j = 0) const { return std::stod(word(k, j)); }

  template <typename T>
  std::vector<T> array(const std::string& name, size_t count) const {
    std::vector<T> out(count);
    std::ifstream f(dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
    if (!f) emu::fail("cannot read " + name + ".bin");
    const auto size = static_cast<size_t>(f.tellg());
    if (size != count * sizeof(T)) {
      emu::fail(name + ".bin holds " + std::to_string(size) + " bytes, expected " + std::to_string(count * sizeof(T)));
    }
    f.seekg(0);
    f.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(size));
    return out;
  }
  void write(const std::string& name, const void* data, size_t bytes) const {
    std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
    f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  }
  void status(cudaError_t e) const { std::ofstream(dir + "/status.txt") << static_cast<int>(e) << "\n"; }
};

size_t dtype_size(int code) { return code == hello_fast::cuda::kF32 ? 4 : 2; }

int run_augment_mix(const Args& g) {
  const int64_t B = g.i("batch"), V = g.i("views");
  auto src = g.array<uint8_t>("src", static_cast<size_t>(g.i("src_numel")));
  auto index = g.array<int64_t>("index", B);
  auto crop = g.array<int64_t>("crop", 4 * B);
  auto flip = g.array<uint8_t>("flip", B);  // bytes 0/1, read by the kernel as bool
  auto partner = g.array<int64_t>("partner", B);
  auto lam = g.array<float>("lam", B);
  auto cut = g.array<int64_t>("cut", 4 * B);
  const int64_t factor = g.v.count("shuffle_factor") ? g.i("shuffle_factor") : 0;  // 0: no ShufflePatches
  std::vector<int64_t> shuffle;
  if (factor > 0) shuffle = g.array<int64_t>("shuffle", static_cast<size_t>(2 * factor * B));
  AugmentMixArgs a{};
  a.src = src.data();
  a.s_n = g.i("src_stride", 0);
  a.s_c = g.i("src_stride", 1);
  a.s_h = g.i("src_stride", 2);
  a.s_w = g.i("src_stride", 3);
  a.num_images = g.i("src_shape", 0);
  a.height = g.i("src_shape", 2);
  a.width = g.i("src_shape", 3);
  a.index = index.data();
  a.crop = crop.data();
  a.flip = reinterpret_cast<const bool*>(flip.data());
  a.partner = partner.data();
  a.lam = lam.data();
  a.cut = cut.data();
  a.shuffle = factor > 0 ? shuffle.data() : nullptr;
  a.shuffle_factor = factor;
  a.batch = B;
  a.out_size = g.i("out_size");
  a.mode = static_cast<int>(g.i("mode"));
  a.num_views = static_cast<int>(V);
  if (V > hello_fast::kMaxViews) emu::fail("more views than kMaxViews");
  std::vector<std::vector<uint8_t>> views(V);
  for (int k = 0; k < V; ++k) {
    const std::string key = "view" + std::to_string(k);
    const int dtype = static_cast<int>(g.i(key, 0));
    views[k].assign(static_cast<size_t>(g.i(key, 1)) * dtype_size(dtype), 0xff);
    a.view[k] = views[k].data();
    a.view_dtype[k] = dtype;
    for (int d = 0; d < 4; ++d) a.view_stride[k][d] = g.i(key, 2 + d);
    for (int c = 0; c < 3; ++c) {
      a.mean[k][c] = static_cast<float>(g.d(key, 6 + c));
      a.inv_std[k][c] = static_cast<float>(g.d(key, 9 + c));
    }
  }
  const cudaError_t err = hello_fast::cuda::launch_augment_mix(a, nullptr);
  g.status(err);
  for (int k = 0; k < V; ++k) g.write("out_view" + std::to_string(k), views[k].data(), views[k].size());
  return 0;
}

int run_soft_label_loss(const Args& g) {
  const int64_t B = g.i("batch"), C = g.i("classes");
  const int dtype = static_cast<int>(g.i("dtype"));
  const size_t es = dtype_size(dtype);
  auto student = g.array<uint8_t>("student", static_cast<size_t>(g.i("student_numel")) * es);
  std::vector<uint8_t> target;
  if (g.i("has_target")) target = g.array<uint8_t>("target", static_cast<size_t>(g.i("target_numel")) * es);
  auto hard = g.array<int64_t>("hard", B);
  auto partner = g.array<int64_t>("partner", B);
  auto lam = g.array<float>("lam", B);
  std::vector<float> rows(2 * B);
  std::memset(rows.data(), 0xff, rows.size() * sizeof(float));
  std::vector<uint8_t> grad;
  if (g.i("with_grad")) grad.assign(static_cast<size_t>(B * C) * es, 0xff);
  SoftLabelLossArgs a{};
  a.student = student.data();
  a.target = target.empty() ? nullptr : target.data();
  a.dtype = dtype;
  a.s_row = g.i("s_row");
  a.t_row = g.i("t_row");
  a.hard = hard.data();
  a.partner = partner.data();
  a.lam = lam.data();
  a.rows = rows.data();
  a.grad = grad.empty() ? nullptr : grad.data();
  a.batch = B;
  a.classes = C;
  a.inv_t = static_cast<float>(g.d("inv_t"));
  a.beta = static_cast<float>(g.d("beta"));
  a.kl = g.i("kl") != 0;
  a.with_ce = g.d("beta") != 0;
  const cudaError_t err = hello_fast::cuda::launch_soft_label_loss(a, nullptr);
  g.status(err);
  g.write("out_rows", rows.data(), rows.size() * sizeof(float));
  if (!grad.empty()) g.write("out_grad", grad.data(), grad.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: kernel_driver augment_mix DIR | soft_label_loss DIR | selftest NAME DIR\n";
    return 2;
  }
  const std::string what = argv[1];
  if (what == "augment_mix") return run_augment_mix(Args(argv[2]));
  if (what == "soft_label_loss") return run_soft_label_loss(Args(argv[2]));
  if (what == "selftest" && argc == 4) return emu_selftest::run(argv[2], argv[3]);
  std::cerr << "kernel_driver: unknown command " << what << "\n";
  return 2;
}
