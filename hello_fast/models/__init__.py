"""Models: student and teacher architectures by name, and CLIP backbones through open_clip."""
from hello_fast.models.clip import ClipBackbone, load_clip, template_strings
from hello_fast.models.students import ARCHS, build_model

__all__ = ["ARCHS", "ClipBackbone", "build_model", "load_clip", "template_strings"]
