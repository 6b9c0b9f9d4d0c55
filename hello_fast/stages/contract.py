"""The contract every pipeline stage implements: what it is called, what it reads, and run(inputs, stage_dir) -> summary.

A stage module (teachers, select, projector, refine, student) declares one `Stage`. The pipeline
(hello_fast/pipeline.py) owns everything around a stage's work, the same way for all five: the
pure fingerprint (from exactly the config fields in `options`, the data's identity when
`reads_data`, the `identity` parts, and the fingerprints of the stages `reads` names), skipping a
finished and current unit, making or asking for its inputs, seeding, the run-directory transaction
(RUN/.partial/<unit> becomes RUN/<unit> with done.json only when `run` returns) and, for a stage
that is not `collective`, rank 0 working while the other ranks wait for its result. A stage's
`run` only computes: it reads the finished upstream stages through `inputs.run`, writes its files
into `stage_dir` (which may hold an interrupted run's checkpoint to resume from) and returns its
summary (JSON-able).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hello_fast.config import Config
from hello_fast.rundir import RunDir


@dataclass
class StageInputs:
    """What a stage's `run` gets besides its own folder."""

    cfg: Config
    run: RunDir  # finished upstream stages' files, found through hello_fast.layout (load_teachers, artifact_path, ...)
    device: torch.device
    load_data: Callable[[], tuple]  # the original (train, val) image sets, loaded once, on first use
    unit: str | None = None  # the unit of a stage with several (the student's label source)

    def data(self) -> tuple:
        return self.load_data()


def _no_parts(cfg: Config, unit: str | None) -> tuple[str, ...]:
    return ()


def _one_unit(cfg: Config) -> tuple[str | None, ...]:
    return (None,)


def _always(cfg: Config) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared by its module."""

    name: str
    # config sections or fields it reads ("data", "teachers"; "-student.artifact" leaves one out);
    # result-neutral options (declared neutral in config.py) never count
    options: tuple[str, ...]
    run: Callable[[StageInputs, str], dict]  # (inputs, stage_dir) -> summary
    reads: Callable[[Config, str | None], tuple[str, ...]] = _no_parts  # the stages whose outputs it reads
    collective: bool = True  # every rank works (data-parallel); False: rank 0 alone, the others wait
    reads_data: bool = True  # the original set's identity enters the fingerprint
    identity: Callable[[Config, str | None], tuple[str, ...]] = _no_parts  # what else its result depends on (files' hashes)
    units: Callable[[Config], tuple[str | None, ...]] = _one_unit  # one resumable unit each (RUN/<name>/<unit>)
    enabled: Callable[[Config], bool] = _always
    disabled_note: str = field(default="")  # logged when the config turns the stage off

    def unit_name(self, unit: str | None) -> str:
        return self.name if unit is None else f"{self.name}/{unit}"
