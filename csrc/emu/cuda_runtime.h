// SIMT emulation of the CUDA runtime for executing the project's .cu kernels on the CPU under g++ (tests only).
//
// Each CUDA thread is a host thread; the blocks of a grid run one after another. `__shared__` is static storage
// (one block at a time shares it), poisoned at the start of every block (bytes 0xff: NaN as float, half and
// bfloat16, -1 as an integer), as a GPU gives a block whatever its SM held last: a kernel that reads shared memory
// it did not write gets NaN, not a zero that happens to be right (HELLO_FAST_EMU_SHARED=zero starts blocks zeroed
// instead, to show what zeroed memory hides). `__syncthreads()` is a barrier that exited threads drop out of, and the warp
// shuffles go through a per-warp exchange that checks every lane named in the mask is alive and at the same call.
// Launches check CUDA's bounds (block <= 1024 threads, grid y/z <= 65535, ...) and report them through
// cudaGetLastError like the real runtime. Misuse that CUDA leaves undefined (a shuffle naming an exited lane,
// threads of a block waiting at different barriers, a deadlock) aborts with a "cuda-emu:" message.
//
// Schedules (HELLO_FAST_EMU_SCHEDULE): "forward" (default) and "reverse" run one thread at a time, handing over at
// every barrier, shuffle and exit in thread order (or its reverse): deterministic, so a missing barrier shows up
// as a wrong result every time, and a deadlock is detected exactly. "free" runs the block's threads concurrently
// (for ThreadSanitizer). A watchdog aborts when no thread reaches a barrier, shuffle or exit for
// HELLO_FAST_EMU_WATCHDOG_S seconds (default 30): a spinning thread.
//
// The source changes a .cu file needs, both made on the same line by tests/test_cuda_emulated.py: its launch lines,
// `k<<<grid, block, smem, stream>>>(args);` becomes `::emu::launch(::emu::Config(grid, block, smem, stream)
// .named("k"), k, args);`, and each `__shared__ T name[...];` is followed by `::emu::shared_declared(&name,
// sizeof(name));`, which tells the emulator where the variable lives (g++ ignores a section attribute on the
// static locals of function templates, so the header alone cannot find them).
// Not emulated: fast-math precision (__expf is expf), concurrency between blocks, atomics, timing.
#pragma once

#include <math.h>

#include <atomic>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
using cudaStream_t = struct CUstream_st*;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// glibc declares these fast-math names but does not export them: plain single-precision math here
extern "C" inline float __expf(float x) noexcept { return expf(x); }
extern "C" inline float __logf(float x) noexcept { return logf(x); }

namespace emu {

inline cudaError_t last_error = cudaSuccess;

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuda-emu: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

struct Site {
  const char* file = "";
  unsigned line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const { return std::string(file) + ":" + std::to_string(line); }
};
inline Site site_of(const std::source_location& l) { return Site{l.file_name(), l.line()}; }

enum class Schedule { kForward, kReverse, kFree };
enum Where : int { kRunning = 0, kAtBarrier = 1, kAtShuffle = 2, kExited = 3 };
enum class Shfl { kIdx, kUp, kDown, kXor, kSync };

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  uint32_t present = 0, alive = 0;  // lanes that exist in the block / have not exited this block
  uint32_t arrived = 0, mask = 0;   // the exchange being gathered
  Shfl kind = Shfl::kSync;
  int arg = 0, width = 32;
  Site site;
  uint64_t value[32] = {}, result[32] = {};
  uint64_t gen = 0;
  std::vector<int> waiters;
};

// The threads of the running block and their synchronisation; one launch at a time.
struct Block {
  int n = 0;
  Schedule schedule = Schedule::kForward;
  std::mutex m;  // __syncthreads and the end-of-block rendezvous
  std::condition_variable cv;
  int alive = 0, arrived = 0;
  uint64_t gen = 0;
  Site site;
  std::vector<int> waiters;
  int finished = 0;
  uint64_t block_gen = 0;
  std::vector<std::unique_ptr<Warp>> warps;
  // the baton of the serial schedules: only its holder runs
  std::mutex bm;
  std::vector<std::unique_ptr<std::condition_variable>> bcv;
  std::vector<char> ready;
  int holder = 0;
  std::unique_ptr<std::atomic<int>[]> where;
  std::atomic<uint64_t> progress{0};
  std::string kernel;

  // relaxed: the watchdog's bookkeeping must not order the threads (ThreadSanitizer would then miss races)
  void tick() { progress.fetch_add(1, std::memory_order_relaxed); }
  void set_where(int t, Where w) { where[t].store(w, std::memory_order_relaxed); }
  bool serial() const { return schedule != Schedule::kFree; }
  int first() const { return schedule == Schedule::kReverse ? n - 1 : 0; }
  int next(int t) const { return schedule == Schedule::kReverse ? (t + n - 1) % n : (t + 1) % n; }

