"""Class subsets of an image set: the images of some classes, relabelled 0..k-1 in the order the classes are given.

Class-incremental studies (GDumb's protocol, hello_fast/study.py) train each step's student on the
classes seen so far and evaluate it on their val images only: both sets are these views.
"""
from __future__ import annotations

import torch

from hello_fast.data.sources import FileImageSet, ImageSet, TensorImageSet
from hello_fast.errors import HelloError


def class_subset(images: ImageSet, classes: list[int]) -> ImageSet:
    """The images of `classes` (indices into images.class_names), their labels remapped to positions in `classes`.

    The result is the same kind of set (in-memory or files), so every loader reads it as it reads the whole set.
    """
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < images.num_classes for c in classes):
        raise HelloError(f"class subset: {classes} must be distinct class indices below {images.num_classes}")
    remap = torch.full((images.num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    new = remap[images.labels]
    keep = torch.nonzero(new >= 0).flatten()
    names = [images.class_names[c] for c in classes]
    if isinstance(images, TensorImageSet):
        return TensorImageSet(images.images[keep], new[keep], names, tag=f"{images.tag}:classes{classes}")
    if isinstance(images, FileImageSet):
        return FileImageSet([images.files[i] for i in keep.tolist()], new[keep].tolist(), names,
                            on_bad_image=images.on_bad_image)
    raise HelloError(f"class subset: a {type(images).__name__} cannot be subset (in-memory and file sets can)")
