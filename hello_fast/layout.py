"""The run directory's layout: where the finished stages keep the files that later stages and the library read.

The weak teachers and the fully trained observer (RUN/teachers), the label artifact
(RUN/projector/artifact.safetensors) and the distilled images (RUN/select or RUN/refine). Stage
modules write there and the library (label sources, RelabelMix) reads from there through this
module, so neither imports the other.
"""
from __future__ import annotations

import os

import torch

from hello_fast._util import load_network
from hello_fast.errors import HelloError

TEACHERS = "teachers"
PROJECTOR = "projector"
ARTIFACT = "artifact.safetensors"


def teacher_path(stage_dir: str, epoch: int) -> str:
    """The checkpoint file of the teacher run at `epoch` inside the teachers stage's folder."""
    return os.path.join(stage_dir, f"epoch_{epoch:03d}.safetensors")


def load_teachers(run, device) -> list[torch.nn.Module]:
    """Every weak teacher of a finished teachers stage, in epoch order, in eval mode."""
    done = run.done(TEACHERS)
    if done is None:
        raise HelloError(f"{run.root} has no finished teachers stage: run `hello-fast teachers --out {run.root}`")
    return [load_network(run.path(TEACHERS, name), device)[0] for name in done["summary"]["checkpoints"]]


def observer_path(run, full: bool = False) -> str:
    """The RDED observer: the last (strongest) weak teacher, or with `full` the fully trained network."""
    done = run.done(TEACHERS)
    if done is None:
        raise HelloError(f"{run.root} has no finished teachers stage: run `hello-fast teachers --out {run.root}`")
    summary = done["summary"]
    if full:
        if "observer" not in summary:
            raise HelloError(f"the teachers stage in {run.root} kept no fully trained network: set select.observer: full "
                             f"or list rded in student.label_sources, and rerun `hello-fast teachers --out {run.root}`")
        return run.path(TEACHERS, summary["observer"])
    return run.path(TEACHERS, summary["checkpoints"][-1])


def artifact_path(run) -> str:
    """The label artifact the run's projector stage wrote."""
    return run.path(PROJECTOR, ARTIFACT)


def distilled_stage(cfg) -> str:
    """The stage whose images the students train on: refine when it is on, else select."""
    return "refine" if cfg.refine.enabled else "select"