  std::string dump() {
    static const char* names[] = {"running or waiting for their turn", "at __syncthreads", "at a shuffle", "exited"};
    std::string s = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                    std::to_string(blockIdx.z) + ") of " + kernel + ":";
    for (int t = 0; t < n;) {
      int u = t;
      const int w = where[t].load(std::memory_order_relaxed);
      while (u + 1 < n && where[u + 1].load(std::memory_order_relaxed) == w) ++u;
      s += " threads " + std::to_string(t) + "-" + std::to_string(u) + " " + names[w] + ";";
      t = u + 1;
    }
    return s;
  }

  // serial schedules: `t` stops running (it waits, or has finished); hand the baton to the next ready thread
  void pass(int t, bool t_ready) {
    if (!serial()) return;
    std::unique_lock<std::mutex> lk(bm);
    ready[t] = t_ready;
    for (int i = 0, u = next(t); i < n; ++i, u = next(u)) {
      if (ready[u]) {
        holder = u;
        bcv[u]->notify_one();
        return;
      }
    }
    lk.unlock();
    fail("deadlock: no thread can run; " + dump());
  }
  void make_ready(const std::vector<int>& ts) {
    if (!serial()) return;
    std::lock_guard<std::mutex> lk(bm);
    for (int t : ts) ready[t] = 1;
  }
  void acquire(int t) {
    if (!serial()) return;
    std::unique_lock<std::mutex> lk(bm);
    bcv[t]->wait(lk, [&] { return holder == t; });
  }
};

inline Block* g_block = nullptr;
inline thread_local int g_tid = 0;

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// The __shared__ variables met so far (address, bytes): filled with the poison byte when first declared and at the
// start of every later block. A block start runs with no block thread running (at launch, and by the last thread
// to leave a block, under the block's lock), and a first declaration under shared_m, which every thread passes
// before touching the variable: the fill is ordered before every read.
struct SharedVariable {
  void* p;
  size_t bytes;
};
inline std::mutex shared_m;
inline std::vector<SharedVariable> shared_variables;

inline unsigned char shared_fill() {
  static const unsigned char fill = [] {
    const char* v = std::getenv("HELLO_FAST_EMU_SHARED");
    const std::string s = v ? v : "poison";
    if (s != "poison" && s != "zero") fail("HELLO_FAST_EMU_SHARED must be poison or zero, got '" + s + "'");
    return static_cast<unsigned char>(s == "poison" ? 0xff : 0x00);
  }();
  return fill;
}

inline void poison_shared() {
  std::lock_guard<std::mutex> lk(shared_m);
  for (const SharedVariable& v : shared_variables) std::memset(v.p, shared_fill(), v.bytes);
}

template <typename T>
void shared_declared(T* variable, size_t bytes) {
  void* p = const_cast<void*>(static_cast<const volatile void*>(variable));
  std::lock_guard<std::mutex> lk(shared_m);
  for (const SharedVariable& v : shared_variables) {
    if (v.p == p) return;
  }
  shared_variables.push_back({p, bytes});
  std::memset(p, shared_fill(), bytes);
}

inline Schedule schedule_from_env() {
  const char* v = std::getenv("HELLO_FAST_EMU_SCHEDULE");
  const std::string s = v ? v : "forward";
  if (s == "forward") return Schedule::kForward;
  if (s == "reverse") return Schedule::kReverse;
  if (s == "free") return Schedule::kFree;
  fail("HELLO_FAST_EMU_SCHEDULE must be forward, reverse or free, got '" + s + "'");
}

inline void syncthreads(Site site) {
  Block& B = *g_block;
  const int t = g_tid;
  std::unique_lock<std::mutex> lk(B.m);
  B.tick();
  if (B.arrived > 0 && !(B.site == site)) {
    fail("threads of one block wait at different __syncthreads (" + B.site.str() + " and " + site.str() + "); " +
         B.dump());
  }
  B.site = site;
  if (++B.arrived == B.alive) {  // the last one releases the others and runs on
    B.arrived = 0;
    B.gen++;
    B.make_ready(B.waiters);
    B.waiters.clear();
    B.cv.notify_all();
    return;
  }
  B.waiters.push_back(t);
  B.set_where(t, kAtBarrier);
  const uint64_t g = B.gen;
  lk.unlock();
  B.pass(t, false);
  lk.lock();
  B.cv.wait(lk, [&] { return B.gen != g; });
  lk.unlock();
  B.acquire(t);
  B.set_where(t, kRunning);
}

