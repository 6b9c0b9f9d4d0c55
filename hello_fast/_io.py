"""File I/O: atomic writes (temporary file, fsync, rename: no reader sees half a file), the OS's refusals to write as
one-line errors, and safe reads of checkpoints."""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pickle
import tempfile

import torch

from hello_fast.errors import HelloError


# What the user can fix about a refused write, by errno; anything else stays a traceback (a bug to report).
_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_REFUSED = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only filesystem"}
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)
_AGAIN = "run the same command again: finished stages are kept and an interrupted one resumes from its last checkpoint"


def free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (its nearest existing folder)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _file_in_the_way(path: str) -> str | None:
    """The first of `path`'s parent folders that exists as something other than a folder."""
    path = os.path.abspath(path)
    parents = []
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        parents.append(path)
    for p in reversed(parents):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
    return None


def os_error_line(e: OSError, operation: str | None = None, path: str | None = None, needed: int | None = None,
                  written: int | None = None) -> str | None:
    """One line for an OS refusal the user can fix (space, permission, read-only, a file where a folder must be), or None.

    `operation` ("write the checkpoint") and `path` (the file the user knows, not its temporary name) say what
    was being done; `needed` is the size of the whole write when known, `written` how much got out before it failed.
    """
    path = path or e.filename or "?"
    doing = f"could not {operation or 'use'} {path}"
    if e.errno in _NO_SPACE:
        free = free_bytes(path)
        sizes = [f"{needed:,} bytes needed" if needed is not None else
                 f"more than the {written:,} bytes written were needed" if written else None,
                 f"{free:,} free there" if free is not None else None]
        sizes = "; ".join(x for x in sizes if x)
        return (f"{_NO_SPACE[e.errno]}: {doing}" + (f" ({sizes})" if sizes else "")
                + f"; free some space (or choose another --out) and {_AGAIN}")
    if e.errno == errno.EFBIG:
        return (f"file too large: {doing} (larger than its filesystem or `ulimit -f` allows); raise the limit (or "
                f"choose another --out) and {_AGAIN}")
    if e.errno in _REFUSED:
        return f"{_REFUSED[e.errno]}: {doing}; fix its permissions or mount (or choose another --out) and {_AGAIN}"
    if e.errno in _NOT_A_FOLDER:
        blocker = _file_in_the_way(path)
        if blocker is None and e.errno == errno.EEXIST and e.filename and not os.path.isdir(e.filename):
            blocker = e.filename  # makedirs of a folder that exists as a file
        if blocker is not None:
            return f"{blocker} is a file, not a folder: {doing}; move the file away (or choose another --out) and {_AGAIN}"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder where a file belongs: {doing}; move the folder away and {_AGAIN}"
    return None


@contextlib.contextmanager
def os_errors(operation: str, path: str, needed: int | None = None):
    """Turn an OS refusal the user can fix, raised in the block, into a one-line HelloError naming `operation` on `path`."""
    try:
        yield
    except OSError as e:
        line = os_error_line(e, operation, path, needed)
        if line is None:
            raise
        raise HelloError(line) from None


@contextlib.contextmanager
def _replacing(path: str):
    """Yield a temporary path beside `path`; on success it is fsynced and replaces `path`, on any failure it is removed."""
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


@contextlib.contextmanager
def atomic_path(path: str, what: str = "file"):
    """Yield a temporary path; on success it replaces `path` atomically, on failure it is removed.

    An OS refusal (no space, no permission, ...) becomes a one-line HelloError naming `path` and `what`
    (the file's kind: "report", "image-check cache"); for space, with how much had been written."""
    written = None
    try:
        with _replacing(path) as tmp:
            try:
                yield tmp
            except OSError:
                with contextlib.suppress(OSError):
                    written = os.path.getsize(tmp)  # how far the writer got (the temporary file goes next)
                raise
    except OSError as e:
        line = os_error_line(e, f"write the {what}", path, written=written)
        if line is None:
            raise
        raise HelloError(line) from None


def write_bytes(path: str, data, what: str = "file") -> int:
    """`data` (bytes or a buffer) written atomically to `path`; returns its size.

    Refused before anything is written when the filesystem has less room than the data (so a full disk
    costs no half-written temporary file), and any OS refusal, also one met while writing, becomes a
    one-line HelloError naming `path`, `what` and, for space, the bytes needed and free."""
    view = memoryview(data).cast("B")
    needed = len(view)
    with os_errors(f"write the {what}", path, needed):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        free = free_bytes(path)
        if free is not None and free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        with _replacing(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
    return needed


def write_json(path: str, data, what: str = "file") -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode(), what)


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


def check_state_dict(expected: dict, state: dict, path: str, name: str) -> None:
    """Refuse, in one line, a state dict whose keys or shapes differ from `expected` (the model's own)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HelloError(f"{path} does not hold {name} weights: {len(missing)} missing (e.g. {', '.join(missing[:2]) or '-'}), "
                         f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'})")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise HelloError(f"{path} does not hold {name} weights: {bad[0]} is {tuple(state[bad[0]].shape)}, "
                         f"{name} needs {tuple(expected[bad[0]].shape)}")


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
