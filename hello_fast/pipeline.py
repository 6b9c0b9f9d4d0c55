"""The pipeline: the stage graph in one place, and the one way every stage is run, skipped, resumed and reported on.

Each stage declares a `Stage` (hello_fast/stages/contract.py): the config options and stages it
reads, and `run(inputs, stage_dir) -> summary`; hello_fast/stages/__init__.py lists them. The order
they run in is derived from what each reads (`stage_order`: teachers -> select -> projector -> refine
-> student, or select after projector when the projector is the RDED observer). A stage's
fingerprint covers exactly its options, the data's identity (a folder's listing: names, sizes,
modification times) and the fingerprints of the stages it reads, so a rerun redoes exactly what a
config change made stale; computing it decodes no image and writes nothing (the image check runs
when a stage first loads the data). `Pipeline.status()` compares it with each finished stage's
done.json and names what changed. A stage run alone needs its inputs finished and current, and
says which command makes them.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import time

from hello_fast import distributed
from hello_fast._io import os_errors
from hello_fast._progress import log
from hello_fast._util import seed_everything
from hello_fast.config import Config, save_config
from hello_fast.data.loader import resolve_loader
from hello_fast.data.sources import folder_identity, load_splits
from hello_fast.data.validate import CACHE_NAME, images_summary
from hello_fast.errors import HelloError
from hello_fast.layout import distilled_stage
from hello_fast.rundir import RunDir
from hello_fast.stages import STAGES as _STAGE_MODULES
from hello_fast.stages.contract import Stage, StageInputs
from hello_fast.stages.report import run_title, write_report
from hello_fast.storage import storage_report

# The stage graph: each stage module's declaration (hello_fast/stages/__init__.py lists the modules).
GRAPH: dict[str, Stage] = {name: importlib.import_module(f"hello_fast.stages.{name}").STAGE for name in _STAGE_MODULES}
STAGES = tuple(GRAPH)
STATES = ("current", "stale", "missing")  # `status`'s answers for a stage that the config runs ("off": one it does not)


def stage_order(cfg: Config) -> tuple[str, ...]:
    """The stages in the order they run with `cfg`: each after every stage that one of its units reads; ties keep
    GRAPH's order. A read of an unknown stage or a cycle is refused, naming the stages."""
    needs = {name: {up for unit in s.units(cfg) for up in s.reads(cfg, unit)} for name, s in GRAPH.items()}
    for name, ups in needs.items():
        unknown = sorted(ups - set(GRAPH))
        if unknown:
            raise HelloError(f"stage {name} reads {', '.join(unknown)}, which is no stage ({', '.join(GRAPH)})")
    order: list[str] = []
    while len(order) < len(GRAPH):
        ready = next((n for n in GRAPH if n not in order and needs[n] <= set(order)), None)
        if ready is None:
            raise HelloError(f"the stages {', '.join(n for n in GRAPH if n not in order)} read each other in a circle")
        order.append(ready)
    return tuple(order)


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _as_json(value):
    """`value` as done.json gives it back (tuples become lists), so a recorded basis compares equal to a fresh one."""
    return json.loads(json.dumps(value, sort_keys=True))


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
        self._data_told = False
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
        """The original (train, val) sets, loaded when a stage first reads them: a folder's files pass the image
        check here (its verdicts cached in the run directory), never while fingerprinting."""
        if self._data is None:  # (an in-memory set may have been made for its identity already)
            self._data = load_splits(self.cfg.data, self.cfg.clip.class_names, check_cache=self.run.path(CACHE_NAME))
        if not self._data_told:
            train, _ = self._data
            loader = resolve_loader(self.cfg.data.loader, train)
            where = f"; loader: {loader}" + (" (GPU)" if loader == "dali" and self.device.type == "cuda" else "")
            log(f"data: {len(train)} train / {len(self._data[1])} val images, {train.num_classes} classes "
                f"({self.cfg.data.source}{where})")
            self._data_told = True
        return self._data

    def _data_identity(self) -> str:
        """The data's part of a fingerprint, pure: a folder's listing (no image opened, no check cache written), an
        in-memory set's membership and order. Once per Pipeline."""
        if self._data_id is None:
            if self.cfg.data.source == "folder":
                d = self.cfg.data
                self._data_id = folder_identity(d.root, d.num_classes, self.cfg.clip.class_names)
            else:
                if self._data is None:
                    self._data = load_splits(self.cfg.data, self.cfg.clip.class_names)
                train, val = self._data
                self._data_id = _hash(train.identity(), val.identity())
        return self._data_id

    # -- the stage graph ----------------------------------------------------------------------
    def order(self) -> tuple[str, ...]:
        """The stages in the order this config runs them (`stage_order`)."""
        return stage_order(self.cfg)

    def reads(self, stage: str, unit: str | None = None) -> tuple[str, ...]:
        """The finished stages whose outputs `stage` (its `unit`: a label source) reads, from the config alone."""
        return GRAPH[stage].reads(self.cfg, unit)

    def fingerprint(self, stage: str, unit: str | None = None) -> str:
        """Pure: the options the stage reads, the data's identity and its inputs' fingerprints; it runs nothing,
        decodes no image and writes nothing. The config and the data are fixed for a Pipeline's life, so each
        fingerprint is computed once."""
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

    def _basis(self, stage: str, unit: str | None) -> dict:
        """What the unit's fingerprint covers, by name (as done.json keeps it): `status` names what changed from it."""
        s = GRAPH[stage]
        return _as_json({"options": self.cfg.values(*s.options),
                         "data": self._data_identity() if s.reads_data else None,
                         "identity": list(s.identity(self.cfg, unit)),
                         "inputs": {up: self.fingerprint(up) for up in s.reads(self.cfg, unit)}})

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

    # -- running a stage: the same for every stage --------------------------------------------
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
                if s.reads_data:  # on every rank, before rank 0 may work alone: the image check waits for all ranks
                    self.data()
                seed_everything(self.cfg.seed)
                inputs = StageInputs(self.cfg, self.run, self.device, self.data, unit)
                basis = self._basis(stage, unit)
                if s.collective:
                    done = self._transaction(s, name, fp, inputs, basis)
                else:
                    done = self._on_main(name, lambda: self._transaction(s, name, fp, inputs, basis))
                self._timed(name, done)
            results[unit] = done
        return results[None] if list(results) == [None] else results

    def _transaction(self, s: Stage, name: str, fp: str, inputs: StageInputs, basis: dict) -> dict:
        """Run the stage in RUN/.partial/<name>; it becomes RUN/<name> (with done.json) only if run returns."""
        summary = {}
        with self.run.stage(name, fp, summary, collective=s.collective, basis=basis) as out:
            summary.update(s.run(inputs, out))
        return summary

    @_writes
    def report(self, students: dict | None = None) -> dict:
        """results.json and report.md: the last stage's units (the students, `students` or their done.json) and the
        other finished stages' summaries."""
        order = self.order()
        final = GRAPH[order[-1]]
        if students is None:
            students = {}
            for unit in final.units(self.cfg):
                done = self.run.done(final.unit_name(unit))
                if done is None:
                    raise HelloError(f"{final.unit_name(unit)} has not run in {self.run.root}: "
                                     f"run `hello-fast {final.name} --out {self.run.root}` first")
                students[unit] = done["summary"]
        train, _ = self.data()
        storage = storage_report(self.cfg, train.num_classes, train.class_names)
        stages = {}
        for name in order[:-1]:
            d = self.run.done(name)
            if d is not None and GRAPH[name].enabled(self.cfg):
                stages[name] = d["summary"]
        results = {
            "config": self.cfg.name,
            "title": run_title(self.cfg),
            "data": self.cfg.data.root if self.cfg.data.source == "folder" else self.cfg.data.source,
            "students": {k: {m: v[m] for m in ("top1_last", "top1_best", "label_bytes")} for k, v in students.items()},
            "storage": {k: storage[k] for k in ("artifact_bytes", "artifact_dtype", "artifact_bytes_fp16", "artifact_bytes_int8",
                                                "sre2l_soft_label_bytes", "teacher_bytes", "backbone", "backbone_bytes",
                                                "backbone_kind", "backbone_downloaded")},
            "stages": stages,
            "distilled_dir": self.run.path(distilled_stage(self.cfg)),
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
        """One stage alone (its inputs must be finished and current); returns its summary ({unit: summary} for a
        stage with units). The last stage of the order (the students) also writes the report and returns it."""
        if stage not in GRAPH:
            raise HelloError(f"unknown stage {stage!r}; stages: {', '.join(GRAPH)}")
        summary = self._run(stage)
        return self.report(summary) if stage == self.order()[-1] else summary

    @_writes
    def distill(self) -> dict:
        """All stages in `order()`, skipping finished ones; then the report. Returns results.

        The data flow: teachers -> (weak-teacher logits) projector -> (label artifact); teachers or projector
        (the RDED observer) -> select -> (distilled images) -> refine (with the projector) -> student (one per
        label source: hard labels, the teachers online, the artifact's projector online, or stored labels)."""
        start = time.time()
        self._auto = True
        try:
            results = {stage: self._run(stage) for stage in self.order()}
        finally:
            self._auto = False
        results = self.report(results[self.order()[-1]])
        log(f"distill: finished in {time.time() - start:.0f} s; results in {self.run.root}")
        return results

    # -- status: what a run would redo, and why -------------------------------------------------
    def status(self) -> dict[str, dict]:
        """Each stage's units in run order: {"teachers": {"state": ..., "reason": ...}, "student/hard": ...}.

        state: "current" (finished with this config and data, its inputs current), "stale" (the reason names the
        option, the data, the file or the input that changed), "missing" (never finished), or "off" (the config
        turns the stage off). Reads the run directory and the data's listing only: takes no lock, decodes no
        image and writes nothing."""
        states: dict[str, dict] = {}
        for stage in self.order():
            s = GRAPH[stage]
            if not s.enabled(self.cfg):
                states[stage] = {"state": "off", "reason": s.disabled_note}
                continue
            for unit in s.units(self.cfg):
                states[s.unit_name(unit)] = self._state(stage, unit, states)
        return states

    def _state(self, stage: str, unit: str | None, earlier: dict[str, dict]) -> dict:
        name = GRAPH[stage].unit_name(unit)
        done = self.run.done(name)
        if done is None:
            interrupted = os.path.isdir(self.run.path(".partial", name))
            return {"state": "missing", "reason": "interrupted (a rerun resumes it)" if interrupted else "not run"}
        for up in self.reads(stage, unit):
            if earlier[up]["state"] != "current":
                return {"state": "stale", "reason": f"input {up} is {earlier[up]['state']}"}
        if done.get("fingerprint") == self.fingerprint(stage, unit):
            return {"state": "current", "reason": ""}
        return {"state": "stale", "reason": self._what_changed(stage, unit, done.get("basis"))}

    def _what_changed(self, stage: str, unit: str | None, before: dict | None) -> str:
        """Why a finished unit's fingerprint differs from this config's, from the basis its done.json recorded."""
        if not isinstance(before, dict):  # a run finished before done.json kept its basis
            return "options changed"
        now, reasons = self._basis(stage, unit), []
        was, is_ = before.get("options") or {}, now["options"]
        keys = [k for k in sorted(set(was) | set(is_)) if was.get(k, _UNSET) != is_.get(k, _UNSET)]
        if len(keys) == 1:
            k = keys[0]
            reasons.append(f"{k} changed ({_shown(was.get(k, _UNSET))} -> {_shown(is_.get(k, _UNSET))})")
        elif keys:
            reasons.append(", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") + " changed")
        if before.get("data") != now["data"]:
            reasons.append("the data changed")
        if before.get("identity") != now["identity"]:
            reasons.append("a file it reads changed")
        was_in, now_in = before.get("inputs") or {}, now["inputs"]
        added, dropped = [up for up in now_in if up not in was_in], [up for up in was_in if up not in now_in]
        if added or dropped:  # e.g. the students read select once refine is off
            instead = f" instead of {', '.join(dropped)}" if dropped else ""
            reasons.append(f"reads {', '.join(added) or 'nothing more'} now{instead}")
        reasons += [f"input {up} changed" for up, fp in now_in.items() if up in was_in and was_in[up] != fp]
        return "; ".join(reasons) or "options changed"


_UNSET = object()


def _shown(value) -> str:
    return "not set" if value is _UNSET else json.dumps(value)

