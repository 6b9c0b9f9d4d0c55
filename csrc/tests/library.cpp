// The hello_fast op namespace for the C++ test binary (bindings.cpp declares it in the Python module).
#include <torch/library.h>

TORCH_LIBRARY(hello_fast, m) {}
