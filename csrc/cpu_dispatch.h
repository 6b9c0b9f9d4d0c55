// Runtime choice between the builds of the CPU kernels. Each csrc/ops/cpu/*.cpp is compiled for any CPU of its
// architecture (namespace hello_fast::cpu_default) and, on x86-64, once more with -mavx2 -mfma -mf16c
// -DCPU_CAPABILITY_AVX2 (hello_fast::cpu_avx2); the function registered with torch calls the build this CPU runs
// (ATen's DispatchStub idea, reduced to what hello_fast needs).
//
// A kernel file wraps its code in `namespace hello_fast::HELLO_FAST_CPU_NAMESPACE { namespace { ... } }` and ends,
// at global scope, with one HELLO_FAST_CPU_KERNEL(op, function) per op in place of TORCH_LIBRARY_IMPL. The
// capability-named namespace keeps each build's own code apart (and tells them apart in a disassembly); ATen's
// Vectorized is in at::vec::CPU_CAPABILITY already. Inline functions of other headers (std::, c10::, csrc/ops/*.h)
// are emitted by both builds under one name, and the linker keeps the first copy it meets: setup.py and
// CMakeLists.txt link every generic object before the AVX2 ones. A generic caller of such a function out of line
// has its own translation unit emit a copy, which then comes first, so it never lands in AVX2 code; a copy only
// the AVX2 build emits is called only from AVX2 code. tests/test_build.py checks the built binary for this.
#pragma once

#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

namespace hello_fast::cpu_dispatch {

enum class Capability : int { kDefault = 0, kAVX2 = 1 };
constexpr int kNumCapabilities = 2;

// The build the ops run: the best this CPU supports among those compiled in, unless HELLO_FAST_CPU_CAPABILITY
// (default | avx2) asks for a lower one. Decided at the first call, then fixed for the process.
Capability chosen();
// "default" or "avx2"
const char* capability_name(Capability c);
// the names of the builds compiled into this extension
std::vector<std::string> compiled();
// Called by each build's registration (static initialisation) so chosen() knows what exists.
bool note_built(Capability c);

// The kernels of one op (Op: a tag type naming it), one per build, and the function torch calls.
template <typename Op, typename Fn>
struct Kernels;

template <typename Op, typename R, typename... A>
struct Kernels<Op, R(A...)> {
  using Fn = R(A...);
  static inline Fn* table[kNumCapabilities] = {};

  static bool add(Capability c, Fn* f) {
    table[static_cast<int>(c)] = f;
    return note_built(c);
  }

  // Only the generic build instantiates this (HELLO_FAST_CPU_KERNEL registers it there).
  static R call(A... args) {
    static Fn* const f = pick();
    return f(std::forward<A>(args)...);
  }

 private:
  static Fn* pick() {
    Fn* f = table[static_cast<int>(chosen())];
    return f ? f : table[static_cast<int>(Capability::kDefault)];
  }
};

}  // namespace hello_fast::cpu_dispatch

#if defined(CPU_CAPABILITY_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "CPU_CAPABILITY_AVX2 needs -mavx2 -mfma -mf16c"
#endif
#define HELLO_FAST_CPU_NAMESPACE cpu_avx2
#define HELLO_FAST_CPU_THIS ::hello_fast::cpu_dispatch::Capability::kAVX2
// the AVX2 build only adds its kernel to the table
#define HELLO_FAST_CPU_TORCH_IMPL(op, fn)
#else
#define HELLO_FAST_CPU_NAMESPACE cpu_default
#define HELLO_FAST_CPU_THIS ::hello_fast::cpu_dispatch::Capability::kDefault
// the generic build registers the op with torch, once, as the function that picks a build
#define HELLO_FAST_CPU_TORCH_IMPL(op, fn)                                                                  \
  TORCH_LIBRARY_IMPL(hello_fast, CPU, m) {                                                                 \
    m.impl(#op, &::hello_fast::cpu_dispatch::Kernels<::hello_fast::cpu_dispatch::op##_op,                  \
                                                     decltype(::hello_fast::HELLO_FAST_CPU_NAMESPACE::fn)>::call); \
  }
#endif

// At global scope, after the kernel file's namespace: fn (in hello_fast::HELLO_FAST_CPU_NAMESPACE) is this build's
// CPU kernel of hello_fast::op.
#define HELLO_FAST_CPU_KERNEL(op, fn)                                                                          \
  namespace hello_fast::cpu_dispatch {                                                                         \
  struct op##_op;                                                                                              \
  }                                                                                                            \
  static const bool hello_fast_cpu_kernel_##op =                                                               \
      ::hello_fast::cpu_dispatch::Kernels<::hello_fast::cpu_dispatch::op##_op,                                 \
                                          decltype(::hello_fast::HELLO_FAST_CPU_NAMESPACE::fn)>::add(          \
          HELLO_FAST_CPU_THIS, &::hello_fast::HELLO_FAST_CPU_NAMESPACE::fn);                                   \
  HELLO_FAST_CPU_TORCH_IMPL(op, fn)
