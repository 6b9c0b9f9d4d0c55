"""hello_fast: HeLlO dataset distillation with online soft labels from a LoRA-adapted CLIP projector."""
__version__ = "0.1.0"

from hello_fast import _extension

_extension.check_present()

# the public API, imported on first use (so `hello-fast --help` does not pay for torch)
_LAZY = {
    "Relabeler": "hello_fast.relabel",
    "RelabelMix": "hello_fast.relabel_mix",
    "RelabelMixLoss": "hello_fast.relabel_mix",
    "Pipeline": "hello_fast.pipeline",
    "run_study": "hello_fast.study",
    "load_config": "hello_fast.config",
    "load_projector": "hello_fast.projector.artifact",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hello_fast' has no attribute {name!r}")
