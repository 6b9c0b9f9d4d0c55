"""The pipeline: orders the stages, skips the finished ones, and runs any one stage alone.

`Pipeline(cfg, out).distill()` runs teachers -> select -> projector -> refine -> student -> report
(select after projector when the projector is the RDED observer). Each stage's fingerprint
covers its config sections and the fingerprints of the stages it reads, so a rerun redoes
exactly what a config change made stale. A stage run alone needs its inputs finished and
current, and says which command makes them.
"""
from __future__ import annotations

import hashlib
import os
import time

from hello_fast import distributed, labels
from hello_fast._io import file_sha256
from hello_fast._progress import log
from hello_fast._util import seed_everything
from hello_fast.config import Config, is_checkpoint_path, save_config
from hello_fast.data.distilled import load_distilled
from hello_fast.data.loader import resolve_loader
from hello_fast.data.sources import load_splits
from hello_fast.data.validate import CACHE_NAME, images_summary
from hello_fast.errors import HelloError
from hello_fast.projector.artifact import read_artifact
from hello_fast.rundir import RunDir
from hello_fast.stages import select as sel
from hello_fast.stages import student as st
from hello_fast.stages.projector import artifact_path, train_projector
from hello_fast.stages.refine import refine_images
from hello_fast.stages.report import run_title, write_report
from hello_fast.stages.teachers import train_teachers, trains_full
from hello_fast.storage import storage_report

