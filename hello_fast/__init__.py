"""hello_fast: HeLlO dataset distillation with online soft labels from a LoRA-adapted CLIP projector."""
__version__ = "0.1.0"

from hello_fast import _extension

_extension.check_present()
