"""The one training loop: epochs and steps, checkpoint/resume, the finite-loss guard, logs, progress, evaluation, DDP.

The weak teachers, the projector, every student and `hello-fast bench student-loop` train through
`Engine`. A kind of training is what is handed to it, not a loop:
- the model (wrapped for data parallelism here under torchrun) and its optimiser;
- the learning rate: a scheduler stepped per epoch or per step, or `lr_at(step, epoch)` set before each step;
- `loss(batch) -> (loss, samples)`: the batch's mean loss on this rank and its sample count (the
  engine weights it so that DDP's gradient average is the global batch's mean);
- `batches(epoch)`: the epoch's batches; `evaluate() -> top-1` and when to call it.
The engine seeds nothing and draws no random numbers of its own, so a loop moved onto it computes
exactly what it computed before. What a stage keeps beyond the model, optimiser and history (its
summary, a generator's state) is resumed through `extra`: {name: (get, set)}.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hello_fast import distributed
from hello_fast._progress import progress
from hello_fast.checkpoint import FiniteGuard, StageCheckpoint, set_rng_state
from hello_fast.errors import HelloError
from hello_fast.logs import TrainingLog

# what every engine checkpoint holds besides `extra`; an older checkpoint without them cannot be resumed
_STATE_KEYS = ("weights", "optimizer", "history", "step", "seen", "train_time")


def every(n: int, last: int) -> Callable[[int], bool]:
    """An evaluation cadence: every n-th epoch and the last."""
    return lambda epoch: epoch % n == 0 or epoch == last


class Engine:
    """One training run of `epochs` epochs, resumable from `folder`'s checkpoint (no folder: not resumable)."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device, epochs: int,
                 loss: Callable[[Any], tuple[torch.Tensor, int]], knob: str, folder: str | None = None,
                 checkpoint_every: int = 0, log: TrainingLog | Callable[[int], TrainingLog] | None = None,
                 scheduler=None, scheduler_per: str = "epoch", lr_at: Callable[[int, int], float] | None = None,
                 weights: tuple[Callable[[], dict], Callable[[dict], Any]] | None = None,
                 extra: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] | None = None,
                 frozen_backbone: bool = False):
        self.name, self.model, self.optimizer, self.device = name, model, optimizer, torch.device(device)
        self.net = distributed.data_parallel(model, self.device, frozen_backbone=frozen_backbone)
        self.epochs, self.loss, self.knob, self.folder = epochs, loss, knob, folder
        self.scheduler, self.scheduler_per, self.lr_at = scheduler, scheduler_per, lr_at
        self.weights = weights or (model.state_dict, model.load_state_dict)
        self.extra = extra or {}
        self.history: list[dict] = []  # {"epoch", "top1", "loss"} after every evaluation
        self.step_count = self.seen = 0
        self.train_time = 0.0  # seconds spent training (evaluation excluded), over all epochs run, resumes included
        self.epoch = 0  # the epoch being trained (lr_at and the log get it)
        self.first_epoch = 1
        self.last_loss = None
        self._guard = FiniteGuard()
        self._checkpoint = StageCheckpoint(folder, name, checkpoint_every) if folder else None
        state = self._checkpoint.load() if self._checkpoint else None
        if state is not None:
            self._resume(state)
        self.resumed = state is not None
        self.log = (log(self.first_epoch) if callable(log) else log) or TrainingLog(None)

    def _resume(self, state: dict) -> None:
        missing = [k for k in _STATE_KEYS + tuple(self.extra) if k not in state]
        if missing:
            raise HelloError(f"{self.name}: the checkpoint {self._checkpoint.path} was written by an older hello_fast "
                             f"(it lacks {', '.join(missing)}): delete it to start this stage over, or rerun with --force")
        self.weights[1](state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        self.step_count, self.seen, self.train_time = state["step"], state["seen"], state["train_time"]
        for key, (_, put) in self.extra.items():
            put(state[key])
        set_rng_state(state["rng"])
        self.first_epoch = state["epoch"] + 1

    def _save(self, epoch: int) -> None:
        if self._checkpoint is None:
            return
        state = {"weights": self.weights[0](), "optimizer": self.optimizer.state_dict(), "history": self.history,
                 "step": self.step_count, "seen": self.seen, "train_time": self.train_time}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        state.update({key: get() for key, (get, _) in self.extra.items()})
        self._checkpoint.save(state, epoch, self.epochs)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, batch) -> torch.Tensor:
        """One optimiser step on `batch`: the product's step, which the benchmark times too. Returns the loss."""
        if self.lr_at is not None:
            lr = self.lr_at(self.step_count, self.epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        loss, samples = self.loss(batch)
        loss = loss * distributed.loss_weight(samples, self.device)
        self._guard.add(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.log.step(loss, samples, self.lr, self.epoch)
        if self.scheduler is not None and self.scheduler_per == "step":
            self.scheduler.step()
        self.step_count += 1
        self.seen += samples
        self.last_loss = loss
        return loss

    def run(self, batches: Callable[[int], Iterable], *, evaluate: Callable[[], float] | None = None,
            evaluate_at: Callable[[int], bool] = lambda epoch: True,
            after_epoch: Callable[[int, float | None, float], None] | None = None) -> None:
        """Train from the first unfinished epoch to `epochs`. After each epoch: the finite-loss check, the epoch
        scheduler, `evaluate()` when `evaluate_at(epoch)` (appended to history), `after_epoch(epoch, top1 or None,
        training seconds)`, the log's row and the checkpoint."""
        bar = progress(range(self.first_epoch, self.epochs + 1), desc=self.name, unit="epoch")
        for epoch in bar:
            self.epoch = epoch
            self.net.train()
            self.log.begin_epoch()
            start = time.perf_counter()
            epoch_batches = batches(epoch)
            if hasattr(epoch_batches, "__len__"):  # a bar for an epoch of known length (20 batches or more)
                epoch_batches = progress(epoch_batches, desc=f"epoch {epoch}", unit="batch", disable_below=20)
            for batch in epoch_batches:
                self.step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.log.trained(self.device)
            seconds = time.perf_counter() - start
            self.train_time += seconds
            self._guard.check(self.name, epoch, self.knob, self.folder or ".")
            if self.scheduler is not None and self.scheduler_per == "epoch":
                self.scheduler.step()
            top1 = None
            if evaluate is not None and evaluate_at(epoch):
                top1 = evaluate()
                self.history.append({"epoch": epoch, "top1": top1, "loss": self.last_loss.item()})
                bar.set_postfix(top1=f"{top1:.1f}")
            if after_epoch is not None:
                after_epoch(epoch, top1, seconds)
            self.log.end_epoch(epoch, val_top1=top1)
            self._save(epoch)
        self.log.close()

    def images_per_second(self) -> float:
        """Training throughput over every epoch run (all ranks together)."""
        seen = distributed.sum_over_ranks([self.seen], self.device)[0]
        return round(seen / max(self.train_time, 1e-9), 1)
