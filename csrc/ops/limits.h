// Limits shared by every backend of the ops, with no torch headers (the .cu files include it). The Python
// dispatchers in hello_fast/ops state the same numbers and check them first, for every backend.
#pragma once

namespace hello_fast {

constexpr int kMaxViews = 4;  // augment_mix: normalised views written in one pass

}  // namespace hello_fast
