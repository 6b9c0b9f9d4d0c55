"""The hello-fast command: help, one-line errors with non-zero exits, and the end-to-end run."""
import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_sets

CMD = [sys.executable, "-m", "hello_fast"]


def run(*args, cwd=None, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(CMD + list(args), capture_output=True, text=True, cwd=cwd, env=e)


@pytest.mark.parametrize("sub", ["", "distill", "teachers", "select", "projector", "refine", "student", "inspect", "storage",
                                 "study"])
def test_help_explains(sub):
    out = run(*([sub] if sub else []), "--help")
    assert out.returncode == 0
    assert "usage: hello-fast" in out.stdout
    if sub in ("distill", "student", "study"):
        assert "--config" in out.stdout and "--data" in out.stdout and "--set" in out.stdout


def test_console_script_is_the_same_command():
    import shutil

    exe = shutil.which("hello-fast")
    if exe is None:
        pytest.skip("hello-fast is not on PATH (package not installed)")
    a = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert a.stdout == run("--help").stdout


def _assert_clean_error(out, words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith("hello-fast: error:")]
    assert len(lines) == 1, out.stderr
    assert words in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, cli_here):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("student:\n  epoch: 3\n")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    foreign = tmp_path / "f.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(foreign))
    out_dir = str(tmp_path / "run")
    _assert_clean_error(run("distill", "--data", str(tmp_path / "nope"), "--out", out_dir), "does not exist")
    _assert_clean_error(cli_here("distill", "--data", str(empty), "--out", out_dir), "is empty")
    _assert_clean_error(cli_here("distill", "--config", str(cfg), "--out", out_dir), "unknown key student.epoch")
    _assert_clean_error(cli_here("inspect", str(truncated)), "not a readable label artifact")
    _assert_clean_error(cli_here("inspect", str(foreign)), "not a hello_fast label artifact")
    _assert_clean_error(cli_here("projector", "--out", out_dir), "teachers stage has not run")
    assert not os.path.exists(os.path.join(out_dir, "teachers"))  # nothing half-written


def test_a_class_count_the_data_does_not_have_is_refused(tiny_run, tmp_path):
    import shutil

    run_dir, _ = tiny_run
    out = tmp_path / "mismatch"
    shutil.copytree(run_dir, out)
    # data.num_classes is result-neutral (a check): the stages stay current and the check itself refuses
    res = run("student", "--out", str(out), "--set", "data.num_classes=4", "--set", "student.label_sources=[projector]")
    _assert_clean_error(res, "the data has 3 classes but the config expects 4")


def test_inspect_prints_and_validates(tiny_run):
    run_dir, _ = tiny_run
    path = os.path.join(run_dir, "projector", "artifact.safetensors")
    out = run("inspect", path)
    assert out.returncode == 0 and "(valid)" in out.stdout and "hello-tiny-rn" in out.stdout
    data = json.loads(run("inspect", path, "--json").stdout)
    assert data["num_classes"] == 3 and data["bytes"] == os.path.getsize(path)


def test_distill_from_the_cli_on_a_folder(tmp_path):
    """An ImageNet-style folder with a broken JPEG: the run finishes, names the file, writes everything."""
    from PIL import Image

    from hello_fast.data.sources import procedural_images

    images, labels = procedural_images(3, 10, 40, seed=2)
    for split, keep in (("train", slice(0, 8)), ("val", slice(8, 10))):
        for c in range(3):
            d = tmp_path / "data" / split / f"shape{c}"
            d.mkdir(parents=True)
            for i, img in enumerate(images[labels == c][keep]):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.jpg", quality=95)
    broken = tmp_path / "data" / "train" / "shape1" / "3.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    args = ["distill", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
            # the default preset (digits: 10 classes) with tiny sizes; --data defines the 3 classes
            *tiny_sets(drop=("data.source", "data.procedural", "data.num_classes"))]
    out = run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3.jpg" in out.stderr  # the unreadable image is named
    assert "projector" in out.stdout and "label source" in out.stdout
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert set(results["students"]) == {"hard", "teacher", "projector"}
    assert results["data"] == str(tmp_path / "data")  # the results and the report name the data
    assert open(tmp_path / "run" / "report.md").read().splitlines()[0].startswith("# hello_fast run: data (")
    # a rerun finishes at once: everything is current, also with result-neutral options changed
    again = run(*args, "--set", "data.num_workers=8", "--set", "student.eval_batch_size=5", "--set", "checkpoint_every=0")
    assert again.returncode == 0 and again.stderr.count("skipping") >= 5, again.stderr[-2000:]
    assert "done in" not in again.stderr


def test_student_with_another_artifact(tiny_run, tmp_path, cli_here):
    """--artifact: labels from a given artifact; wrong class count or backbone weights are refused in one line."""
    import shutil

    import torch

    from hello_fast.models.clip import load_clip

    run_dir, _ = tiny_run
    out = tmp_path / "ext"
    shutil.copytree(run_dir, out)
    own = os.path.join(run_dir, "projector", "artifact.safetensors")
    ok = run("student", "--out", str(out), "--artifact", own, "--set", "student.label_sources=[projector]")
    assert ok.returncode == 0, ok.stderr[-2000:]
    # an artifact made for 4 classes, on data with 3
    other = tmp_path / "other"
    made = cli_here("distill", "--out", str(other), *tiny_sets("data.procedural_classes=4", "data.num_classes=4",
                    "student.label_sources=[hard]", drop=("data.procedural_classes", "data.num_classes")))
    assert made.returncode == 0, made.stderr[-2000:]
    bad = cli_here("student", "--out", str(out), "--artifact", str(other / "projector" / "artifact.safetensors"),
                   "--set", "student.label_sources=[projector]")
    _assert_clean_error(bad, "labels 4 classes but the data has 3")
    # the right artifact on other backbone weights
    weights = tmp_path / "other_clip.pt"
    torch.save(load_clip("hello-tiny-rn", init_seed=7).model.state_dict(), weights)
    wrong = cli_here("student", "--out", str(out), "--artifact", own, "--artifact-weights", str(weights),
                     "--set", "student.label_sources=[projector]")
    _assert_clean_error(wrong, "was trained on backbone hello-tiny-rn")
