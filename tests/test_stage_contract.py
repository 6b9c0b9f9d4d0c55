"""The Stage contract: every stage declares what it reads, and the pipeline alone runs, fingerprints and commits it."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest
from conftest import tiny_config

from hello_fast import config as config_mod
from hello_fast import pipeline as pipeline_mod
from hello_fast.pipeline import GRAPH, STAGES, Pipeline
from hello_fast.stages.contract import Stage

STAGE_DIR = os.path.join(os.path.dirname(pipeline_mod.__file__), "stages")
CONFIGS = [(), ("select.observer=projector",), ("select.method=random",), ("refine.enabled=false",),
           ("select.observer=full", "teachers.epochs=3"), ("student.label_sources=[hard,stored]",)]


def test_the_graph_holds_the_five_stages_in_distill_order():
    assert STAGES == ("teachers", "select", "projector", "refine", "student")
    assert all(isinstance(s, Stage) and s.name == name for name, s in GRAPH.items())


@pytest.mark.parametrize("extra", CONFIGS)
def test_each_stage_reads_only_known_stages_and_options(extra):
    cfg = tiny_config(*extra)
    sections = {f.name for f in dataclasses.fields(cfg)}
    for stage in GRAPH.values():
        for option in stage.options:
            section, _, key = option.lstrip("-").partition(".")
            assert section in sections, (stage.name, option)
            if key:
                assert key in {f.name for f in dataclasses.fields(getattr(cfg, section))}, (stage.name, option)
        for unit in stage.units(cfg):
            assert set(stage.reads(cfg, unit)) <= set(STAGES) - {stage.name}, (stage.name, unit)
    # the graph has no cycle: a stage reads only stages that some order puts before it
    order = ["teachers", "projector", "select"] if cfg.select.observer == "projector" else ["teachers", "select", "projector"]
    order += ["refine", "student"]
    for i, name in enumerate(order):
        for unit in GRAPH[name].units(cfg):
            assert set(GRAPH[name].reads(cfg, unit)) <= set(order[:i]), (name, unit)


def test_no_stage_module_opens_a_run_directory_transaction():
    """The transaction (RUN/.partial -> RUN/<stage>) belongs to the pipeline: one place, the same for all five."""
    for name in os.listdir(STAGE_DIR):
        if name.endswith(".py"):
            with open(os.path.join(STAGE_DIR, name)) as f:
                assert not re.search(r"\.stage\(", f.read()), f"stages/{name} opens run.stage() itself"


def test_fingerprints_run_nothing(tmp_path):
    out = tmp_path / "run"
    for extra in CONFIGS:
        cfg = tiny_config(*extra)
        pipe = Pipeline(cfg, str(out), device="cpu")
        fps = {(name, unit): pipe.fingerprint(name, unit) for name, s in GRAPH.items() for unit in s.units(cfg)}
        assert len(set(fps.values())) == len(fps)  # each unit its own fingerprint
    assert not out.exists()  # nothing trained, selected or even recorded


def _another_value(o):
    """A valid value other than the default for a bool, int or Literal option (None for the others)."""
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.hint is bool:
        return not o.default
    if o.hint is int:
        return o.default + 1
    return None


def test_result_neutral_options_rerun_nothing(tiny_run):
    """Every option declared neutral in config.py (data.num_workers, batch sizes of scoring and evaluation,
    progress and logging, ...) keeps every stage's fingerprint: a finished run stays finished."""
    run, _ = tiny_run
    base = Pipeline(tiny_config(), run, device="cpu")
    changes = [f"{o.key}={str(v).lower()}" for o in config_mod.options() if o.neutral
               for v in [_another_value(o)] if v is not None]
    assert "data.num_workers=1" in changes and len(changes) >= 8, changes
    for change in changes:
        cfg = tiny_config(change)
        other = Pipeline(cfg, run, device="cpu")
        for name, s in GRAPH.items():
            for unit in s.units(cfg):
                assert other.fingerprint(name, unit) == base.fingerprint(name, unit), (change, name, unit)
                assert other.run.is_current(s.unit_name(unit), other.fingerprint(name, unit)), (change, name, unit)


def test_a_failing_stage_leaves_nothing_finished_and_the_rerun_completes(tmp_path, monkeypatch):
    """The pipeline's transaction: a stage that dies part-way commits nothing; the next run redoes it."""
    out = str(tmp_path / "run")
    Pipeline(tiny_config(), out, device="cpu").teachers()
    real = GRAPH["select"]

    def dies(inputs, stage_dir):
        with open(os.path.join(stage_dir, "half.txt"), "w") as f:
            f.write("half")
        raise RuntimeError("killed part-way")

    monkeypatch.setitem(GRAPH, "select", dataclasses.replace(real, run=dies))
    with pytest.raises(RuntimeError, match="part-way"):
        Pipeline(tiny_config(), out, device="cpu").select()
    assert not os.path.exists(os.path.join(out, "select"))
    assert os.path.exists(os.path.join(out, ".partial", "select", "half.txt"))  # kept for a resume with the same config
    monkeypatch.setitem(GRAPH, "select", real)
    summary = Pipeline(tiny_config(), out, device="cpu").select()
    assert summary["images"] == 3 * 2  # 3 classes x ipc 2
    assert Pipeline(tiny_config(), out, device="cpu").run.done("select")["summary"]["images"] == 6
