"""Each stage on tiny procedural data, resuming, staleness, and the end-to-end outputs."""
import json
import os

import pytest
import torch
from conftest import tiny_config

from hello_fast.data.distilled import load_distilled
from hello_fast.errors import HelloError
from hello_fast.pipeline import Pipeline


def test_end_to_end_outputs(tiny_run):
    run, results = tiny_run
    for f in ("results.json", "report.md", "accuracy_vs_storage.png", "config.yaml", "projector/artifact.safetensors"):
        assert os.path.isfile(os.path.join(run, f)), f
    with open(os.path.join(run, "results.json")) as f:
        data = json.load(f)
    assert set(data["students"]) == {"hard", "teacher", "projector"}
    for r in data["students"].values():
        assert 0 <= r["top1_last"] <= 100 and r["top1_best"] >= r["top1_last"] and r["label_bytes"] > 0
    assert data["students"]["projector"]["label_bytes"] == os.path.getsize(os.path.join(run, "projector", "artifact.safetensors"))
    assert data["students"]["hard"]["label_bytes"] < data["students"]["projector"]["label_bytes"] < data["students"]["teacher"]["label_bytes"]
    with open(os.path.join(run, "accuracy_vs_storage.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(os.path.join(run, "report.md")).read()
    assert "projector" in report and "SRe2L" in report and "accuracy_vs_storage.png" in report
    assert not os.path.exists(os.path.join(run, ".partial"))  # nothing half-written left behind


def test_teachers_keep_the_asked_epochs(tiny_run):
    run, _ = tiny_run
    files = sorted(os.listdir(os.path.join(run, "teachers")))
    assert files == ["done.json", "epoch_001.safetensors", "epoch_002.safetensors"]
    from hello_fast._util import load_network

    model, meta = load_network(os.path.join(run, "teachers", "epoch_002.safetensors"), "cpu")
    assert meta["epoch"] == 2 and meta["num_classes"] == 3 and meta["class_names"][0] == "pattern 0"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_rded_selection_tiles_factor_squared_patches(tiny_run):
    run, _ = tiny_run
    d = load_distilled(os.path.join(run, "select"))
    assert d.images.shape == (6, 3, 32, 32)  # 3 classes x ipc 2
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    pngs = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(run, "select", "images")) for f in fs]
    assert len(pngs) == 6 and all(p.endswith(".png") for p in pngs)


def test_refine_moves_pixels_and_lowers_eq7(tiny_run):
    run, results = tiny_run
    before = load_distilled(os.path.join(run, "select")).images
    after = load_distilled(os.path.join(run, "refine")).images
    assert not torch.equal(before, after)
    r = results["stages"]["refine"]
    assert r["loss_last"] < r["loss_first"]


def test_rerun_skips_finished_stages_and_redoes_stale_ones(tiny_run, tmp_path, caplog):
    import shutil

    run, _ = tiny_run
    out = str(tmp_path / "copy")
    shutil.copytree(run, out)
    stamp = {s: os.path.getmtime(os.path.join(out, s, "done.json")) for s in ("teachers", "select", "projector", "refine")}
    pipe = Pipeline(tiny_config("student.label_sources=[hard]", "student.epochs=1"), out, device="cpu")
    results = pipe.distill()
    for s, t in stamp.items():
        assert os.path.getmtime(os.path.join(out, s, "done.json")) == t, f"{s} was redone"
    assert set(results["students"]) == {"hard"}
    assert pipe.run.done("student/hard")["summary"]["history"][-1]["epoch"] == 1  # student redone: its config changed
    Pipeline(tiny_config("projector.head_rank=2", "student.label_sources=[hard]", "student.epochs=1"), out, device="cpu").distill()
    assert os.path.getmtime(os.path.join(out, "teachers", "done.json")) == stamp["teachers"]
    assert os.path.getmtime(os.path.join(out, "projector", "done.json")) != stamp["projector"]
    assert os.path.getmtime(os.path.join(out, "refine", "done.json")) != stamp["refine"]  # downstream of the projector


def test_a_stage_alone_needs_current_inputs(tmp_path):
    pipe = Pipeline(tiny_config(), str(tmp_path / "fresh"), device="cpu")
    with pytest.raises(HelloError, match="the teachers stage has not run"):
        pipe.run_stage("projector")
    with pytest.raises(HelloError, match="unknown stage"):
        pipe.run_stage("teacher")


def test_random_selection_and_projector_observer(tiny_run, tmp_path):
    import shutil

    run, _ = tiny_run
    out = str(tmp_path / "obs")
    shutil.copytree(run, out)
    Pipeline(tiny_config("select.method=random"), out, device="cpu").run_stage("select")
    d = load_distilled(os.path.join(out, "select"))
    assert d.images.shape == (6, 3, 32, 32) and d.labels.bincount().tolist() == [2, 2, 2]
    Pipeline(tiny_config("select.observer=projector"), out, device="cpu").run_stage("select")
    assert json.load(open(os.path.join(out, "select", "distilled.json")))["method"] == "rded"


def test_same_seed_same_result(tiny_run, tmp_path):
    run, results = tiny_run
    again = Pipeline(tiny_config(), str(tmp_path / "again"), device="cpu").distill()
    assert again["students"] == results["students"]
    with open(os.path.join(run, "teachers", "epoch_002.safetensors"), "rb") as a, open(tmp_path / "again" / "teachers" / "epoch_002.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_stages_learn_on_procedural_data(tmp_path):
    cfg = tiny_config("data.procedural_per_class=24", "teachers.keep_epochs=[6]", "teachers.width=16",
                      "teachers.batch_size=8", "teachers.lr=0.01", "student.label_sources=[teacher]", "student.epochs=30",
                      "student.batch_size=6", "refine.enabled=false", "select.ipc=3")
    results = Pipeline(cfg, str(tmp_path / "learn"), device="cpu").distill()
    assert results["stages"]["teachers"]["top1"]["6"] > 60  # chance: 33%
    # MSE on the teacher's raw logits needs steps: 12 epochs (24 steps) stayed at chance (33.3%) and 30 reach
    # 93.3% best with this seed (2026-12-04); 60 leaves room for another machine's numerics, not for a collapse
    assert results["students"]["teacher"]["top1_best"] > 60


@pytest.mark.parametrize("arch", ["mobilenet_v2", "shufflenet_v2_x1_0", "vgg11"])
def test_students_by_name(tiny_run, tmp_path, arch):
    import shutil

    run, _ = tiny_run
    out = str(tmp_path / arch)
    shutil.copytree(run, out)
    res = Pipeline(tiny_config(f"student.arch={arch}", "student.width=null", "student.label_sources=[projector]",
                               "student.epochs=1", "student.loss=kl"), out, device="cpu").run_stage("student")
    assert 0 <= res["students"]["projector"]["top1_last"] <= 100
