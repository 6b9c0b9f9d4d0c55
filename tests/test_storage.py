"""Label storage figures: the paper's ImageNet-1K numbers, and exactness against a written artifact."""
import json
import os
import subprocess
import sys

from hello_fast.config import load_config
from hello_fast.storage import MIB, sre2l_soft_label_bytes, storage_report


def test_imagenet1k_ipc10_matches_the_paper():
    r = storage_report(load_config("imagenet1k-ipc10"))
    assert 3.0e6 <= r["artifact_bytes"] <= 3.8e6  # paper: 3.3 MB
    assert r["artifact_lora_parameters"] == 898_776
    assert abs(r["sre2l_soft_label_bytes"] / MIB - 5798.3) / 5798.3 < 0.10  # paper: 5,798.3 MB
    assert abs(r["teacher_bytes"] / MIB - 44.7) / 44.7 < 0.05  # paper (RDED): 44.7 MB
    assert r["artifact_metadata_exact"]


def test_other_presets_match_the_papers_table_1():
    for preset, sre2l_mb, teacher_mb in (("imagenet100-ipc10", 64.8, 42.8), ("places365-ipc10", 790.4, 43.4)):
        r = storage_report(load_config(preset))
        assert abs(r["sre2l_soft_label_bytes"] / MIB - sre2l_mb) / sre2l_mb < 0.02
        assert abs(r["teacher_bytes"] / MIB - teacher_mb) / teacher_mb < 0.02


def test_sre2l_formula_counts_logits_and_augmentation():
    # 2 images, 3 classes, 1 epoch, batch 1: per image 3 fp16 logits + 4 fp32 coords + flip + int64 partner,
    # per batch fp32 lambda + 4 int64 box
    assert sre2l_soft_label_bytes(2, 3, 1, 1) == 2 * (6 + 16 + 1 + 8) + 2 * (4 + 32)
    assert sre2l_soft_label_bytes(10, 5, 7, 4) == 7 * sre2l_soft_label_bytes(10, 5, 1, 4)


def test_artifact_figure_is_the_size_of_the_written_file(tiny_run):
    from conftest import tiny_config

    run, results = tiny_run
    r = storage_report(tiny_config(), 3, ["pattern 0", "pattern 1", "pattern 2"])
    assert r["artifact_bytes"] == os.path.getsize(os.path.join(run, "projector", "artifact.safetensors"))
    assert results["storage"]["artifact_bytes"] == r["artifact_bytes"]


def test_backbone_and_compact_artifact_sizes():
    from hello_fast.models.clip import load_clip

    r = storage_report(load_config("imagenet1k-ipc10"))
    model = load_clip("RN50", None, calibrate=False).model
    params, tower = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.visual.parameters())
    assert 101e6 < params < 103e6 and 38e6 < tower < 39e6  # RN50: 102 M weights, 38.3 M in the image tower
    # 2 bytes a weight (OpenAI's fp16 release) plus BatchNorm statistics: within 0.5 % of 2 x weights
    assert 2 * params <= r["backbone_bytes"] <= 2.01 * params
    assert 2 * tower <= r["backbone_image_tower_bytes"] <= 2.01 * tower
    assert r["backbone_downloaded"] and r["backbone"] == "RN50 (openai)"
    assert r["artifact_bytes"] == r["artifact_bytes_fp32"] and r["artifact_dtype"] == "fp32"
    lora = r["artifact_lora_parameters"]
    assert abs((r["artifact_bytes_fp32"] - r["artifact_bytes_fp16"]) - 2 * lora) < 2_000  # 2 bytes less a weight
    assert lora < r["artifact_bytes_int8"] < 0.3 * r["artifact_bytes_fp32"]  # 1 byte a weight + one fp32 scale a row
    assert storage_report(load_config("imagenet1k-ipc10", ["projector.artifact_dtype=int8"]))["artifact_bytes"] == r["artifact_bytes_int8"]


def test_compact_artifact_figures_are_the_sizes_of_converted_files(tiny_run, tmp_path):
    from conftest import tiny_config

    from hello_fast.projector.artifact import convert_artifact

    run, _ = tiny_run
    r = storage_report(tiny_config(), 3, ["pattern 0", "pattern 1", "pattern 2"])
    for dtype in ("fp16", "int8"):
        assert convert_artifact(os.path.join(run, "projector", "artifact.safetensors"), str(tmp_path / f"{dtype}.st"), dtype) \
            == r[f"artifact_bytes_{dtype}"]


def test_storage_cli_json(cli_here):
    out = subprocess.run([sys.executable, "-m", "hello_fast", "storage", "--config", "imagenet1k-ipc10", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert {"artifact_bytes", "artifact_bytes_fp16", "artifact_bytes_int8", "backbone_bytes", "sre2l_soft_label_bytes",
            "teacher_bytes"} <= set(data)
    table = cli_here("storage", "--config", "imagenet1k-ipc10")  # in this process: no second start-up
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert "HeLlO label artifact" in text and "smaller than the stored labels" in text
    assert "CLIP backbone, RN50 (openai)" in text and "downloaded once" in text


def test_storage_benchmark_writes_its_results(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_storage.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    doc = json.loads((tmp_path / "storage.json").read_text())
    assert {"date", "torch", "device_name"} <= set(doc["environment"])
    in1k = next(r for r in doc["rows"] if r["preset"] == "imagenet1k-ipc10")
    assert in1k["sre2l_over_artifact"] > 1000
    assert (tmp_path / "storage.csv").read_text().startswith("preset,")
