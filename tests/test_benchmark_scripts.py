"""The benchmark scripts run and write their results files (device, versions, date) where they are told."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("script, result", [("bench_augment.py", "augment_mix_cpu"), ("bench_loss.py", "soft_label_loss_cpu")])
def test_cpu_benchmarks_write_results(tmp_path, script, result):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / f"{result}.json").read_text())
    assert {"date", "torch", "device_name", "extension"} <= set(doc["environment"])
    assert doc["rows"] and all(r.get("cpp_speedup", 0) > 0 for r in doc["rows"])


@pytest.mark.slow
def test_loader_benchmark_writes_results(tmp_path):
    """bench_loader.py --quick: a generated JPEG folder through both loaders, and both student-loop batch sources."""
    pytest.importorskip("nvidia.dali")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_loader.py"), "--quick", "--images", "40",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "loader_cpu_quick.json").read_text())
    folder, student = doc["rows"]
    assert folder["images"] == 40 and folder["torch_img_per_s"] > 0 and folder["dali_img_per_s"] > 0
    assert folder["dali_speedup"] == round(folder["dali_img_per_s"] / folder["torch_img_per_s"], 2)
    assert student["resident_fused_img_per_s"] > 0 and student["dali_img_per_s"] > 0


def test_gpu_benchmark_says_when_nothing_was_measured(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script measures")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_lora.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "nothing measured" in out.stdout
    assert not list(tmp_path.iterdir())  # no invented figures


@pytest.mark.slow
def test_student_loop_bench_quick(tmp_path):
    """`hello-fast bench student-loop --quick` runs on a CPU and writes every loop's figures."""
    out = subprocess.run([sys.executable, "-m", "hello_fast", "bench", "student-loop", "--quick", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "student_loop_cpu_quick.json").read_text())
    assert {"device", "torch", "date", "loops", "projector_forward_ms", "labeling_overhead"} <= set(doc)
    assert {"fast", "naive", "rded_teacher", "stored", "floor", "fast_teacher"} <= set(doc["loops"])
    assert all(v["img_per_s"] > 0 for v in doc["loops"].values())
    assert doc["projector_forward_ms"] > 0


@pytest.mark.slow
def test_artifact_dtype_study_writes_per_seed_students_and_label_drift(tiny_run, tmp_path):
    """study_artifact_dtype.py on a finished run: a student per (dtype, seed), the labels' drift from fp32."""
    run, _ = tiny_run
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "study_artifact_dtype.py"), "--run", run,
                          "--seeds", "0", "1", "--epochs", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "artifact_dtype_tiny.json").read_text())
    assert [(r["dtype"], r["seed"]) for r in doc["rows"]] == [(d, s) for s in (0, 1) for d in ("fp32", "fp16", "int8")]
    s = doc["summary"]
    assert s["fp32"]["max_abs_logit_diff"] == 0 and s["fp32"]["top1_best_mean_diff_vs_fp32"] == 0
    # (int8's per-channel scales and metadata can outweigh its saving over fp16 at these tiny ranks)
    assert s["int8"]["artifact_bytes"] < s["fp32"]["artifact_bytes"] and s["fp16"]["artifact_bytes"] < s["fp32"]["artifact_bytes"]
    assert 0 < s["fp16"]["max_abs_logit_diff"] < 0.05 and s["fp16"]["argmax_agree_pct"] >= 95
    assert s["int8"]["argmax_agree_pct"] >= 80


@pytest.mark.slow
def test_small_images_study_compares_variants_over_student_seeds(tiny_run, tmp_path):
    """study_small_images.py: each variant redoes selection in its own copy; a student per (source, seed)."""
    run, _ = tiny_run
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "study_small_images.py"), "--run", run, "--seeds", "0", "1",
           "--sources", "hard", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    out = subprocess.run(cmd + ["--variant", "base", "--variant", "tile1", "select.factor=1", "student.epochs=1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "small_images_tiny.json").read_text())
    assert [(r["variant"], r["seed"]) for r in doc["rows"]] == [("base", 0), ("base", 1), ("tile1", 0), ("tile1", 1)]
    assert [s["variant"] for s in doc["summary"]] == ["base", "tile1"] and all(s["seeds"] == 2 for s in doc["summary"])
    base = json.loads((tmp_path / "work" / "base" / "select" / "distilled.json").read_text())
    tile1 = json.loads((tmp_path / "work" / "tile1" / "select" / "distilled.json").read_text())
    assert (base["factor"], tile1["factor"]) == (2, 1)
    # a variant that would change the teachers is refused: the study reuses them
    bad = subprocess.run(cmd + ["--variant", "wide", "teachers.width=4"], capture_output=True, text=True)
    assert bad.returncode != 0 and "changes the teachers stage" in bad.stderr
