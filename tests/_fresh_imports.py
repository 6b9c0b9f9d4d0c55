"""Imports each named module first in a process of its own: `python _fresh_imports.py MODULE...` prints one JSON line per module.

This interpreter starts fresh, loads the heavy third-party libraries once (torch, torchvision:
~4 s, nearly all of an import's cost), and then forks one child per module before anything of
hello_fast is imported; the child imports that one module and exits. So each module is the first
of the package that its process imports (an import circle that only one order closes, or an
import that raises, fails), at the cost of a fork rather than an interpreter start. Two children
run at a time. Line: {"module": name, "error": null or "Type: message (file:line)"}.
"""
import importlib
import json
import os
import sys
import traceback

import torch  # noqa: F401  (loaded before the forks, shared by every child)
import torchvision  # noqa: F401

PARALLEL = 2


def _child(name: str, fd: int) -> None:
    try:
        importlib.import_module(name)
        error = ""
    except BaseException as e:  # noqa: BLE001 (any failure to import is the report)
        where = traceback.extract_tb(e.__traceback__)[-1]
        error = f"{traceback.format_exception_only(type(e), e)[-1].strip()} ({where.filename}:{where.lineno})"
    os.write(fd, error.encode())
    os._exit(0)


def _start(name: str):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(name, w)
    os.close(w)
    return pid, r


def _finish(name: str, pid: int, r: int) -> dict:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    error = b"".join(chunks).decode() or None
    if os.waitstatus_to_exitcode(status) != 0:
        error = f"the importing process died (exit status {os.waitstatus_to_exitcode(status)})"
    return {"module": name, "error": error}


def main(names: list[str]) -> None:
    loaded = [m for m in sys.modules if m.split(".")[0] == "hello_fast"]
    assert not loaded, f"hello_fast was imported before the forks: {loaded}"
    todo, running = list(names), []
    while todo or running:
        while todo and len(running) < PARALLEL:
            name = todo.pop(0)
            running.append((name, *_start(name)))
        name, pid, r = running.pop(0)
        print(json.dumps(_finish(name, pid, r)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
