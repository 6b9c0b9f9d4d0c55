"""Small shared helpers: devices, seeding, normalisation and checkpoints of plain networks."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import torch

from hello_fast._io import atomic_path
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
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return len(data)


def load_model_file(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a file written by save_model; safetensors only, never pickle."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise HelloError(f"checkpoint {path} does not exist")
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("hello_fast", "{}"))
    except (SafetensorError, ValueError, OSError) as e:
        raise HelloError(f"{path} is not a readable checkpoint ({e})") from None
    return state, meta


def read_state_dict(path: str, what: str = "checkpoint") -> tuple[dict, dict]:
    """(tensors, hello_fast metadata or {}) of a foreign checkpoint, without running code from it.

    safetensors, or a torch pickle read with weights_only=True; a training checkpoint's
    `state_dict`/`model` entry and DistributedDataParallel's `module.` prefix are unwrapped.
    `what` names the file in errors ("CLIP checkpoint", "observer checkpoint").
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    meta = {}
    if path.endswith(".safetensors"):
        try:
            state = load_file(path)
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("hello_fast")
        except (SafetensorError, OSError, ValueError) as e:
            raise HelloError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        meta = json.loads(raw) if raw else {}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise HelloError(f"refusing to load {what} {path}: not a plain tensor checkpoint (a truncated or "
                             f"foreign file, or a pickle that would run code)") from None
        except Exception as e:  # torch.load raises many types for truncated or foreign files
            detail = str(e).splitlines()[0][:120] if str(e) else ""
            raise HelloError(f"{what} {path} is not readable ({type(e).__name__}: {detail})") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HelloError(f"{what} {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, meta


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
