"""The pipeline: the stage graph in one place, and the one way every stage is run, skipped and resumed.

`Pipeline(cfg, out).distill()` runs teachers -> select -> projector -> refine -> student -> report
(select after projector when the projector is the RDED observer). Each stage declares a `Stage`
(hello_fast/stages/contract.py): the config options and stages it reads, and `run(inputs,
stage_dir) -> summary`. Its fingerprint covers exactly those options, the data's identity and
the fingerprints of the stages it reads, so a rerun redoes exactly what a config change made
stale; computing it runs nothing. A stage run alone needs its inputs finished and current, and
says which command makes them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time

from hello_fast import distributed
from hello_fast._io import os_errors
from hello_fast._progress import log
from hello_fast._util import seed_everything
from hello_fast.config import Config, save_config
from hello_fast.data.loader import resolve_loader
from hello_fast.data.sources import load_splits
from hello_fast.data.validate import CACHE_NAME, images_summary
from hello_fast.errors import HelloError
from hello_fast.rundir import RunDir
from hello_fast.stages import projector, refine, select, student, teachers
from hello_fast.stages.contract import Stage, StageInputs
from hello_fast.stages.report import run_title, write_report
from hello_fast.storage import storage_report

# The stage graph: each stage declares what it reads (hello_fast/stages/contract.py); distill() runs
# them in this order, except that select follows projector when the projector is its observer.
GRAPH: dict[str, Stage] = {s.name: s for s in (teachers.STAGE, select.STAGE, projector.STAGE, refine.STAGE, student.STAGE)}
STAGES = tuple(GRAPH)


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _writes(method):
    """The method writes the run directory: it holds the directory's lock (hello_fast/rundir.py) while it runs.

    Taken before anything is read or written (the image check's cache, config.yaml) and held across the
    stages of a distill; nested calls share the outer one's hold."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.run.lock():
            return method(self, *args, **kwargs)
    return locked


class Pipeline:
    def __init__(self, cfg: Config, out: str, device: str | None = None, force: bool = False):
        self.cfg = cfg
        self.run = RunDir(out)
        # under torchrun: this rank's device, and the process group (a plain run is world size 1)
        self.world, self.device = distributed.setup(device or cfg.device)
        self.force = force
        self._data = None
        self._data_id = None
        self._fingerprints = {}
        self._auto = False  # True while distill() runs: missing inputs are made, not reported

    def _record_config(self) -> None:
        """Write the run's config.yaml once a stage is about to run on validated inputs."""
        if self.world.main:
            with os_errors("write the run's config", self.run.path("config.yaml")):
                os.makedirs(self.run.root, exist_ok=True)
                save_config(self.cfg, self.run.path("config.yaml"))

    def _on_main(self, stage: str, work):
        """A stage that one process does (selection, refinement): rank 0 works, the others wait for its result."""
        result = work() if self.world.main else None
        distributed.barrier()
        if not self.world.main:
            done = self.run.done(stage)
            result = done["summary"] if done else None
        return result

    # -- inputs -------------------------------------------------------------------------------
    def data(self):
        if self._data is None:

            self._data = load_splits(self.cfg.data, self.cfg.clip.class_names, check_cache=self.run.path(CACHE_NAME))
            train, val = self._data

            loader = resolve_loader(self.cfg.data.loader, train)
            where = f"; loader: {loader}" + (" (GPU)" if loader == "dali" and self.device.type == "cuda" else "")
            log(f"data: {len(train)} train / {len(val)} val images, {train.num_classes} classes ({self.cfg.data.source}{where})")
        return self._data

    def _data_identity(self) -> str:
        if self._data_id is None:  # hashes every file name: once per run, not once per fingerprint
            train, val = self.data()
            self._data_id = _hash(train.identity(), val.identity())
        return self._data_id

    # -- the stage graph ----------------------------------------------------------------------
    def reads(self, stage: str, unit: str | None = None) -> tuple[str, ...]:
        """The finished stages whose outputs `stage` (its `unit`: a label source) reads, from the config alone."""
        return GRAPH[stage].reads(self.cfg, unit)

    def fingerprint(self, stage: str, unit: str | None = None) -> str:
        """Pure: the options the stage reads, the data's identity and its inputs' fingerprints; it runs nothing.

        The config and the data are fixed for a Pipeline's life, so each fingerprint is computed once."""
        key = (stage, unit)
        if key not in self._fingerprints:
            s = GRAPH[stage]
            parts = [stage, unit or "", self.cfg.fingerprint(*s.options)]
            if s.reads_data:
                parts.append(self._data_identity())
            parts += s.identity(self.cfg, unit)
            parts += [self.fingerprint(up) for up in s.reads(self.cfg, unit)]
            self._fingerprints[key] = _hash(*parts)
        return self._fingerprints[key]

    def _require_inputs(self, stage: str, unit: str | None = None) -> None:
        """Every input of `stage` finished and current; in distill mode a missing one is made first."""
        for up in self.reads(stage, unit):
            if self.run.is_current(up, self.fingerprint(up)):
                continue
            if self._auto:
                self._run(up)
                continue
            what = "has not run" if self.run.done(up) is None else "is out of date with this config"
            raise HelloError(f"the {up} stage {what} in {self.run.root}: run `hello-fast {up} --out {self.run.root}` "
                             f"(or `hello-fast distill`) first")

    def _timed(self, name: str, summary: dict | None) -> dict | None:
        if summary is not None and "seconds" in summary:
            log(f"{name}: done in {summary['seconds']:.1f} s")
        return summary

    def _skip(self, name: str, fp: str) -> dict | None:
        if not self.force and self.run.is_current(name, fp):
            log(f"{name}: finished earlier with this config, skipping (--force redoes it)")
            return self.run.done(name)["summary"]
        self._record_config()
        return None

    # -- running a stage: the same for all five -----------------------------------------------
    @_writes
    def _run(self, stage: str):
        """Each unit of `stage`: skip it when finished and current, else make its inputs current, seed, and run it
        in a run-directory transaction (rank 0 alone when the stage is not collective). Returns the summary
        (a stage with units: {unit: summary}; a disabled stage: None)."""
        s = GRAPH[stage]
        if not s.enabled(self.cfg):
            log(f"{stage}: {s.disabled_note}")
            return None
        results = {}
        for unit in s.units(self.cfg):
            name, fp = s.unit_name(unit), self.fingerprint(stage, unit)
            done = self._skip(name, fp)
            if done is None:
                self._require_inputs(stage, unit)
                seed_everything(self.cfg.seed)
                inputs = StageInputs(self.cfg, self.run, self.device, self.data, unit)
                if s.collective:
                    done = self._transaction(s, name, fp, inputs)
                else:
                    done = self._on_main(name, lambda: self._transaction(s, name, fp, inputs))
                self._timed(name, done)
            results[unit] = done
        return results[None] if list(results) == [None] else results

    def _transaction(self, s: Stage, name: str, fp: str, inputs: StageInputs) -> dict:
        """Run the stage in RUN/.partial/<name>; it becomes RUN/<name> (with done.json) only if run returns."""
        summary = {}
        with self.run.stage(name, fp, summary, collective=s.collective) as out:
            summary.update(s.run(inputs, out))
        return summary

    def teachers(self) -> dict:
        return self._run("teachers")

    def projector(self) -> dict:
        return self._run("projector")

    def select(self) -> dict:
        return self._run("select")

    def refine(self) -> dict | None:
        return self._run("refine")

    def student(self) -> dict:
        """One student per label source (each its own resumable unit): {source: summary}."""
        return self._run("student")

    @_writes
    def report(self, students: dict) -> dict:
        train, _ = self.data()
        storage = storage_report(self.cfg, train.num_classes, train.class_names)
        stages = {}
        for s in ("teachers", "select", "projector", "refine"):
            d = self.run.done(s)
            if d is not None and (s != "refine" or self.cfg.refine.enabled):
                stages[s] = d["summary"]
        results = {
            "config": self.cfg.name,
            "title": run_title(self.cfg),
            "data": self.cfg.data.root if self.cfg.data.source == "folder" else self.cfg.data.source,
            "students": {k: {m: v[m] for m in ("top1_last", "top1_best", "label_bytes")} for k, v in students.items()},
            "storage": {k: storage[k] for k in ("artifact_bytes", "artifact_dtype", "artifact_bytes_fp16", "artifact_bytes_int8",
                                                "sre2l_soft_label_bytes", "teacher_bytes", "backbone", "backbone_bytes",
                                                "backbone_kind", "backbone_downloaded")},
            "stages": stages,
            "distilled_dir": self.run.path(student.distilled_stage(self.cfg)),
        }
        images = images_summary(*self.data())  # the image check's counts (folder data)
        if images is not None:
            results["images"] = images
        if self.world.main:
            self._record_config()
            write_report(self.run, results)
        return results

    @_writes
    def run_stage(self, stage: str):
        """One stage alone (its inputs must be finished and current)."""
        if stage not in STAGES:
            raise HelloError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stage == "student":
            students = self.student()
            return self.report(students)
        return getattr(self, stage)()

    @_writes
    def distill(self) -> dict:
        """All stages in order, skipping finished ones; then the report. Returns results.

        The data flow: teachers -> (weak-teacher logits) projector -> (label artifact); teachers or projector
        (the RDED observer) -> select -> (distilled images) -> refine (with the projector) -> student (one per
        label source: hard labels, the teachers online, the artifact's projector online, or stored labels)."""
        start = time.time()
        self._auto = True
        try:
            order = list(STAGES)
            if self.cfg.select.observer == "projector":
                order[1:3] = ["projector", "select"]
            results = {stage: self._run(stage) for stage in order}
        finally:
            self._auto = False
        results = self.report(results["student"])
        log(f"distill: finished in {time.time() - start:.0f} s; results in {self.run.root}")
        return results
