"""Distilled sets on disk: PNG files in class folders plus distilled.json (class names and order, labels, origin).

The folder is an ordinary image-classification layout (`images/<cccc>_<name>/<k>.png`), so the
distilled images can be viewed, shared and used by other tools; PNG keeps the pixels exact.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch
from PIL import Image

from hello_fast._io import read_json, write_json
from hello_fast.data.sources import TensorImageSet
from hello_fast.errors import HelloError

INDEX = "distilled.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:40] or "class"


def save_distilled(directory: str, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], info: dict) -> list[str]:
    """Write uint8 (N, 3, H, W) images as PNGs; returns their paths relative to `directory`."""
    files, counts = [], {}
    for img, label in zip(images.cpu(), labels.tolist()):
        k = counts.get(label, 0)
        counts[label] = k + 1
        rel = os.path.join("images", f"{label:04d}_{_slug(class_names[label])}", f"{k:03d}.png")
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        files.append(rel)
    write_json(os.path.join(directory, INDEX), {"class_names": list(class_names), "files": files,
                                                 "labels": labels.tolist(), **info})
    return files


def load_distilled(directory: str) -> TensorImageSet:
    """Read a distilled set written by save_distilled."""
    index_path = os.path.join(directory, INDEX)
    if not os.path.isfile(index_path):
        raise HelloError(f"{directory} is not a distilled set (no {INDEX})")
    index = read_json(index_path)
    arrays = []
    for rel in index["files"]:
        path = os.path.join(directory, rel)
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as e:
            raise HelloError(f"distilled image {path} is unreadable ({type(e).__name__}: {e})") from None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return TensorImageSet(images, torch.tensor(index["labels"], dtype=torch.long), index["class_names"], tag=f"distilled:{directory}")
