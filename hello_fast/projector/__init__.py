"""The image-to-label projector (CLIP + LoRA + text-embedding head) and its label artifact."""
from hello_fast.projector.artifact import (
    convert_artifact,
    load_projector,
    read_artifact,
    save_artifact,
)
from hello_fast.projector.lora import LoRAConv2d, LoRALinear, inject_lora
from hello_fast.projector.model import Projector, build_projector

__all__ = ["convert_artifact", "LoRAConv2d", "LoRALinear", "Projector", "build_projector", "inject_lora", "load_projector", "read_artifact", "save_artifact"]
