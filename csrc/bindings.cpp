// The hello_fast._C Python module: loading it registers the hello_fast:: ops with torch's op registry.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "cpu_dispatch.h"

TORCH_LIBRARY(hello_fast, m) {
  // ops are declared with TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hello_fast C++/CUDA ops; call them through hello_fast.ops";
  m.def("cuda_built", []() {
#ifdef HELLO_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build");
  m.def("parallel_info", []() { return at::get_parallel_info(); }, "ATen's CPU threading configuration");
  m.def("cpu_capability", []() { return std::string(hello_fast::cpu_dispatch::capability_name(hello_fast::cpu_dispatch::chosen())); },
        "The build of the CPU kernels this process runs: 'avx2' or 'default' (HELLO_FAST_CPU_CAPABILITY can lower it)");
  m.def("cpu_capabilities", &hello_fast::cpu_dispatch::compiled, "The builds of the CPU kernels compiled in");
}
