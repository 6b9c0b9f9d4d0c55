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

from hello_fast import distributed
from hello_fast._progress import log, progress
from hello_fast._util import seed_everything
from hello_fast.config import Config, save_config
from hello_fast.errors import HelloError
from hello_fast.rundir import RunDir

STAGES = ("teachers", "select", "projector", "refine", "student")


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
            from hello_fast.data.sources import load_splits

            self._data = load_splits(self.cfg.data, self.cfg.clip.class_names)
            train, val = self._data
            from hello_fast.data.loader import resolve_loader

            loader = resolve_loader(self.cfg.data.loader, train)
            where = f"; loader: {loader}" + (" (GPU)" if loader == "dali" and self.device.type == "cuda" else "")
            log(f"data: {len(train)} train / {len(val)} val images, {train.num_classes} classes ({self.cfg.data.source}{where})")
        return self._data

    def _data_fp(self) -> str:
        train, val = self.data()
        return _hash(self.cfg.section_hash("data"), train.identity(), val.identity())

    # -- fingerprints -------------------------------------------------------------------------
    def fingerprint(self, stage: str, source: str | None = None) -> str:
        c = self.cfg
        if stage == "teachers":
            return _hash("teachers", self._data_fp(), c.section_hash("teachers"))
        if stage == "projector":
            return _hash("projector", self._data_fp(), c.section_hash("clip", "projector"), self._current("teachers"))
        if stage == "select":
            upstream = "" if c.select.method == "random" else self._current("teachers" if c.select.observer == "teacher" else "projector")
            return _hash("select", self._data_fp(), c.section_hash("select"), upstream)
        if stage == "refine":
            return _hash("refine", c.section_hash("refine"), self._current("select"), self._current("projector"))
        if stage == "student":
            parts = ["student", source, self._data_fp(), c.section_hash("student"), self._current(self._distilled_stage())]
            if source in ("teacher", "stored"):
                parts.append(self._current("teachers"))
            if source == "projector":
                parts.append(self._artifact_identity() if c.student.artifact else self._current("projector"))
            return _hash(*parts)
        raise ValueError(stage)

    def _artifact_identity(self) -> str:
        from hello_fast.projector.artifact import read_artifact

        _, meta = read_artifact(self.cfg.student.artifact)
        return _hash(meta["tensors_sha256"], self.cfg.student.artifact_weights or "")

    def _distilled_stage(self) -> str:
        return "refine" if self.cfg.refine.enabled else "select"

    def _current(self, stage: str) -> str:
        """The fingerprint of a finished, current stage; in distill mode a missing one is made first."""
        fp = self.fingerprint(stage) if stage != "student" else None
        if self.run.is_current(stage, fp):
            return fp
        if self._auto:
            getattr(self, stage)()
            return fp
        what = "has not run" if self.run.done(stage) is None else "is out of date with this config"
        raise HelloError(f"the {stage} stage {what} in {self.run.root}: run `hello-fast {stage} --out {self.run.root}` "
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
        seed_everything(self.cfg.seed)
        if on_main:
            return self._on_main(stage, lambda: self._timed(stage, work(fp)))
        return self._timed(stage, work(fp))

    def teachers(self) -> dict:
        from hello_fast.stages.teachers import train_teachers

        return self._stage("teachers", lambda fp: train_teachers(self.cfg, self.data(), self.run, self.device, fp))

    def projector(self) -> dict:
        from hello_fast.stages.projector import train_projector

        return self._stage("projector", lambda fp: train_projector(self.cfg, self.data(), self.run, self.device, fp))

    def select(self) -> dict:
        from hello_fast.stages import select as sel
        from hello_fast.stages.projector import artifact_path
        from hello_fast.stages.teachers import observer_path

        def work(fp):
            observer = None
            if self.cfg.select.method == "rded":
                if self.cfg.select.observer == "teacher":
                    observer = sel.teacher_observer(observer_path(self.run), self.device, self.cfg.data.image_size)
                else:
                    from hello_fast.projector.artifact import load_projector

                    projector, _ = load_projector(artifact_path(self.run), device=self.device)
                    observer = sel.projector_observer(projector, self.cfg.data.image_size)
            return sel.select_images(self.cfg, self.data(), self.run, self.device, fp, observer)

        return self._stage("select", work, on_main=True)

    def refine(self) -> dict | None:
        from hello_fast.stages.projector import artifact_path
        from hello_fast.stages.refine import refine_images

        if not self.cfg.refine.enabled:
            log("refine: disabled in this config (refine.enabled: false), the selected images are used as they are")
            return None
        return self._stage("refine", lambda fp: refine_images(self.cfg, self.run, self.device, fp, self.run.path("select"),
                                                              artifact_path(self.run)), on_main=True)

    def student(self) -> dict:
        """Train one student per label source (each its own resumable unit); returns results."""
        from hello_fast.data.distilled import load_distilled
        from hello_fast.stages import student as st

        distilled_dir = self.run.path(self._distilled_stage())
        results = {}
        for source in self.cfg.student.label_sources:
            unit = f"student/{source}"
            fp = self.fingerprint("student", source)
            done = self._skip(unit, fp)
            if done is not None:
                results[source] = done
                continue
            _, val_set = self.data()
            distilled = load_distilled(distilled_dir)
            seed_everything(self.cfg.seed)
            summary = {}
            with self.run.stage(unit, fp, summary, collective=True) as out:
                labeler = self._label_source(source, distilled, out)
                summary.update(st.train_student(self.cfg, distilled, val_set, labeler, self.device, out))
            results[source] = self._timed(unit, summary)
        return results

    def _label_source(self, source: str, distilled, out_dir: str):
        from hello_fast import labels
        from hello_fast.stages import student as st
        from hello_fast.stages.projector import artifact_path
        from hello_fast.stages.teachers import load_teachers

        sc = self.cfg.student
        fast = sc.loop == "fast"
        if source == "hard":
            return labels.HardLabels(len(distilled))
        if source in ("teacher", "stored"):
            summary = self.run.done("teachers")["summary"]
            teachers = labels.TeacherLabels(load_teachers(self.run, self.device), sum(summary["bytes"].values()), fast=fast)
            if source == "teacher":
                return teachers
            # SRe2L-style: label the whole schedule once with the teachers, store it, replay it
            folder = os.path.join(out_dir, "labels")
            schedule = st.schedule_of(self.cfg, len(distilled))
            if distributed.world().main and not labels.StoredLabels.complete(folder, schedule):
                resident = st.resident_set(self.cfg, distilled, self.device)
                labels.StoredLabels.write(folder, resident, teachers, schedule, out_size=self.cfg.data.image_size,
                                          scale=sc.scale, flip=self.cfg.data.flip, mix=sc.mix, alpha=sc.mix_alpha,
                                          views=st.views_for(teachers, self.device, fast), progress=progress)
            distributed.barrier()
            return labels.StoredLabels(folder, self.device)
        from hello_fast.projector.artifact import load_projector

        path = sc.artifact or artifact_path(self.run)
        projector, meta = load_projector(path, num_classes=self.data()[0].num_classes, device="cpu",
                                         clip_pretrained=sc.artifact_weights)
        if meta["class_names"] != self.data()[0].class_names:
            log(f"student: note: {path} names its classes {meta['class_names'][:3]}..., the data {self.data()[0].class_names[:3]}...; "
                "labels follow the artifact's class order")
        return labels.ProjectorLabels(projector, meta, os.path.getsize(path), device=self.device, fast=fast, capture=sc.capture)

    def report(self, students: dict) -> dict:
        from hello_fast.stages.report import write_report
        from hello_fast.storage import storage_report

        train, _ = self.data()
        storage = storage_report(self.cfg, train.num_classes, train.class_names)
        stages = {}
        for s in ("teachers", "select", "projector", "refine"):
            d = self.run.done(s)
            if d is not None and (s != "refine" or self.cfg.refine.enabled):
                stages[s] = d["summary"]
        results = {
            "config": self.cfg.name,
            "students": {k: {m: v[m] for m in ("top1_last", "top1_best", "label_bytes")} for k, v in students.items()},
            "storage": {k: storage[k] for k in ("artifact_bytes", "sre2l_soft_label_bytes", "teacher_bytes")},
            "stages": stages,
            "distilled_dir": self.run.path(self._distilled_stage()),
        }
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
