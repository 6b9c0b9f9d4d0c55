"""Progress for long loops: tqdm bars in a terminal, plain lines in a log file; HELLO_FAST_PROGRESS=0 or set_enabled(False) silences them.

A run written to a file (`> log`, Slurm, CI) would otherwise hold every tqdm redraw (carriage
returns, dozens per epoch). Where stderr is not a terminal, a loop over epochs writes one line
per epoch and any other loop (batches, files) one line per tenth of its items once it has run
for LONG_SECONDS, with the bar's figures: count, percent, elapsed, time left, rate, postfix.
HELLO_FAST_PROGRESS=bars or =lines picks one form whatever stderr is.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

_enabled = os.environ.get("HELLO_FAST_PROGRESS", "1") != "0"
LONG_SECONDS = 30.0  # a loop of batches or files that ends sooner writes no line of its own (its epoch's line says it)
STEPS = 10  # a long loop's lines: one per tenth of its items


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def progress(iterable=None, *, desc: str, total=None, unit: str = "it", leave: bool = False, disable_below: int = 0,
             file=None):
    """Progress over `iterable` (or `update(n)` calls up to `total`): a tqdm bar on a terminal, plain lines elsewhere.

    Off when disabled, on the non-zero ranks of a torchrun job, or when the loop has fewer than
    `disable_below` items. `file` is where it writes (stderr when None)."""
    file = sys.stderr if file is None else file
    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    off = not _enabled or (n is not None and n < disable_below) or not _main()
    if not off and not _bars(file):
        return _Lines(iterable, desc=desc, total=n, unit=unit, file=file)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=off, dynamic_ncols=True, mininterval=0.5,
                file=file)


def _bars(file) -> bool:
    """Bars where they redraw in place (a terminal), unless HELLO_FAST_PROGRESS says which."""
    forced = os.environ.get("HELLO_FAST_PROGRESS", "")
    if forced in ("bars", "lines"):
        return forced == "bars"
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget that updates in place
        return True
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class _Lines:
    """The part of tqdm's interface the stages use (iterate, update, set_postfix, close, `with`), written as lines."""

    def __init__(self, iterable, *, desc: str, total: int | None, unit: str, file):
        self.iterable, self.desc, self.total, self.unit, self.file = iterable, desc, total, unit, file
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._next_step = 1  # the next tenth of `total` to report

    def __iter__(self):
        for item in self.iterable:
            yield item  # the loop's body runs here, so its set_postfix lands in this item's line
            self.update(1)

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass  # every line is written whole: nothing to clear

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        elapsed = now - self._start
        if self.unit == "epoch":
            due = True
        elif self.total:
            step = self.n * STEPS // self.total
            due = step >= self._next_step and elapsed >= LONG_SECONDS
            self._next_step = max(self._next_step, step + 1)
        else:
            due = now - self._last >= LONG_SECONDS
        if due:
            self._last = now
            self.file.write(self._line(elapsed) + "\n")
            self.file.flush()

    def _line(self, elapsed: float) -> str:
        """`desc: 3/60 epoch (5%) [00:12 elapsed, 03:48 left, 4.00 s/epoch] top1=45.2` (tqdm's figures)."""
        rate = self.n / elapsed if elapsed > 0 else None
        figures = [f"{tqdm.format_interval(elapsed)} elapsed"]
        if self.total:
            count = f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)"
            if rate:
                figures.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        else:
            count = f"{self.n} {self.unit}"
        if rate:
            figures.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
        return f"{self.desc}: {count} [{', '.join(figures)}]" + (f" {self.postfix}" if self.postfix else "")


def _main() -> bool:
    """Rank 0 of a torchrun job (or a plain run) speaks; the other ranks stay quiet."""
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    """One status line on stderr (stdout carries results), kept clear of any live progress bar; rank 0 only."""
    if _main():
        tqdm.write(message, file=sys.stderr)
