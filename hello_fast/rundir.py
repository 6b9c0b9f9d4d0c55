"""The run directory: one folder per stage, written atomically, with a fingerprint that says whether it is current.

A stage works in `RUN/.partial/<stage>/` and, when it finishes, moves that folder to `RUN/<stage>/`
with a `done.json` holding its fingerprint (a hash of the config sections and upstream results it
depends on) and its summary. A stage whose `done.json` carries the current fingerprint is
skipped on a rerun; a stale or missing one is (re)done, resuming from the checkpoint an
interrupted run left in its partial folder. Nothing half-written ever sits at a stage's final path.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time

from hello_fast import distributed
from hello_fast._io import read_json, write_json


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
    def stage(self, stage: str, fingerprint: str, summary: dict, collective: bool = False):
        """Work in the stage's partial folder (yielded); on success it becomes RUN/<stage> with done.json.

        A partial folder left by an interrupted run with the same fingerprint is kept (the stage
        resumes from the checkpoint in it); any other is cleared. The caller fills `summary` before
        the block ends. `collective`: every rank of a data-parallel run enters; rank 0 alone
        touches the files, the others wait for it at the boundaries.
        """
        main = distributed.world().main
        partial = self.path(".partial", stage)
        marker = os.path.join(partial, ".fingerprint")
        if main:
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
            for leftover in (marker, os.path.join(partial, "checkpoint.pt")):
                if os.path.exists(leftover):
                    os.remove(leftover)
            write_json(os.path.join(partial, "done.json"), {"stage": stage, "fingerprint": fingerprint, "summary": summary})
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
