"""Data-parallel stages under torchrun (2 CPU processes, gloo) against single-process runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_sets

from hello_fast.pipeline import Pipeline
from hello_fast.projector.artifact import read_artifact


def _torchrun(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hello_fast", *args, "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _single(*args):
    """The same command in one process, at the torchrun ranks' thread count (the thread count changes float sums)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "hello_fast", *args, "--device", "cpu"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_projector_stage_on_two_processes_equals_one(tmp_path):
    one, out = tmp_path / "one", tmp_path / "ddp"
    _single("teachers", "--out", str(one), *tiny_sets())
    shutil.copytree(one / "teachers", out / "teachers")
    _single("projector", "--out", str(one), *tiny_sets())
    _torchrun("projector", "--out", str(out), *tiny_sets())
    single, _ = read_artifact(str(one / "projector" / "artifact.safetensors"))
    double, meta = read_artifact(str(out / "projector" / "artifact.safetensors"))
    for k in single:  # the same global batches, gradients averaged with per-rank weights: the same training
        assert torch.allclose(single[k], double[k], atol=1e-5), k
    assert not os.path.exists(out / ".partial")


LEARN = ["data.procedural_per_class=40", "teachers.keep_epochs=[6]", "teachers.width=16", "teachers.batch_size=8",
         "teachers.lr=0.01", "select.ipc=4", "refine.enabled=false", "student.epochs=15", "student.batch_size=6",
         "student.label_sources=[hard,teacher]"]


@pytest.mark.slow
def test_student_stage_on_two_processes_matches_one(tmp_path):
    single_dir = str(tmp_path / "single")
    single = Pipeline(tiny_config(*LEARN), single_dir, device="cpu").distill()["students"]
    double_dir = tmp_path / "double"
    shutil.copytree(single_dir, double_dir)
    shutil.rmtree(double_dir / "student")
    out = _torchrun("student", "--out", str(double_dir), *tiny_sets(*LEARN))
    assert "label source" in out.stdout and out.stdout.count("label source") == 1  # rank 0 alone reports
    double = json.loads((double_dir / "results.json").read_text())["students"]
    for source in ("hard", "teacher"):
        assert double[source]["top1_best"] > 50  # learned (chance: 33%)
        # per-rank BatchNorm on CPUs (SyncBatchNorm needs GPUs) and per-rank CutMix partners: close, not equal
        assert abs(double[source]["top1_best"] - single[source]["top1_best"]) <= 20
        assert double[source]["label_bytes"] == single[source]["label_bytes"]


@pytest.mark.slow
def test_a_study_on_two_processes_writes_its_files_once(tmp_path):
    """`hello-fast study` under torchrun: the stages and students run data-parallel; rank 0 alone writes and reports."""
    out = tmp_path / "study"
    res = _torchrun("study", "sources", "--out", str(out), "--seeds", "0", "--sources", "hard", "teacher",
                    *tiny_sets("refine.enabled=false", "student.epochs=1"))
    assert res.stdout.count("study directory:") == 1 and res.stderr.count("study: cell") == 2
    doc = json.loads((out / "study.json").read_text())
    assert [(r["source"], r["seed"]) for r in doc["rows"]] == [("hard", 0), ("teacher", 0)]
    assert len(list((out / "cells").glob("*.json"))) == 2 and (out / "study.md").is_file()
    # run again: every cell finished, nothing trains
    again = _torchrun("study", "sources", "--out", str(out), "--seeds", "0", "--sources", "hard", "teacher",
                      *tiny_sets("refine.enabled=false", "student.epochs=1"))
    assert "study: cell" not in again.stderr and json.loads((out / "study.json").read_text())["rows"] == doc["rows"]