// source lane of `lane` for a shuffle, as the CUDA programming guide defines them (own lane where it says so)
inline int source_lane(Shfl kind, int lane, int arg, int width) {
  const int base = lane & ~(width - 1), off = lane & (width - 1);
  switch (kind) {
    case Shfl::kIdx: return base + (arg & (width - 1));
    case Shfl::kUp: return off - arg >= 0 ? lane - arg : lane;
    case Shfl::kDown: return off + arg < width ? lane + arg : lane;
    case Shfl::kXor: {
      const int src = lane ^ arg;
      return src >= base + width ? lane : src;  // later groups of `width` lanes are out of reach
    }
    case Shfl::kSync: return lane;
  }
  return lane;
}

inline uint64_t exchange(Shfl kind, unsigned mask, uint64_t value, int arg, int width, Site site) {
  Block& B = *g_block;
  const int t = g_tid, lane = t % 32;
  Warp& W = *B.warps[t / 32];
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle width " + std::to_string(width) + " is not a power of 2 in [1, 32] at " + site.str());
  }
  std::unique_lock<std::mutex> lk(W.m);
  B.tick();
  char buf[160];
  if (!((mask >> lane) & 1u)) {
    std::snprintf(buf, sizeof buf, "lane %d calls a shuffle whose mask 0x%08x leaves it out at ", lane, mask);
    fail(buf + site.str());
  }
  if (mask & ~W.alive) {
    std::snprintf(buf, sizeof buf, "shuffle mask 0x%08x names lanes 0x%08x of warp %d that have exited or do not exist at ",
                  mask, mask & ~W.alive, t / 32);
    fail(buf + site.str() + "; " + B.dump());
  }
  if (W.arrived != 0 && (W.mask != mask || W.kind != kind || W.arg != arg || W.width != width || !(W.site == site))) {
    std::snprintf(buf, sizeof buf, "lanes of warp %d meet at different shuffles (mask 0x%08x at %s, mask 0x%08x at ",
                  t / 32, W.mask, W.site.str().c_str(), mask);
    fail(buf + site.str() + ")");
  }
  W.mask = mask;
  W.kind = kind;
  W.arg = arg;
  W.width = width;
  W.site = site;
  W.value[lane] = value;
  W.arrived |= 1u << lane;
  if (W.arrived == mask) {  // everyone is here: deliver, release the others, run on
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int src = source_lane(kind, l, arg, width);
      if (!((mask >> src) & 1u)) {
        std::snprintf(buf, sizeof buf, "lane %d reads lane %d, which is not in the shuffle mask 0x%08x, at ", l, src, mask);
        fail(buf + site.str());
      }
      W.result[l] = W.value[src];
    }
    W.arrived = 0;
    W.gen++;
    B.make_ready(W.waiters);
    W.waiters.clear();
    W.cv.notify_all();
    return W.result[lane];
  }
  W.waiters.push_back(t);
  B.set_where(t, kAtShuffle);
  const uint64_t g = W.gen;
  lk.unlock();
  B.pass(t, false);
  lk.lock();
  W.cv.wait(lk, [&] { return W.gen != g; });
  const uint64_t r = W.result[lane];
  lk.unlock();
  B.acquire(t);
  B.set_where(t, kRunning);
  return r;
}

template <typename T>
T shuffle(Shfl kind, unsigned mask, T v, int arg, int width, Site site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "the emulator shuffles values of up to 8 bytes");
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  raw = exchange(kind, mask, raw, arg, width, site);
  T out;
  std::memcpy(&out, &raw, sizeof(T));
  return out;
}

// a thread leaves the kernel: it drops out of barriers; a shuffle still waiting for it can never complete
inline void thread_exit(int t) {
  Block& B = *g_block;
  Warp& W = *B.warps[t / 32];
  {
    std::lock_guard<std::mutex> lk(W.m);
    W.alive &= ~(1u << (t % 32));
    if (W.arrived != 0 && ((W.mask >> (t % 32)) & 1u)) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "lane %d of warp %d exited while lanes 0x%08x wait for it in a shuffle (mask 0x%08x) at ",
                    t % 32, t / 32, W.arrived, W.mask);
      fail(buf + W.site.str());
    }
  }
  std::unique_lock<std::mutex> lk(B.m);
  B.tick();
  B.set_where(t, kExited);
  B.alive--;
  if (B.arrived > 0 && B.arrived == B.alive) {
    B.arrived = 0;
    B.gen++;
    B.make_ready(B.waiters);
    B.waiters.clear();
    B.cv.notify_all();
  }
  if (++B.finished == B.n) {  // the block is done: reset for the next one, which starts at the first thread
    poison_shared();
    B.finished = 0;
    B.alive = B.n;
    B.block_gen++;
    for (int i = 0; i < B.n; ++i) B.set_where(i, kRunning);
    for (auto& w : B.warps) w->alive = w->present;
    if (B.serial()) {
      std::lock_guard<std::mutex> bl(B.bm);
      for (int i = 0; i < B.n; ++i) B.ready[i] = 1;
      B.holder = B.first();
      B.bcv[B.holder]->notify_one();
    }
    B.cv.notify_all();
    return;
  }
  const uint64_t g = B.block_gen;
  lk.unlock();
  B.pass(t, false);
  if (!B.serial()) {
    lk.lock();
    B.cv.wait(lk, [&] { return B.block_gen != g; });
  }
}

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char* name = "kernel";
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
  Config& named(const char* n) {
    name = n;
    return *this;
  }
};

