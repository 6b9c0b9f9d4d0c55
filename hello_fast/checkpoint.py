"""Crash-safe training checkpoints: written atomically (temporary file, fsync, rename), loaded without running code.

A checkpoint holds a stage's model and optimiser states, its epoch and step, the random states of
torch, numpy and Python and of the stage's own generators, and what the stage has summarised so
far. It is read back with torch.load(weights_only=True) only: a pickle that would run code is
refused with a clear error, never executed.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zipfile
import zlib

import numpy as np
import torch

from hello_fast import distributed
from hello_fast._io import write_bytes
from hello_fast._progress import log
from hello_fast.errors import HelloError

NAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Serialised in memory first: torch.save into a full file system fails with "unexpected pos" (a RuntimeError
    naming neither disk nor path); the bytes' size is what write_bytes checks against the free space."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer(), "checkpoint")


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by save_checkpoint; HelloError for a missing, corrupt or unsafe file."""
    if not os.path.isfile(path):
        raise HelloError(f"checkpoint {path} does not exist")
    try:
        # torch.load checks neither the archive's CRC-32s (a flipped byte in a tensor would load as another value)
        # nor a record flagged as a directory (MS-DOS attribute 0x10: it reads nothing, and the tensor is garbage);
        # what is no zip archive at all (a truncated one, a plain pickle) is torch.load's to refuse
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip() or next((i.filename for i in archive.infolist() if i.external_attr & 0x10), None)
            if damaged is not None:
                raise HelloError(f"checkpoint {path} is damaged: its record {damaged} does not check out")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise HelloError(f"refusing to load {path}: it is not a plain tensor checkpoint (it would run code or holds "
                         f"objects that are not tensors): {str(e).splitlines()[0][:120]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError, struct.error, AssertionError, zlib.error) as e:
        raise HelloError(f"checkpoint {path} is not readable (truncated or not a checkpoint: {type(e).__name__})") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise HelloError(f"{path} is not a hello_fast training checkpoint")
    return state


class StageCheckpoint:
    """A stage's resume point in its partial folder: loaded at the start, saved every `every` epochs by rank 0
    (hello_fast/engine.py restores what it holds)."""

    def __init__(self, folder: str, stage: str, every: int):
        self.path = os.path.join(folder, NAME)
        self.stage = stage
        self.every = every

    def load(self) -> dict | None:
        if not os.path.isfile(self.path):
            return None
        state = load_checkpoint(self.path)

        log(f"{self.stage}: resuming from the checkpoint after epoch {state['epoch']} ({self.path})")
        return state

    def save(self, state: dict, epoch: int, last_epoch: int) -> None:
        if self.every and epoch % self.every == 0 and epoch < last_epoch and distributed.world().main:
            save_checkpoint(self.path, dict(state, epoch=epoch, rng=rng_state()))


class FiniteGuard:
    """Remembers, without a host sync per step, whether any loss was NaN or infinite."""

    def __init__(self):
        self.bad = None

    def add(self, loss: torch.Tensor) -> None:
        flag = ~torch.isfinite(loss.detach())
        self.bad = flag if self.bad is None else (self.bad | flag)

    def check(self, stage: str, epoch: int, knob: str, folder: str) -> None:
        if self.bad is not None and bool(self.bad):
            last = os.path.join(folder, NAME)
            kept = f"the last good checkpoint is kept in {last}" if os.path.isfile(last) else "no checkpoint was written yet"
            raise HelloError(f"{stage}: the loss became NaN or infinite in epoch {epoch}; stopped ({kept}). "
                             f"Lower {knob} and rerun")
        self.bad = None
