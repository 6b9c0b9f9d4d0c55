"""Crash-safe runs: SIGKILL mid-stage, rerun the same command, get the uninterrupted result; NaN losses stop cleanly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config, tiny_sets

from hello_fast.errors import HelloError
from hello_fast.pipeline import Pipeline

LONG = ["teachers.keep_epochs=[1,2,3,4,5,6,7,8,9,10]", "projector.epochs=8", "student.epochs=12",
        "student.label_sources=[hard]", "refine.enabled=false"]


def _cmd(out, extra):
    return [sys.executable, "-m", "hello_fast", "distill", "--device", "cpu", "--out", str(out), *tiny_sets(*extra)]


def kill_when(cmd, marker, delay=0.2, timeout=600):
    """Start cmd, SIGKILL it shortly after `marker` appears; True if it was killed mid-run."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while not os.path.exists(marker):
        if p.poll() is not None or time.time() - start > timeout:
            p.kill()
            return False
        time.sleep(0.01)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    results = Pipeline(tiny_config(*LONG), str(out), device="cpu").distill()
    return out, results


def _same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


@pytest.mark.slow
@pytest.mark.parametrize("stage, check", [
    ("teachers", "teachers/epoch_010.safetensors"),
    ("projector", "projector/artifact.safetensors"),
    ("student/hard", "student/hard/student.safetensors"),
])
def test_sigkill_mid_stage_then_rerun_gives_the_uninterrupted_result(reference, tmp_path, stage, check):
    import shutil

    ref_dir, ref_results = reference
    out = tmp_path / "run"
    upstream = {"teachers": [], "projector": ["teachers", "select"], "student/hard": ["teachers", "select", "projector"]}
    for done in upstream[stage]:  # finished stages carry over (same fingerprints): the rerun starts at `stage`
        shutil.copytree(ref_dir / done, out / done)
    cmd = _cmd(out, LONG)
    assert kill_when(cmd, str(out / ".partial" / stage / "checkpoint.pt")), "the run finished before it could be killed"
    assert not (out / stage / "done.json").exists()  # killed mid-stage: nothing committed for it
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    label = "student (hard)" if stage.startswith("student") else stage
    assert f"{label}: resuming from the checkpoint after epoch" in again.stderr
    if check.endswith("student.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(str(ref_dir / check)), load_file(str(out / check))
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert _same_file(ref_dir / check, out / check)  # byte for byte
    assert json.loads((out / "results.json").read_text())["students"] == ref_results["students"]
    assert not (out / ".partial").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F

    calls = {"n": 0}
    real = F.cross_entropy

    def poisoned(*args, **kwargs):  # the third epoch's first step goes to NaN
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    pipe = Pipeline(tiny_config("teachers.keep_epochs=[1,2,3,4]"), str(tmp_path / "nan"), device="cpu")
    with pytest.raises(HelloError) as e:
        pipe.run_stage("teachers")  # 36 train images, batch 16: 3 steps per epoch
    msg = str(e.value)
    assert "NaN or infinite in epoch 3" in msg and "last good checkpoint is kept" in msg and "teachers.lr" in msg
    ckpt = tmp_path / "nan" / ".partial" / "teachers" / "checkpoint.pt"
    assert ckpt.exists()
    from hello_fast.checkpoint import load_checkpoint

    state = load_checkpoint(str(ckpt))
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["weights"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "teachers" / "done.json").exists()
