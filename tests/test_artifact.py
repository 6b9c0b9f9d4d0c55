"""The label artifact: round trip, reproducibility, and clear refusals of bad or mismatched files."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hello_fast.errors import HelloError
from hello_fast.models.clip import load_clip
from hello_fast.projector.artifact import FORMAT_VERSION, META_KEY, describe, load_projector, read_artifact


@pytest.fixture(scope="module")
def artifact(tiny_run):
    run, _ = tiny_run
    return os.path.join(run, "projector", "artifact.safetensors")


def test_round_trip_rebuilds_the_trained_projector(artifact, tiny_run):
    tensors, meta = read_artifact(artifact)
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["class_names"] == ["pattern 0", "pattern 1", "pattern 2"]
    assert meta["backbone"]["model"] == "hello-tiny-rn" and len(meta["backbone"]["weights_sha256"]) == 64
    assert all(k.endswith((".lora_a", ".lora_b")) for k in tensors)  # LoRA tensors only: no base weights
    projector, _ = load_projector(artifact)
    for name, t in projector.lora_state_dict().items():
        assert torch.equal(t, tensors[name])
    x = torch.randn(2, 3, 32, 32)
    again, _ = load_projector(artifact)
    assert torch.equal(projector(x), again(x))


def test_describe_reports_size_and_parameters(artifact):
    info = describe(artifact)
    assert info["bytes"] == os.path.getsize(artifact)
    assert info["num_classes"] == 3 and info["head_rank"] == 3 and info["conv_rank"] == 2
    assert info["parameters"]["head"] == 3 * 64 + 3 * 3


def _rewrite(src, dst, tensors=None, meta=None, rehash=True):
    """Copy an artifact with edited tensors/metadata; rehash=False keeps the old checksum (tampering)."""
    from safetensors import safe_open

    from hello_fast.projector.artifact import tensors_sha256

    t = load_file(src)
    with safe_open(src, "pt") as f:
        m = json.loads(f.metadata()[META_KEY])
    t = tensors(t) if tensors else t
    m = meta(m) if meta else m
    if rehash:
        m["tensors_sha256"] = tensors_sha256(t)
    save_file(t, dst, metadata={META_KEY: json.dumps(m)})


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("truncated", "not a readable label artifact"),
    ("text", "not a readable label artifact"),
    ("foreign", "not a hello_fast label artifact"),
    ("tampered", "do not match the checksum"),
    ("newer", "newer than this hello_fast reads"),
    ("no_head", "no head LoRA"),
])
def test_bad_files_are_refused(artifact, tmp_path, case, message):
    bad = str(tmp_path / "bad.safetensors")
    if case == "truncated":
        with open(artifact, "rb") as f:
            data = f.read()
        with open(bad, "wb") as f:
            f.write(data[: len(data) // 2])
    elif case == "text":
        with open(bad, "w") as f:
            f.write("this is not an artifact")
    elif case == "foreign":
        save_file({"weight": torch.zeros(3)}, bad, metadata={"format": "pt"})
    elif case == "tampered":
        def bump(t):
            t["head.lora_b"] = t["head.lora_b"] + 1
            return t
        _rewrite(artifact, bad, tensors=bump, rehash=False)
    elif case == "newer":
        _rewrite(artifact, bad, meta=lambda m: dict(m, format_version=FORMAT_VERSION + 1))
    elif case == "no_head":
        def drop(t):
            del t["head.lora_a"]
            return t
        _rewrite(artifact, bad, tensors=drop)
    with pytest.raises(HelloError, match=message):
        read_artifact(bad)


def test_other_backbone_or_class_count_is_refused(artifact):
    with pytest.raises(HelloError, match="trained on backbone hello-tiny-rn"):
        load_projector(artifact, backbone=load_clip("hello-tiny-rn", init_seed=5))
    with pytest.raises(HelloError, match="labels 3 classes but the data has 10"):
        load_projector(artifact, num_classes=10)


def test_artifact_is_byte_reproducible(tiny_run, tmp_path):
    from conftest import tiny_config

    from hello_fast.pipeline import Pipeline

    run, _ = tiny_run
    out = tmp_path / "again"
    shutil.copytree(os.path.join(run, "teachers"), out / "teachers")
    Pipeline(tiny_config(), str(out), device="cpu").projector()
    with open(os.path.join(run, "projector", "artifact.safetensors"), "rb") as a, open(out / "projector" / "artifact.safetensors", "rb") as b:
        assert a.read() == b.read()
