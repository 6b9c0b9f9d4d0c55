"""Small shared helpers: devices, seeding, normalisation and checkpoints of plain networks."""
from __future__ import annotations

import json
import random

import numpy as np
import torch

from hello_fast._io import load_model_file, write_bytes
from hello_fast.errors import HelloError
from hello_fast.models.students import build_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Normalize:
    """uint8 images -> float, (x/255 - mean) / std, on the images' device."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255.0 - self.mean) / self.std


def save_model(path: str, model: torch.nn.Module, meta: dict) -> int:
    """A network's state dict as safetensors with JSON metadata, written atomically; returns bytes."""
    from safetensors.torch import save


    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"hello_fast": json.dumps(meta, sort_keys=True)})
    return write_bytes(path, data, "network weights")


def load_network(path: str, device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a teacher/student network saved by save_model."""
    state, meta = load_model_file(path)
    for key in ("arch", "num_classes", "image_size"):
        if key not in meta:
            raise HelloError(f"{path}: checkpoint metadata lacks {key!r}")
    model = build_model(meta["arch"], meta["num_classes"], meta["image_size"], meta.get("width"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise HelloError(f"{path}: weights do not fit {meta['arch']}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), meta