STAGES = ("teachers", "select", "projector", "refine", "student")
# the config options each stage reads (a section: its options less the result-neutral ones; -key: left out).
# One student (one label source) does not read the list of sources, nor another source's artifact.
_OPTIONS = {
    "teachers": ("data", "teachers"),
    "select": ("data", "select"),
    "projector": ("data", "clip", "projector"),
    "refine": ("refine",),
    "student": ("data", "student", "-student.label_sources", "-student.artifact", "-student.artifact_weights"),
}


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
    def reads(self, stage: str, source: str | None = None) -> tuple[str, ...]:
        """The finished stages whose outputs `stage` reads, from the config alone."""
        c = self.cfg
        if stage == "teachers":
            return ()
        if stage == "projector":
            return ("teachers",)
        if stage == "select":
            if c.select.method == "random" or is_checkpoint_path(c.select.observer):
                return ()
            return ("projector",) if c.select.observer == "projector" else ("teachers",)
        if stage == "refine":
            return ("select", "projector")
        if stage == "student":
            inputs = [self._distilled_stage()]
            if source in ("teacher", "stored"):
                inputs.append("teachers")
            if source == "projector" and not c.student.artifact:
                inputs.append("projector")
            return tuple(inputs)
        raise ValueError(stage)

    def fingerprint(self, stage: str, source: str | None = None) -> str:
        """Pure: the options the stage reads, the data's identity and its inputs' fingerprints; it runs nothing.

        The config and the data are fixed for a Pipeline's life, so each fingerprint is computed once."""
        key = (stage, source)
        if key not in self._fingerprints:
            self._fingerprints[key] = self._fingerprint(stage, source)
        return self._fingerprints[key]

    def _fingerprint(self, stage: str, source: str | None) -> str:
        parts = [stage, source or "", self.cfg.fingerprint(*_OPTIONS[stage])]
        if stage != "refine":  # refinement reads the distilled images, not the original set
            parts.append(self._data_identity())
        parts += [self.fingerprint(up) for up in self.reads(stage, source)]
        c = self.cfg
        if stage == "teachers" and trains_full(c):
            parts.append("full observer")  # the run then goes on to teachers.epochs
        if stage == "select" and c.select.method == "rded" and is_checkpoint_path(c.select.observer):
            parts.append(file_sha256(c.select.observer, "observer checkpoint (select.observer names a file)"))
        if stage == "student" and source == "projector" and c.student.artifact:
            parts.append(self._artifact_identity())
        return _hash(*parts)

    def _artifact_identity(self) -> str:
        _, meta = read_artifact(self.cfg.student.artifact)
        return _hash(meta["tensors_sha256"], self.cfg.student.artifact_weights or "")

    def _distilled_stage(self) -> str:
        return "refine" if self.cfg.refine.enabled else "select"

    def _require_inputs(self, stage: str, source: str | None = None) -> None:
        """Every input of `stage` finished and current; in distill mode a missing one is made first."""
        for up in self.reads(stage, source):
            if self.run.is_current(up, self.fingerprint(up)):
                continue
            if self._auto:
                getattr(self, up)()
                continue
            what = "has not run" if self.run.done(up) is None else "is out of date with this config"
            raise HelloError(f"the {up} stage {what} in {self.run.root}: run `hello-fast {up} --out {self.run.root}` "
                             f"(or `hello-fast distill`) first")

    def _timed(self, stage: str, summary: dict | None) -> dict | None:
        if summary is not None and "seconds" in summary:
            log(f"{stage}: done in {summary['seconds']:.1f} s")
        return summary

    def _skip(self, stage: str, fp: str) -> dict | None:
        if not self.force and self.run.is_current(stage, fp):
            log(f"{stage}: finished earlier with this config, skipping (--force redoes it)")
            return self.run.done(stage)["summary"]
        self._record_config()
        return None

    # -- stages -------------------------------------------------------------------------------
    def _stage(self, stage: str, work, *, on_main: bool = False) -> dict:
        """Skip a finished, current stage; else seed and run work(fingerprint) (rank 0 alone when on_main)."""
        fp = self.fingerprint(stage)
        done = self._skip(stage, fp)
        if done is not None:
            return done
        self._require_inputs(stage)
        seed_everything(self.cfg.seed)
        if on_main:
            return self._on_main(stage, lambda: self._timed(stage, work(fp)))
        return self._timed(stage, work(fp))

    def teachers(self) -> dict:
        return self._stage("teachers", lambda fp: train_teachers(self.cfg, self.data(), self.run, self.device, fp))

    def projector(self) -> dict:
        return self._stage("projector", lambda fp: train_projector(self.cfg, self.data(), self.run, self.device, fp))

    def select(self) -> dict:
        def work(fp):
            observer = sel.make_observer(self.cfg, self.run, self.device, self.data()[0].num_classes)
            return sel.select_images(self.cfg, self.data(), self.run, self.device, fp, observer)

        return self._stage("select", work, on_main=True)

    def refine(self) -> dict | None:
        if not self.cfg.refine.enabled:
            log("refine: disabled in this config (refine.enabled: false), the selected images are used as they are")
            return None
        return self._stage("refine", lambda fp: refine_images(self.cfg, self.run, self.device, fp, self.run.path("select"),
                                                              artifact_path(self.run)), on_main=True)

    def student(self) -> dict:
        """Train one student per label source (each its own resumable unit); returns results."""
        distilled_dir = self.run.path(self._distilled_stage())
        results = {}
        for source in self.cfg.student.label_sources:
            unit = f"student/{source}"
            fp = self.fingerprint("student", source)
            done = self._skip(unit, fp)
            if done is not None:
                results[source] = done
                continue
            self._require_inputs("student", source)
            _, val_set = self.data()
            distilled = load_distilled(distilled_dir)
            seed_everything(self.cfg.seed)
            summary = {}
            with self.run.stage(unit, fp, summary, collective=True) as out:
                labeler = labels.label_source(source, self.cfg, self.run, distilled, out, self.device, self.data()[0])
                summary.update(st.train_student(self.cfg, distilled, val_set, labeler, self.device, out,
                                                 log_root=self.run.root))
            results[source] = self._timed(unit, summary)
        return results

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
                                                "backbone_downloaded")},
            "stages": stages,
            "distilled_dir": self.run.path(self._distilled_stage()),
        }
        images = images_summary(*self.data())  # the image check's counts (folder data)
        if images is not None:
            results["images"] = images
        if self.world.main:
            self._record_config()
            write_report(self.run, results)
        return results

    def run_stage(self, stage: str):
        """One stage alone (its inputs must be finished and current)."""
        if stage not in STAGES:
            raise HelloError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stage == "student":
            students = self.student()
            return self.report(students)
        return getattr(self, stage)()

    def distill(self) -> dict:
        """All stages in order, skipping finished ones; then the report. Returns results."""
        start = time.time()
        self._auto = True
        try:
            self.teachers()
            order = ("projector", "select") if self.cfg.select.observer == "projector" else ("select", "projector")
            for stage in order:
                getattr(self, stage)()
            self.refine()
            students = self.student()
        finally:
            self._auto = False
        results = self.report(students)
        log(f"distill: finished in {time.time() - start:.0f} s; results in {self.run.root}")
        return results