inline cudaError_t check_config(const Config& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) {
    return cudaErrorInvalidConfiguration;
  }
  if (threads > 1024 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) return cudaErrorInvalidConfiguration;
  if (c.grid.x > 2147483647u || c.grid.y > 65535u || c.grid.z > 65535u) return cudaErrorInvalidConfiguration;
  if (c.smem > 48 * 1024) return cudaErrorInvalidValue;  // above 48 KiB needs cudaFuncSetAttribute on a GPU
  return cudaSuccess;
}

template <typename... P, typename... A>
void launch(const Config& c, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  if (const cudaError_t e = check_config(c); e != cudaSuccess) {
    last_error = e;
    return;
  }
  Block B;
  B.n = static_cast<int>(c.block.x * c.block.y * c.block.z);
  B.schedule = schedule_from_env();
  B.alive = B.n;
  B.kernel = c.name;
  for (int w = 0; w * 32 < B.n; ++w) {
    auto warp = std::make_unique<Warp>();
    const int lanes = B.n - 32 * w < 32 ? B.n - 32 * w : 32;
    warp->present = warp->alive = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    B.warps.push_back(std::move(warp));
  }
  B.where.reset(new std::atomic<int>[B.n]);
  for (int t = 0; t < B.n; ++t) {
    B.set_where(t, kRunning);
    B.bcv.push_back(std::make_unique<std::condition_variable>());
  }
  B.ready.assign(B.n, 1);
  B.holder = B.first();
  blockDim = c.block;
  gridDim = c.grid;
  g_block = &B;
  poison_shared();
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const uint64_t blocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;

  std::mutex done_m;
  std::condition_variable done_cv;
  bool done = false;
  const int limit_s = env_int("HELLO_FAST_EMU_WATCHDOG_S", 30);
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lk(done_m);
    uint64_t seen = B.progress.load(std::memory_order_relaxed);
    auto since = std::chrono::steady_clock::now();
    while (!done_cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return done; })) {
      const uint64_t now = B.progress.load(std::memory_order_relaxed);
      if (now != seen) {
        seen = now;
        since = std::chrono::steady_clock::now();
      } else if (std::chrono::steady_clock::now() - since > std::chrono::seconds(limit_s)) {
        fail("watchdog: no thread reached a barrier, shuffle or exit for " + std::to_string(limit_s) + " s; " + B.dump());
      }
    }
  });

  std::vector<std::thread> threads;
  threads.reserve(B.n);
  for (int t = 0; t < B.n; ++t) {
    threads.emplace_back([&, t] {
      g_tid = t;
      threadIdx = uint3{t % c.block.x, (t / c.block.x) % c.block.y, t / (c.block.x * c.block.y)};
      for (uint64_t k = 0; k < blocks; ++k) {
        B.acquire(t);
        blockIdx = uint3{static_cast<unsigned>(k % c.grid.x), static_cast<unsigned>((k / c.grid.x) % c.grid.y),
                         static_cast<unsigned>(k / (uint64_t(c.grid.x) * c.grid.y))};
        std::apply(kernel, params);
        thread_exit(t);
      }
    });
  }
  for (auto& th : threads) th.join();
  {
    std::lock_guard<std::mutex> lk(done_m);
    done = true;
  }
  done_cv.notify_all();
  watchdog.join();
  g_block = nullptr;
}

}  // namespace emu

inline void __syncthreads(std::source_location l = std::source_location::current()) { emu::syncthreads(emu::site_of(l)); }
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location l = std::source_location::current()) {
  emu::exchange(emu::Shfl::kSync, mask, 0, 0, 32, emu::site_of(l));
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, std::source_location l = std::source_location::current()) {
  return emu::shuffle(emu::Shfl::kIdx, mask, v, src, width, emu::site_of(l));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                 std::source_location l = std::source_location::current()) {
  return emu::shuffle(emu::Shfl::kUp, mask, v, static_cast<int>(delta), width, emu::site_of(l));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                   std::source_location l = std::source_location::current()) {
  return emu::shuffle(emu::Shfl::kDown, mask, v, static_cast<int>(delta), width, emu::site_of(l));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize,
                  std::source_location l = std::source_location::current()) {
  return emu::shuffle(emu::Shfl::kXor, mask, v, lane_mask, width, emu::site_of(l));
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}
