"""Backend selection for hello_fast ops: csrc (C++/CUDA), Triton kernels or the PyTorch reference.

The extension `hello_fast._C` is loaded once, on first use; if it is absent the package says so
once and runs the PyTorch reference. `HELLO_FAST_BACKEND=<name>` prefers one backend wherever an
op offers it on that device; an op's `backend=` argument demands one and fails clearly if absent.

Roles of the two GPU backends (the README's "Backend roles" says the same):
- CUDA (csrc/ops/cuda) leads for augment_mix and soft_label_loss wherever the extension was built
  with it. It is compiled ahead of time, one kernel per op for every mode, view count and dtype,
  so no call waits for a JIT compile of a new variant; nvcc (-O3, sm_80 / sm_90) reports no
  spills for any of them, at 48 / 40 registers for augment_mix (56 / 62 for its ShufflePatches
  instantiation) and 32 / 32-40 for soft_label_loss,
  fixed for every mode and view count (Triton's vary per compiled variant: see
  benchmarks/results/gpu_static.json); and the sources run, unchanged, under the project's CPU
  emulation with AddressSanitizer and ThreadSanitizer in CI (tests/test_cuda_emulated.py).
- Triton (kernels/) is the GPU path wherever the extension has no CUDA kernels: a plain
  `pip install` on a machine without a CUDA toolkit builds the CPU ops only, while Triton comes
  with torch. It is the only GPU kernel of lora_linear.
Neither order rests on a GPU timing (none has been measured): benchmarks/bench_augment.py and
bench_loss.py time both on a GPU, and HELLO_FAST_BACKEND=triton puts Triton first.
"""
from __future__ import annotations

import os

import torch

from hello_fast import _extension
from hello_fast.ops import _registrations

BACKENDS = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "HELLO_FAST_BACKEND"
# the preference of the ops that have both GPU kernels (augment_mix, soft_label_loss): see the roles above
CUDA_THEN_TRITON = ("cuda", "triton", "cpp", "torch")


def extension():
    """The loaded `hello_fast._C` module, or None (the package warned once about it); the ops' torch.library
    registrations made either way (hello_fast.ops._registrations)."""
    ext = _extension.load()
    _registrations.register(ext)
    return ext


def extension_status() -> str:
    ext = extension()
    if ext is None:
        return f"not available ({_extension.error()})"
    return "built with CUDA" if ext.cuda_built() else "built, CPU only"


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU only through its interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device, offered: tuple[str, ...]) -> list[str]:
    """The backends of `offered` that can run on `device` here, fastest first."""
    out = []
    for name in offered:
        if name == "triton" and triton_usable(device):
            out.append(name)
        elif name == "cuda" and device.type == "cuda":
            if extension() is not None and _registrations.cuda_kernels_built():
                out.append(name)
        elif name == "cpp" and device.type == "cpu" and extension() is not None:
            out.append(name)
        elif name == "torch":
            out.append(name)
    return out


def choose(op: str, requested: str | None, device: torch.device, offered: tuple[str, ...]) -> str:
    """Pick the backend for one call of `op` on `device`.

    `offered` lists the op's backends, fastest first; "torch" (the reference) is always offered.
    """
    usable = available(device, offered)
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
        if requested not in usable:
            raise RuntimeError(
                f"{op}: backend {requested!r} is not available on {device.type} here "
                f"(available: {', '.join(usable)}; extension {extension_status()})"
            )
        return requested
    preferred = os.environ.get(ENV_VAR)
    if preferred:
        if preferred not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={preferred!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        if preferred in usable:
            return preferred
    if device.type == "cpu" and "triton" in usable and len(usable) > 1:
        usable.remove("triton")  # the interpreter is a test path, never the fast one
    return usable[0]


# the ops exist (schemas, fakes, autograd, Triton kernels) from import on, before anything traces them: registering
# inside a torch.compile trace would break its graph
extension()
