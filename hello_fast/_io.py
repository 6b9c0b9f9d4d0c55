"""File I/O: atomic writes (temporary file, fsync, rename: no reader sees half a file) and safe reads of checkpoints."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import tempfile

import torch

from hello_fast.errors import HelloError


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path; on success it replaces `path` atomically, on failure it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, data) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_model_file(path: str, what: str = "checkpoint") -> tuple[dict, dict]:
    """(state dict, hello_fast metadata) of a safetensors file (save_model's format); never pickle."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise HelloError(f"{what} {path} does not exist")
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("hello_fast", "{}"))
    except (SafetensorError, ValueError, OSError) as e:
        raise HelloError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    return state, meta


def read_state_dict(path: str, what: str = "checkpoint") -> tuple[dict, dict]:
    """(tensors, hello_fast metadata or {}) of a foreign checkpoint, without running code from it.

    safetensors, or a torch pickle read with weights_only=True; a training checkpoint's
    `state_dict`/`model` entry and DistributedDataParallel's `module.` prefix are unwrapped.
    `what` names the file in errors ("CLIP checkpoint", "observer checkpoint").
    """
    meta = {}
    if path.endswith(".safetensors"):
        state, meta = load_model_file(path, what)
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


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str, what: str = "file") -> str:
    """sha256 of a file's bytes, hashed once per (path, size, mtime) in a process."""
    try:
        st = os.stat(path)
    except OSError:
        raise HelloError(f"{what} {path} does not exist") from None
    return _sha256_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)
