"""Data: the original image sets (folders, digits, procedural), their loaders (torchvision, DALI) and distilled-set files."""
from hello_fast.data.sources import (
    FileImageSet,
    ImageSet,
    TensorImageSet,
    load_splits,
    procedural_images,
)

__all__ = ["FileImageSet", "ImageSet", "TensorImageSet", "load_splits", "procedural_images"]
