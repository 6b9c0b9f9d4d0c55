"""The Stage contract: every stage declares what it reads, and the pipeline alone runs, fingerprints and commits it."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest
from conftest import refuse_decoding, tiny_config

from hello_fast import config as config_mod
from hello_fast import pipeline as pipeline_mod
from hello_fast import stages as stages_mod
from hello_fast.cli import build_parser
from hello_fast.data import sources, validate
from hello_fast.errors import HelloError
from hello_fast.pipeline import GRAPH, STAGES, Pipeline, stage_order
from hello_fast.stages.contract import Stage

STAGE_DIR = os.path.join(os.path.dirname(pipeline_mod.__file__), "stages")
CONFIGS = [(), ("select.observer=projector",), ("select.method=random",), ("refine.enabled=false",),
           ("select.observer=full", "teachers.epochs=3"), ("student.label_sources=[hard,stored]",)]


def test_the_graph_holds_the_listed_stages_and_orders_them_by_what_they_read():
    assert STAGES == tuple(stages_mod.STAGES) == ("teachers", "select", "projector", "refine", "student")
    assert all(isinstance(s, Stage) and s.name == name for name, s in GRAPH.items())
    assert stage_order(tiny_config()) == ("teachers", "select", "projector", "refine", "student")
    # the projector as RDED's observer: selection reads it, so it runs first
    assert stage_order(tiny_config("select.observer=projector")) == ("teachers", "projector", "select", "refine", "student")
    assert stage_order(tiny_config("select.method=random")) == ("teachers", "select", "projector", "refine", "student")


def test_the_commands_and_their_help_come_from_the_stage_list():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, what in stages_mod.STAGES.items():
        assert name in commands and commands[name].description == what
    assert {"distill", "status"} <= set(commands)


def test_a_circle_or_an_unknown_stage_in_the_reads_is_refused(monkeypatch):
    cfg = tiny_config()
    monkeypatch.setitem(GRAPH, "teachers", dataclasses.replace(GRAPH["teachers"], reads=lambda cfg, unit: ("student",)))
    with pytest.raises(HelloError, match="read each other in a circle"):
        stage_order(cfg)
    monkeypatch.setitem(GRAPH, "teachers", dataclasses.replace(GRAPH["teachers"], reads=lambda cfg, unit: ("labels",)))
    with pytest.raises(HelloError, match="teachers reads labels, which is no stage"):
        stage_order(cfg)


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
    # the order distill runs puts every stage after each stage it reads
    order = stage_order(cfg)
    assert sorted(order) == sorted(STAGES)
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


def _jpeg_folder(root, classes=3, per_class=4):
    from PIL import Image

    images, labels = sources.procedural_images(classes, per_class, 24, seed=3)
    for i, (img, label) in enumerate(zip(images, labels.tolist())):
        d = root / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.jpg", quality=90)
    return root




def test_a_folder_runs_fingerprints_open_no_image_and_write_nothing(tmp_path, monkeypatch):
    """The data's identity is the folder's listing: no image check (no image_check.npz), no decode, no file."""
    data = _jpeg_folder(tmp_path / "data")
    out = tmp_path / "run"
    cfg = tiny_config()
    cfg.data.source, cfg.data.root = "folder", str(data)
    refuse_decoding(monkeypatch)
    pipe = Pipeline(cfg, str(out), device="cpu")
    fps = {(name, unit): pipe.fingerprint(name, unit) for name, s in GRAPH.items() for unit in s.units(cfg)}
    assert len(set(fps.values())) == len(fps)
    assert not out.exists() and not (out / validate.CACHE_NAME).exists()
    # a file touched or replaced makes the data new: every stage that reads it changes
    again = Pipeline(cfg, str(out), device="cpu")
    assert again.fingerprint("teachers") == fps["teachers", None]
    victim = next((data / "class_1").iterdir())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert Pipeline(cfg, str(out), device="cpu").fingerprint("teachers") != fps["teachers", None]


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
    Pipeline(tiny_config(), out, device="cpu").run_stage("teachers")
    real = GRAPH["select"]

    def dies(inputs, stage_dir):
        with open(os.path.join(stage_dir, "half.txt"), "w") as f:
            f.write("half")
        raise RuntimeError("killed part-way")

    monkeypatch.setitem(GRAPH, "select", dataclasses.replace(real, run=dies))
    with pytest.raises(RuntimeError, match="part-way"):
        Pipeline(tiny_config(), out, device="cpu").run_stage("select")
    assert not os.path.exists(os.path.join(out, "select"))
    assert os.path.exists(os.path.join(out, ".partial", "select", "half.txt"))  # kept for a resume with the same config
    monkeypatch.setitem(GRAPH, "select", real)
    summary = Pipeline(tiny_config(), out, device="cpu").run_stage("select")
    assert summary["images"] == 3 * 2  # 3 classes x ipc 2
    assert Pipeline(tiny_config(), out, device="cpu").run.done("select")["summary"]["images"] == 6
