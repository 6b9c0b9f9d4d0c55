"""The run directory: one folder per stage, written atomically, with a fingerprint that says whether it is current.

A stage works in `RUN/.partial/<stage>/` and, when it finishes, moves that folder to `RUN/<stage>/`
with a `done.json` holding its fingerprint (a hash of the config sections and upstream results it
depends on) and its summary. A stage whose `done.json` carries the current fingerprint is
skipped on a rerun; a stale or missing one is (re)done, resuming from the checkpoint an
interrupted run left in its partial folder. Nothing half-written ever sits at a stage's final path.

One process writes a run directory at a time: a writing command holds `RUN/.lock` (an OS lock,
`fcntl.flock`) from start to end, and a second one is refused at once, told who holds it. The
OS drops the lock when its holder dies, however it dies, so no stale lock needs removing by hand.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time

from hello_fast import distributed
from hello_fast._io import os_errors, read_json, write_json
from hello_fast._progress import log
from hello_fast.errors import HelloError

LOCK_NAME = ".lock"
# flock's answers on a filesystem that cannot lock (Lustre mounted without -o flock, NFS without its lock service)
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

# The run directories this process holds: {root: [lock file descriptor, depth]} (a Pipeline's stages nest).
_held: dict[str, list] = {}


def _close_in_child() -> None:
    """A forked child (a DataLoader or image-check worker) drops its copy of each lock descriptor.

    flock belongs to the open file description that fork shares: a worker that outlived a killed
    holder would otherwise keep the run directory locked. Closing a copy never unlocks the parent."""
    for fd, _ in _held.values():
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":
        argv[0] = "python -m hello_fast"
    elif argv:
        argv[0] = os.path.basename(argv[0])
    return " ".join([argv[0], *map(shlex.quote, argv[1:])]) if argv else "?"


def _holder(fd: int) -> dict:
    """The holder's own account of itself, as it wrote it into the lock file (a moment after locking it)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        # A holder between its flock and its write leaves the last holder's words (or none) for a moment.
        alive = info.get("host") != socket.gethostname() or _alive(info.get("pid"))
        if isinstance(info, dict) and info.get("pid") and alive:
            return info
        time.sleep(0.1)
    return dict(info, gone=True) if isinstance(info, dict) and info.get("pid") else {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def busy_line(root: str, info: dict) -> str:
    """The one line a refused command prints: who holds `root` and what to do."""
    if not info.get("pid"):
        return (f"run directory {root} is in use by another process (it has not said which yet); wait for it to "
                f"finish or give this command another --out")
    if info.get("gone"):  # a process started by the holder, with the lock file open, outlived it
        return (f"run directory {root} is still locked by a process that pid {info['pid']} (`{info.get('command', '?')}`, "
                f"now exited) left running; `fuser -v {os.path.join(root, LOCK_NAME)}` names it: stop it, or give "
                f"this command another --out")
    since = info.get("since", time.time())
    ago = max(0, int(time.time() - since))
    age = f"{ago} s" if ago < 120 else f"{ago // 60} min" if ago < 7200 else f"{ago // 3600} h"
    here = info.get("host") == socket.gethostname()
    stop = f"kill {info['pid']}" + ("" if here else f" on {info.get('host')}")
    return (f"run directory {root} is in use: pid {info['pid']} on {info.get('host', '?')} has held it since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(since))} ({age}), running `{info.get('command', '?')}`; "
            f"wait for it to finish, stop it ({stop}), or give this command another --out")


class RunDir:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def done(self, stage: str) -> dict | None:
        """The stage's done.json, or None if it never finished."""
        marker = self.path(stage, "done.json")
        if not os.path.isfile(marker):
            return None
        try:
            return read_json(marker)
        except (OSError, ValueError):
            return None

    def is_current(self, stage: str, fingerprint: str) -> bool:
        d = self.done(stage)
        return d is not None and d.get("fingerprint") == fingerprint

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for a writing command: one process at a time, refused at once with who holds it.

        Rank 0 of a torchrun job holds it for the whole job (the other ranks write nothing). Reentrant in one
        process. flock on a local filesystem is dropped by the kernel when the holder dies; where the
        filesystem cannot lock at all the command says so once and runs unguarded (README: crashes)."""
        if not distributed.world().main:
            yield
            return
        key = os.path.realpath(self.root)
        if key not in _held:
            _held[key] = [self._take_lock(), 0]
        entry = _held[key]
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and _held.get(key) is entry:
                del _held[key]
                if entry[0] is not None:
                    with contextlib.suppress(OSError):
                        fcntl.flock(entry[0], fcntl.LOCK_UN)
                    os.close(entry[0])

    def _take_lock(self) -> int | None:
        """The locked descriptor of RUN/.lock (None where the filesystem cannot lock). The holder never opens the
        file a second time: on NFS flock is a POSIX lock, which closing any descriptor of the file releases."""
        path = self.path(LOCK_NAME)
        with os_errors("create the run directory's lock file", path):
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise HelloError(busy_line(self.root, info)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise
            log(f"warning: the filesystem of {self.root} cannot lock files ({e.strerror}): nothing stops a second "
                f"command from writing into this run directory at the same time")
            return None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                         "since": time.time(), "world_size": distributed.world().size}).encode()
        try:  # (fsync: a command on another NFS client opens the file after this and reads the server's copy)
            with os_errors("write the run directory's lock file", path):
                os.pwrite(fd, me, 0)
                os.ftruncate(fd, len(me))
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def stage(self, stage: str, fingerprint: str, summary: dict, collective: bool = False, basis: dict | None = None):
        """Work in the stage's partial folder (yielded); on success it becomes RUN/<stage> with done.json.

        done.json keeps the fingerprint, the summary and `basis` (what the fingerprint covered, by name: the
        options' values, the data's identity, the inputs' fingerprints), from which `hello-fast status` names
        what changed.

        A partial folder left by an interrupted run with the same fingerprint is kept (the stage
        resumes from the checkpoint in it); any other is cleared. The caller fills `summary` before
        the block ends. `collective`: every rank of a data-parallel run enters; rank 0 alone
        touches the files, the others wait for it at the boundaries.
        """
        main = distributed.world().main
        partial = self.path(".partial", stage)
        marker = os.path.join(partial, ".fingerprint")
        if main:
            with os_errors("prepare the stage folder", partial):
                current = False
                if os.path.isfile(marker):
                    with open(marker) as f:
                        current = f.read().strip() == fingerprint
                if not current:
                    if os.path.exists(partial):
                        shutil.rmtree(partial)
                    os.makedirs(partial)
                    with open(marker, "w") as f:
                        f.write(fingerprint)
        if collective:
            distributed.barrier()
        start = time.time()
        yield partial
        if collective:
            distributed.barrier()
        if main:
            summary.setdefault("seconds", round(time.time() - start, 1))
            with os_errors(f"move the finished {stage} stage into", self.root):
                for leftover in (marker, os.path.join(partial, "checkpoint.pt")):
                    if os.path.exists(leftover):
                        os.remove(leftover)
                done = {"stage": stage, "fingerprint": fingerprint, "summary": summary}
                if basis is not None:
                    done["basis"] = basis
                write_json(os.path.join(partial, "done.json"), done)
                final = self.path(stage)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                if os.path.exists(final):
                    trash = self.path(".partial", stage + ".old")
                    if os.path.exists(trash):
                        shutil.rmtree(trash)
                    os.replace(final, trash)
                    os.replace(partial, final)
                    shutil.rmtree(trash)
                else:
                    os.replace(partial, final)
                self._prune(os.path.dirname(partial))
        if collective:
            distributed.barrier()

    def _prune(self, directory: str) -> None:
        """Remove empty folders left in .partial by nested stages (student/<source>)."""
        top = self.path(".partial")
        while directory.startswith(top):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)
