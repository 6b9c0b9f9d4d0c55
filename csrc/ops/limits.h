// Limits shared by every backend of the ops, with no torch headers (the .cu files include it). The Python
// dispatchers in hello_fast/ops state the same numbers and check them first, for every backend.
#pragma once

namespace hello_fast {

constexpr int kMaxViews = 4;  // augment_mix: normalised views written in one pass
constexpr int kMaxShuffleFactor = 64;  // augment_mix: ShufflePatches strips per axis (an order fits a 64-bit mask)

}  // namespace hello_fast
