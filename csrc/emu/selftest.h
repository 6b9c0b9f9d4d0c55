// Self-tests of the CUDA emulation (selftest.cu): small kernels that exercise its shuffles, barriers, launch
// checks, half/bfloat16 conversions, and the misuse it must report. Run through kernel_driver.
#pragma once

#include <string>

namespace emu_selftest {

// Runs self-test `name`, reading and writing raw arrays in `dir`; returns the process exit code.
int run(const std::string& name, const std::string& dir);

}  // namespace emu_selftest
