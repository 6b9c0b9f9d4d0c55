"""Training logs people can plot: each training stage's scalars per epoch (and per step on request), as CSV and TensorBoard.

A stage opens `TrainingLog.for_stage(cfg, run_root, stage, first_epoch=)`, calls `begin_epoch()`,
`step(loss, images, lr)` after every optimiser step, `trained(device)` when the epoch's training
is over (before evaluation) and `end_epoch(epoch, val_top1=)`. Files, in `cfg.log_dir/<stage>/`
(default `RUN/logs/<stage>/`):
- `epochs.csv`: one row per epoch: epoch, loss (the epoch's mean), lr (at its last step),
  val_top1 (empty where the stage did not evaluate), img_per_s (training only), seconds;
- `steps.csv` (with `log_steps: true`): step, epoch, loss, lr of every step (one host sync a step);
- TensorBoard event files beside them (tags `epoch/<name>`; steps in `steps/`, tags `step/<name>`)
  when the `tensorboard` package is installed (`pip install "hello_fast[tensorboard]"`), for
  `tensorboard --logdir RUN/logs`.
A stage resumed from a checkpoint keeps the rows of the epochs before the one it restarts at and
writes the rest again (TensorBoard is told to purge them); a stage that starts from epoch 1
starts its logs afresh. Under torchrun only rank 0 writes (its own loss; the metrics are global).
"""
from __future__ import annotations

import contextlib
import csv
import glob
import os
import threading
import time

import torch

from hello_fast import distributed
from hello_fast._io import os_error_line, os_errors
from hello_fast.errors import HelloError

EPOCH_COLUMNS = ("epoch", "loss", "lr", "val_top1", "img_per_s", "seconds")
STEP_COLUMNS = ("step", "epoch", "loss", "lr")
EPOCHS_CSV = "epochs.csv"
STEPS_CSV = "steps.csv"


def stage_log_dir(cfg, run_root: str, stage: str) -> str:
    """Where a stage's logs go: `cfg.log_dir/<stage>`, or `RUN/logs/<stage>`."""
    return os.path.join(cfg.log_dir or os.path.join(run_root, "logs"), stage)


def _kept_rows(path: str, before_epoch: int) -> list[dict]:
    """The rows of a CSV from an interrupted run that belong to epochs before `before_epoch`."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit() and int(row["epoch"]) < before_epoch]


def _after_earlier_event_files(directory: str) -> None:
    """Wait until the clock's second is later than every event file's in `directory`.

    TensorBoard reads a folder's event files in name order, and a name carries the whole second it
    was opened in, then the process's writer count as text ("10" sorts before "9"): a resumed log
    opened in the second of the file it supersedes could be read first, and its purge undone."""
    stamps = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        parts = name.split(".")
        if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def _tensorboard_writer(directory: str, purge_step: int | None):
    try:  # optional: the `tensorboard` extra; torch's writer imports it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    if purge_step is not None:
        _after_earlier_event_files(directory)
    if threading.excepthook is not _quiet_writer_thread:
        global _next_excepthook
        _next_excepthook, threading.excepthook = threading.excepthook, _quiet_writer_thread
    with os_errors("write the TensorBoard log in", directory):
        return SummaryWriter(directory, purge_step=purge_step)


_next_excepthook = threading.excepthook


def _quiet_writer_thread(args) -> None:
    """TensorBoard writes its events in a thread that dies with a traceback when the OS refuses a write (a full
    disk), then re-raises the error at the writer's next flush; end_epoch says that one in one line."""
    if (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)
            and os_error_line(args.exc_value) is not None):
        return
    _next_excepthook(args)


