"""Loading the csrc extension `hello_fast._C` once, and saying once, clearly, when it is absent.

`import hello_fast` checks that the extension file exists (cheaply, without importing torch);
the first op that wants it imports it. Either failure is reported by one RuntimeWarning naming
the fallback (the PyTorch reference ops, and Triton on GPUs); nothing crashes.
"""
from __future__ import annotations

import importlib.util
import warnings

_module = None
_error: str | None = None
_loaded = False
_warned = False


def _warn(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"hello_fast: C++/CUDA extension not available ({reason}); falling back to the PyTorch reference ops "
            "(and Triton kernels on GPUs). Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )


def check_present() -> None:
    """At package import: warn once if the extension was never built."""
    global _error
    try:
        found = importlib.util.find_spec("hello_fast._C") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        _error = "hello_fast._C is not built"
        _warn(_error)


def load():
    """The imported `hello_fast._C`, or None (warned once)."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

        try:  # by its full name: the compiled module, not an import of the package's __init__
            _module = importlib.import_module("hello_fast._C")
        except ImportError as e:  # absent, or built against another torch
            _error = str(e).splitlines()[0]
            _warn(_error)
    return _module


def error() -> str | None:
    return _error
