"""`hello-fast status`: each stage and student current, stale (naming what changed) or missing; it reads, never writes."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import refuse_decoding, tiny_sets

from hello_fast.cli import main as cli_main
from hello_fast.data import sources, validate
from hello_fast.pipeline import GRAPH, stage_order
from hello_fast.rundir import LOCK_NAME

UNITS = ("teachers", "select", "projector", "refine", "student/hard", "student/teacher", "student/projector")
FOLDER_DROP = ("data.source", "data.procedural", "data.num_classes")  # --data defines the classes


def _listing(*roots) -> dict:
    """Every file and folder under `roots` with its size and modification time."""
    out = {}
    for root in roots:
        for where, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(where, name))
                out[os.path.join(where, name)] = (st.st_size, st.st_mtime_ns)
    return out




def _status(cli_here, run, *args) -> dict:
    out = cli_here("status", "--out", run, "--json", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _states(status: dict) -> dict:
    return {name: s["state"] for name, s in status.items()}


# -- on the shared tiny run (procedural data) --------------------------------------------------------------------

def test_a_finished_run_is_current_and_status_writes_nothing(tiny_run, cli_here, monkeypatch):
    run, _ = tiny_run
    refuse_decoding(monkeypatch)
    before = _listing(run)
    status = _status(cli_here, run)
    assert _states(status) == dict.fromkeys(UNITS, "current")
    assert all(s["reason"] == "" for s in status.values())
    text = cli_here("status", "--out", run)
    assert text.returncode == 0 and text.stdout.count("current") == len(UNITS)
    assert _listing(run) == before  # no config.yaml, lock, check cache or log written or touched


def test_a_changed_student_option_makes_exactly_the_students_stale(tiny_run, cli_here):
    run, _ = tiny_run
    status = _status(cli_here, run, "--set", "student.epochs=3")
    assert {n for n, s in status.items() if s["state"] == "stale"} == {u for u in UNITS if u.startswith("student/")}
    assert all(status[u]["reason"] == "student.epochs changed (2 -> 3)" for u in UNITS if u.startswith("student/"))
    assert all(status[u]["state"] == "current" for u in ("teachers", "select", "projector", "refine"))


def test_an_upstream_option_names_the_option_there_and_the_input_below(tiny_run, cli_here):
    run, _ = tiny_run
    status = _status(cli_here, run, "--set", "projector.epochs=2")
    assert status["projector"] == {"state": "stale", "reason": "projector.epochs changed (1 -> 2)"}
    assert status["refine"] == {"state": "stale", "reason": "input projector is stale"}
    # every student reads the refined images, which the projector made
    assert all(status[u] == {"state": "stale", "reason": "input refine is stale"} for u in UNITS if u.startswith("student/"))
    assert status["teachers"]["state"] == status["select"]["state"] == "current"


def test_a_deleted_stage_is_missing_and_its_readers_stale(tiny_run, tmp_path, cli_here):
    run = str(tmp_path / "copy")
    shutil.copytree(tiny_run[0], run)
    shutil.rmtree(os.path.join(run, "select"))
    status = _status(cli_here, run)
    assert status["select"] == {"state": "missing", "reason": "not run"}
    assert status["refine"] == {"state": "stale", "reason": "input select is missing"}
    # the students read the refined images, which read the selection
    assert all(status[u] == {"state": "stale", "reason": "input refine is stale"} for u in UNITS if u.startswith("student/"))
    assert status["teachers"]["state"] == status["projector"]["state"] == "current"


def test_a_stage_the_config_turns_off_is_off_not_missing(tiny_run, cli_here):
    run, _ = tiny_run
    status = _status(cli_here, run, "--set", "refine.enabled=false")
    assert "refine" not in status  # the JSON holds only current | stale | missing
    assert all(s["state"] in ("current", "stale", "missing") for s in status.values())
    # the students now read the selected images, not the refined ones: a change of input
    assert status["student/hard"] == {"state": "stale", "reason": "reads select now instead of refine"}
    text = cli_here("status", "--out", run, "--set", "refine.enabled=false").stdout
    assert any(line.split()[:2] == ["refine", "off"] for line in text.splitlines())


def test_a_run_recorded_before_the_basis_says_options_changed(tiny_run, tmp_path, cli_here):
    run = str(tmp_path / "old")
    shutil.copytree(tiny_run[0], run)
    marker = os.path.join(run, "teachers", "done.json")
    with open(marker) as f:
        done = json.load(f)
    del done["basis"]
    with open(marker, "w") as f:
        json.dump(done, f)
    assert _status(cli_here, run)["teachers"]["state"] == "current"  # still current: the fingerprint is the same
    assert _status(cli_here, run, "--set", "teachers.epochs=3")["teachers"] == {"state": "stale", "reason": "options changed"}


def test_a_run_directory_that_does_not_exist_stays_absent(tmp_path, cli_here):
    run = tmp_path / "nothing"
    status = _status(cli_here, str(run), *tiny_sets())
    assert _states(status) == dict.fromkeys(UNITS, "missing")
    assert not run.exists()


def test_status_follows_the_run_order(tiny_run, cli_here):
    from conftest import tiny_config

    run, _ = tiny_run
    status = _status(cli_here, run, "--set", "select.observer=projector")
    assert list(dict.fromkeys(u.partition("/")[0] for u in status)) == list(stage_order(tiny_config("select.observer=projector")))
    assert status["select"]["state"] == "stale"
    assert status["select"]["reason"].startswith('select.observer changed ("teacher" -> "projector")')
    assert set(GRAPH) == {u.partition("/")[0] for u in status}


# -- on a finished run on an image folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished tiny distill on a folder of PNGs (train/ and val/): (data folder, run directory, its args)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder_status")
    images, labels = sources.procedural_images(3, 10, 32, seed=2)
    for split, keep in (("train", slice(0, 8)), ("val", slice(8, 10))):
        for c in range(3):
            d = root / "data" / split / f"shape{c}"
            d.mkdir(parents=True)
            for i, img in enumerate(images[labels == c][keep]):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    args = ["--data", str(root / "data"), "--out", str(root / "run"), *tiny_sets(drop=FOLDER_DROP)]
    assert cli_main(["distill", "--device", "cpu", "--quiet", *args]) == 0
    assert os.path.isfile(root / "run" / validate.CACHE_NAME)  # the image check ran, inside the stages
    return str(root / "data"), str(root / "run"), args


def test_on_a_folder_run_status_is_current_opens_no_image_and_writes_nothing(folder_run, cli_here, monkeypatch):
    data, run, args = folder_run
    refuse_decoding(monkeypatch)
    os.remove(os.path.join(run, validate.CACHE_NAME))  # a status must not make it again
    before = _listing(run, data)
    lock_before = os.path.exists(os.path.join(run, LOCK_NAME))
    out = cli_here("status", "--json", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _states(json.loads(out.stdout)) == dict.fromkeys(UNITS, "current")
    assert _listing(run, data) == before
    assert os.path.exists(os.path.join(run, LOCK_NAME)) == lock_before
    stale = json.loads(cli_here("status", "--json", *args, "--set", "student.epochs=1").stdout)
    assert {n for n, s in stale.items() if s["state"] == "stale"} == {u for u in UNITS if u.startswith("student/")}
    assert all("student.epochs" in stale[u]["reason"] for u in UNITS if u.startswith("student/"))
    assert _listing(run, data) == before


def test_on_a_folder_run_a_touched_image_makes_the_data_new(folder_run, cli_here, monkeypatch):
    data, run, args = folder_run
    image = os.path.join(data, "train", "shape0", "0.png")
    st = os.stat(image)
    try:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        status = json.loads(cli_here("status", "--json", *args).stdout)
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert status["teachers"] == {"state": "stale", "reason": "the data changed"}
    assert status["select"]["state"] == "stale"
    assert _states(json.loads(cli_here("status", "--json", *args).stdout)) == dict.fromkeys(UNITS, "current")
