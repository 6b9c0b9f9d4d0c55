"""Read the weights of a TorchScript archive (OpenAI's CLIP releases, e.g. RN50.pt) without running anything in it.

`torch.jit.load` is not a safe way to open a downloaded archive: it compiles the TorchScript code
stored in the archive and runs the `__setstate__` methods that code defines while it rebuilds the
objects, and TorchScript can touch files (CVE-2025-32434 went through this path, which is why
`torch.load(weights_only=True)` now refuses TorchScript archives). The weights themselves are plain
data: the archive is a zip whose `data.pkl` pickles the module tree (one object per module, its
attributes in a dict) with every tensor's bytes in a `data/<key>` record. Here `data.pkl` is read
with an unpickler that knows only the handful of names such a pickle uses (module classes become
inert attribute holders, tensors are rebuilt from their records) and refuses anything else, so no
code from the file is ever compiled or called.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile

import torch

from hello_fast.errors import HelloError

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _Module:
    """Stands in for a scripted module or class while its pickle is read: it holds the attributes, runs nothing."""

    def __setstate__(self, state):
        self.__dict__["attributes"] = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _identity(value, *_):
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # TorchScript's typed containers and type tags: the value itself is what matters here
    ("torch.jit._pickle", "build_intlist"): _identity, ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity, ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, data: bytes):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _Module
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain weights pickle")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected tensor reference {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        storage = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if storage.numel() < numel:
            raise pickle.UnpicklingError(f"tensor record {key} holds {storage.numel()} values, {numel} expected")
        return storage


def is_torchscript_archive(path: str) -> bool:
    """True for a zip written by torch.jit.save (it has a constants.pkl and a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archive's module tree, by dotted name (as ScriptModule.state_dict names them)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise HelloError(f"{path}: a TorchScript archive with {len(pkl)} data.pkl records (expected one)")
            prefix = pkl[0][: -len("data.pkl")]
            root = _ArchiveUnpickler(z, prefix, z.read(pkl[0])).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError, RuntimeError) as e:
        raise HelloError(f"{path}: cannot read the weights of this TorchScript archive ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'truncated'})") from None
    if not isinstance(root, _Module):
        raise HelloError(f"{path}: the TorchScript archive does not hold a module")
    state: dict[str, torch.Tensor] = {}

    def walk(obj: _Module, prefix: str) -> None:
        for name, value in getattr(obj, "attributes", {}).items():
            if isinstance(value, torch.Tensor):
                state[prefix + name] = value
            elif isinstance(value, _Module):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return state
