// Self-tests of the CUDA emulation (see selftest.h). Written as CUDA, launched with <<<...>>> like the project's
// kernels, so they go through the same launch-line rewrite; tests/test_cuda_emulated.py checks what they write.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <fstream>
#include <vector>

#include "selftest.h"

namespace {

// every shuffle form the emulator offers, for two warps: out[(case * 64) + thread]
constexpr int kShuffleCases = 12;

__global__ void shuffles(int* out) {
  const int t = threadIdx.x;
  const int v = 100 * t + 7;
  int k = 0;
  out[64 * k++ + t] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[64 * k++ + t] = __shfl_xor_sync(0xffffffffu, v, 16);
  out[64 * k++ + t] = __shfl_xor_sync(0xffffffffu, v, 16, 16);  // later groups are out of reach: own value
  out[64 * k++ + t] = __shfl_xor_sync(0xffffffffu, v, 5, 8);
  out[64 * k++ + t] = __shfl_down_sync(0xffffffffu, v, 1);
  out[64 * k++ + t] = __shfl_down_sync(0xffffffffu, v, 5, 8);
  out[64 * k++ + t] = __shfl_up_sync(0xffffffffu, v, 3);
  out[64 * k++ + t] = __shfl_up_sync(0xffffffffu, v, 3, 8);
  out[64 * k++ + t] = __shfl_sync(0xffffffffu, v, 7);
  out[64 * k++ + t] = __shfl_sync(0xffffffffu, v, 37, 16);  // srcLane modulo width
  float s = static_cast<float>(t % 32) + 0.25f;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);  // a butterfly sum of the warp
  out[64 * k++ + t] = static_cast<int>(s * 4.f);
  int64_t w = (int64_t(1) << 40) + t;  // 8-byte values travel whole
  w = __shfl_down_sync(0xffffffffu, w, 2);
  out[64 * k++ + t] = static_cast<int>(w - (int64_t(1) << 40));
}

// threads >= 100 leave at once; the others still meet at the barrier and see each other's writes
__global__ void exited_drop_out(int* out) {
  __shared__ int cell[256];
  const int t = threadIdx.x;
  if (t >= 100) return;
  cell[t] = 3 * t;
  __syncthreads();
  out[t] = cell[99 - t];
}

__global__ void exited_lane_shuffle(int* out) {
  const int t = threadIdx.x;
  if (t >= 16) return;
  out[t] = __shfl_xor_sync(0xffffffffu, t, 1);  // names lanes 16-31, which have left
}

__global__ void divergent_barrier(int* out) {
  const int t = threadIdx.x;
  if (t < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = t;
}

__global__ void deadlock(int* out) {
  const int t = threadIdx.x;
  if (t == 0) {
    __syncthreads();  // waits for lanes that wait for it in the shuffle below
  } else {
    out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
  }
}

__global__ void spin(int* out) {
  __shared__ volatile int flag;
  if (threadIdx.x == 0) {
    flag = 0;  // shared memory starts poisoned, not zeroed
    while (flag == 0) {
    }
    out[0] = 1;
  }
}

// each block reports the shared words it finds on entry, then writes them: a later block must find the poison again
__global__ void shared_starts_poisoned(int* out) {
  __shared__ int cell[64];
  __shared__ float partial[8];
  const int t = threadIdx.x, b = blockIdx.x;
  out[128 * b + t] = cell[t];
  if (t < 8) out[128 * b + 64 + t] = std::isnan(partial[t]) ? 1 : 0;
  __syncthreads();
  cell[t] = 1000 * (b + 1) + t;
  if (t < 8) partial[t] = 0.f;
}

__global__ void count_blocks(int* out) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) out[0] += 1;
}

void write(const std::string& dir, const std::string& name, const void* data, size_t bytes) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

std::vector<float> read_floats(const std::string& dir, const std::string& name) {
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
  std::vector<float> v(static_cast<size_t>(f.tellg()) / sizeof(float));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  return v;
}

}  // namespace

namespace emu_selftest {

int run(const std::string& name, const std::string& dir) {
  std::vector<int> out(kShuffleCases * 64, -1);
  if (name == "shuffles") {
    shuffles<<<1, 64>>>(out.data());
  } else if (name == "exited_drop_out") {
    exited_drop_out<<<dim3(2), dim3(256)>>>(out.data());  // two blocks: the block state resets between them
    out.resize(100);
  } else if (name == "exited_lane_shuffle") {
    exited_lane_shuffle<<<1, 32>>>(out.data());
  } else if (name == "divergent_barrier") {
    divergent_barrier<<<1, 64>>>(out.data());
  } else if (name == "deadlock") {
    deadlock<<<1, 32>>>(out.data());
  } else if (name == "shared_starts_poisoned") {
    shared_starts_poisoned<<<2, 64>>>(out.data());
    out.resize(256);
  } else if (name == "spin") {
    spin<<<1, 32>>>(out.data());
  } else if (name == "launch_bounds") {
    // each launch's error code, then how many blocks ran in all (only the valid launches run)
    const dim3 blocks[] = {dim3(1025), dim3(32, 32, 2), dim3(1, 1, 65), dim3(0), dim3(1024), dim3(4, 4, 64)};
    const dim3 grids[] = {dim3(1, 65536), dim3(1, 1, 65536), dim3(0, 1), dim3(3, 2, 2)};
    std::vector<int> codes;
    int ran = 0;
    for (const dim3& b : blocks) {
      count_blocks<<<1, b>>>(&ran);
      codes.push_back(cudaGetLastError());
    }
    for (const dim3& g : grids) {
      count_blocks<<<g, 32>>>(&ran);
      codes.push_back(cudaGetLastError());
    }
    count_blocks<<<1, 32, 48 * 1024 + 4>>>(&ran);
    codes.push_back(cudaGetLastError());
    codes.push_back(ran);
    write(dir, "out", codes.data(), codes.size() * sizeof(int));
    return 0;
  } else if (name == "half") {
    const auto x = read_floats(dir, "x");
    std::vector<uint16_t> h(x.size()), bf(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      h[i] = __float2half_rn(x[i]).__x;
      bf[i] = __float2bfloat16_rn(x[i]).__x;
    }
    std::vector<float> back(65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      __half v;
      v.__x = static_cast<uint16_t>(i);
      back[i] = __half2float(v);
    }
    write(dir, "half", h.data(), h.size() * 2);
    write(dir, "bf16", bf.data(), bf.size() * 2);
    write(dir, "half_to_float", back.data(), back.size() * 4);
    return 0;
  } else {
    return 2;
  }
  const int err = cudaGetLastError();
  write(dir, "out", out.data(), out.size() * sizeof(int));
  return err == cudaSuccess ? 0 : 3;
}

}  // namespace emu_selftest
