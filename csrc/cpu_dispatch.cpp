// Which build of the CPU kernels runs (csrc/cpu_dispatch.h): the CPU's own answer, the builds compiled in, and the
// HELLO_FAST_CPU_CAPABILITY override. Compiled once, generically.
#include "cpu_dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

namespace hello_fast::cpu_dispatch {
namespace {

// constant-initialised, so the kernels' static registrations may write it in any order
std::atomic<unsigned> built_mask{0};

bool cpu_runs_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // also called by the runtime's constructor; harmless twice, needed if we run before it
  // the instruction sets the AVX2 build is compiled for (-mavx2 -mfma -mf16c); libgcc's answer includes the OS's
  // support for the 256-bit registers (XSAVE), which a cpuid bit alone does not
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool is_built(Capability c) { return built_mask.load() & (1u << static_cast<int>(c)); }

Capability decide() {
  const Capability best = is_built(Capability::kAVX2) && cpu_runs_avx2() ? Capability::kAVX2 : Capability::kDefault;
  const char* env = std::getenv("HELLO_FAST_CPU_CAPABILITY");
  const std::string asked = env ? env : "";
  if (asked.empty()) return best;
  if (asked == "default") return Capability::kDefault;
  TORCH_CHECK(asked == "avx2", "HELLO_FAST_CPU_CAPABILITY must be 'default' or 'avx2', got '", asked, "'");
  // as ATEN_CPU_CAPABILITY does: the override can lower the choice, never raise it past what runs here
  if (best != Capability::kAVX2) {
    TORCH_WARN("hello_fast: HELLO_FAST_CPU_CAPABILITY=avx2 but ",
               is_built(Capability::kAVX2) ? "this CPU lacks AVX2/FMA/F16C" : "no AVX2 build of the kernels is compiled in",
               "; running the generic CPU kernels");
  }
  return best;
}

}  // namespace

bool note_built(Capability c) {
  built_mask.fetch_or(1u << static_cast<int>(c));
  return true;
}

Capability chosen() {
  static const Capability c = decide();
  return c;
}

const char* capability_name(Capability c) { return c == Capability::kAVX2 ? "avx2" : "default"; }

std::vector<std::string> compiled() {
  std::vector<std::string> names;
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (is_built(static_cast<Capability>(c))) names.emplace_back(capability_name(static_cast<Capability>(c)));
  }
  return names;
}

}  // namespace hello_fast::cpu_dispatch