class _Table:
    """A CSV with fixed columns, flushed row by row (a crashed run leaves every finished row readable)."""

    def __init__(self, path: str, columns, kept: list[dict]):
        self.path = path
        self.columns = columns
        self.file = None
        with self._refused():
            self.file = open(path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=columns)
            self.writer.writeheader()
            for row in kept:
                self.writer.writerow({c: row.get(c, "") for c in columns})
            self.file.flush()

    @contextlib.contextmanager
    def _refused(self):
        """A refused write (a full disk) as one line; the file is closed at once, so no unflushed row is tried again
        (and reported as an ignored exception) when the interpreter exits."""
        try:
            with os_errors("write the training log", self.path):
                yield
        except HelloError:
            if self.file is not None:
                with contextlib.suppress(OSError):
                    self.file.close()
            raise

    def write(self, row: dict) -> None:
        with self._refused():
            self.writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in self.columns})
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TrainingLog:
    """The scalars of one training stage; a disabled log (other ranks) accepts every call and writes nothing."""

    def __init__(self, directory: str | None, *, first_epoch: int = 1, steps: bool = False):
        self.directory = directory
        self.steps = steps and directory is not None
        self._loss_sum = None
        self._step_count = self._images = 0
        self._lr = None
        self._start = self._trained_s = None
        self._step = 0
        self._epochs = self._step_table = self._tb = self._tb_steps = None
        if directory is None:
            return
        with os_errors("create the training log folder", directory):
            os.makedirs(directory, exist_ok=True)
        steps_dir = os.path.join(directory, "steps")
        if first_epoch <= 1:  # a fresh start: nothing of an earlier run's logs stays
            for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")) + \
                    glob.glob(os.path.join(steps_dir, "events.out.tfevents.*")) + [os.path.join(directory, STEPS_CSV)]:
                if os.path.isfile(path):
                    os.remove(path)
        kept_epochs = _kept_rows(os.path.join(directory, EPOCHS_CSV), first_epoch)
        self._epochs = _Table(os.path.join(directory, EPOCHS_CSV), EPOCH_COLUMNS, kept_epochs)
        self._tb = _tensorboard_writer(directory, purge_step=first_epoch if first_epoch > 1 else None)
        if self.steps:
            kept_steps = _kept_rows(os.path.join(directory, STEPS_CSV), first_epoch)
            self._step = max((int(r["step"]) for r in kept_steps if r.get("step", "").isdigit()), default=0)
            self._step_table = _Table(os.path.join(directory, STEPS_CSV), STEP_COLUMNS, kept_steps)
            self._tb_steps = _tensorboard_writer(steps_dir, purge_step=self._step + 1 if self._step else None)

    @classmethod
    def for_stage(cls, cfg, run_root: str | None, stage: str, *, first_epoch: int = 1) -> "TrainingLog":
        """The log of `stage` for this config; rank 0 writes, other ranks get a disabled log."""
        if not distributed.world().main or (run_root is None and not cfg.log_dir):
            return cls(None)
        return cls(stage_log_dir(cfg, run_root, stage), first_epoch=first_epoch, steps=cfg.log_steps)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def begin_epoch(self) -> None:
        self._loss_sum, self._step_count, self._images, self._trained_s = None, 0, 0, None
        self._start = time.perf_counter()

    def step(self, loss: torch.Tensor, images: int, lr: float, epoch: int | None = None) -> None:
        """After an optimiser step: the step's loss (a tensor; summed on its device, no host sync) and batch size."""
        if not self.enabled:
            return
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._step_count += 1
        self._images += int(images)
        self._lr = float(lr)
        self._step += 1
        if self.steps:
            value = float(detached)
            self._step_table.write({"step": self._step, "epoch": epoch, "loss": value, "lr": self._lr})
            if self._tb_steps is not None:
                self._tb_steps.add_scalar("step/loss", value, self._step)
                self._tb_steps.add_scalar("step/lr", self._lr, self._step)

    def trained(self, device=None) -> None:
        """The epoch's training is over (evaluation is not counted in img/s)."""
        if not self.enabled:
            return
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        self._trained_s = time.perf_counter() - self._start

    def end_epoch(self, epoch: int, *, val_top1: float | None = None) -> None:
        if not self.enabled:
            return
        seconds = self._trained_s if self._trained_s is not None else time.perf_counter() - self._start
        row = {"epoch": epoch, "loss": float(self._loss_sum) / self._step_count if self._step_count else None,
               "lr": self._lr, "val_top1": None if val_top1 is None else float(val_top1),
               "img_per_s": round(self._images / seconds, 2) if seconds > 0 else None, "seconds": round(seconds, 4)}
        self._epochs.write(row)
        with os_errors("write the TensorBoard log in", self.directory):
            if self._tb is not None:
                for name in EPOCH_COLUMNS[1:]:
                    if row[name] is not None:
                        self._tb.add_scalar(f"epoch/{name}", row[name], epoch)
                self._tb.flush()
            if self._tb_steps is not None:
                self._tb_steps.flush()

    def close(self) -> None:
        for t in (self._epochs, self._step_table):
            if t is not None:
                t.close()
        for w in (self._tb, self._tb_steps):
            if w is not None:
                w.close()
        self._epochs = self._step_table = self._tb = self._tb_steps = None
        self.directory = None
