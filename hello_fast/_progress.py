"""Progress bars for long loops (tqdm on stderr); HELLO_FAST_PROGRESS=0 or set_enabled(False) silences them."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

_enabled = os.environ.get("HELLO_FAST_PROGRESS", "1") != "0"


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def progress(iterable=None, *, desc: str, total=None, unit: str = "it", leave: bool = False, disable_below: int = 0):
    """A tqdm bar, off when disabled or when the loop has fewer than `disable_below` items."""
    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    off = not _enabled or (n is not None and n < disable_below) or not _main()
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=off, dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr)


def _main() -> bool:
    """Rank 0 of a torchrun job (or a plain run) speaks; the other ranks stay quiet."""
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    """One status line on stderr (stdout carries results), kept clear of any live progress bar; rank 0 only."""
    if _main():
        tqdm.write(message, file=sys.stderr)
