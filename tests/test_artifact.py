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

    from hello_fast.projector.artifact import metadata_sha256, tensors_sha256

    t = load_file(src)
    with safe_open(src, "pt") as f:
        m = json.loads(f.metadata()[META_KEY])
    t = tensors(t) if tensors else t
    m = meta(m) if meta else m
    if rehash:
        m["tensors_sha256"] = tensors_sha256(t)
        m["metadata_sha256"] = metadata_sha256(m)
    save_file(t, dst, metadata={META_KEY: json.dumps(m)})


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("truncated", "not a readable label artifact"),
    ("text", "not a readable label artifact"),
    ("foreign", "not a hello_fast label artifact"),
    ("tampered", "do not match the checksum"),
    ("renamed_class", "metadata does not match its checksum"),
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
    elif case == "renamed_class":  # one class name edited, the tensors untouched: their checksum still holds
        _rewrite(artifact, bad, meta=lambda m: dict(m, class_names=["qattern 1"] + m["class_names"][1:]), rehash=False)
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
    Pipeline(tiny_config(), str(out), device="cpu").run_stage("projector")
    with open(os.path.join(run, "projector", "artifact.safetensors"), "rb") as a, open(out / "projector" / "artifact.safetensors", "rb") as b:
        assert a.read() == b.read()


# -- compact artifacts: fp16 and int8 (per-output-channel scales) -------------------------------------


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (1, 5), (1000, 128), (7, 1, 1, 1)])
def test_int8_rows_round_trip_within_half_a_step(shape, rng):
    from hello_fast.projector.artifact import dequantize_rows, quantize_rows

    t = torch.randn(shape, generator=rng) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=rng) * 3
    t[0] = 0  # an untrained (zero) row stays exactly zero
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    back = dequantize_rows(q, scale)
    step = scale.view(-1, *([1] * (len(shape) - 1)))
    assert torch.all((back - t).abs() <= step / 2 + 1e-7)
    assert torch.equal(back[0], torch.zeros_like(back[0]))


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A tiny projector with rank-8 LoRA set to seeded random values (as after training), written in each dtype."""
    from hello_fast.projector.artifact import artifact_metadata, save_artifact
    from hello_fast.projector.model import build_projector

    seed = int(torch.seed() % 2**31)
    g = torch.Generator().manual_seed(seed)
    backbone = load_clip("hello-tiny-rn")
    names = ["zero", "one", "two", "three", "four"]
    projector = build_projector(backbone, names, ["a photo of a {}."], conv_rank=8, head_rank=4)
    with torch.no_grad():
        for _, m in projector.lora_modules():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("dtypes")
    paths = {}
    for dtype in ("fp32", "fp16", "int8"):
        meta = artifact_metadata(projector, backbone, names, ["a photo of a {}."], conv_rank=8, head_rank=4,
                                 linear_rank=0, alpha=None, dtype=dtype)
        paths[dtype] = str(folder / f"{dtype}.safetensors")
        save_artifact(paths[dtype], projector.lora_state_dict(), meta)
    x = (torch.rand(16, 3, 32, 32, generator=g) - projector.mean) / projector.std
    return backbone, projector, paths, x, seed


# max |logit difference| / max |logit| of the fp32 projector: fp16 rounds each weight to 2^-11 relative,
# int8 to half a step of max|row| / 127; measured 1.9e-4 and 5.1e-3 (seed 1), bounds with ~5x margin
_TOLERANCE = {"fp32": 0.0, "fp16": 1e-3, "int8": 2.5e-2}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_compact_artifacts_give_the_fp32_labels(trained_like, dtype):
    backbone, projector, paths, x, seed = trained_like
    with torch.no_grad():
        ref = projector(x)
        loaded, meta = load_projector(paths[dtype], backbone=backbone)
        got = loaded(x)
    assert meta["dtype"] == dtype
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err <= _TOLERANCE[dtype], f"seed {seed}: relative logit error {err:.2e}"
    assert float((got.softmax(1) - ref.softmax(1)).abs().max()) <= 10 * _TOLERANCE[dtype] + 1e-7, f"seed {seed}"
    stored, _ = read_artifact(paths[dtype], decode=False)
    kinds = {t.dtype for k, t in stored.items() if not k.endswith(".scale")}
    assert kinds == {{"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[dtype]}


def test_compact_artifacts_are_smaller(trained_like):
    _, _, paths, _, _ = trained_like
    sizes = {d: os.path.getsize(p) for d, p in paths.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    assert describe(paths["int8"])["dtype"] == "int8"
    assert describe(paths["int8"])["parameters"] == describe(paths["fp32"])["parameters"]  # scales are not LoRA parameters


def test_inspect_prints_the_dtype(trained_like, capsys):
    from hello_fast.cli import main

    _, _, paths, _, _ = trained_like
    assert main(["inspect", paths["fp16"]]) == 0
    assert "stored as fp16" in capsys.readouterr().out


def test_convert_artifact_and_int8_tampering(trained_like, tmp_path):
    from hello_fast.projector.artifact import convert_artifact

    backbone, projector, paths, x, _ = trained_like
    dst = str(tmp_path / "converted.safetensors")
    convert_artifact(paths["fp32"], dst, "int8")
    with open(dst, "rb") as a, open(paths["int8"], "rb") as b:
        assert a.read() == b.read()  # converting is writing in that dtype
    bad = str(tmp_path / "bad.safetensors")

    def drop_scale(t):
        del t["head.lora_b.scale"]
        return t
    _rewrite(paths["int8"], bad, tensors=drop_scale)
    with pytest.raises(HelloError, match="has no scale"):
        read_artifact(bad)
    _rewrite(paths["int8"], bad, meta=lambda m: dict(m, dtype="fp16"))
    with pytest.raises(HelloError, match="head.lora_a is torch.int8, the metadata says fp16"):
        read_artifact(bad)
    _rewrite(paths["fp16"], bad, meta=lambda m: dict(m, dtype="fp32"))
    with pytest.raises(HelloError, match="is torch.float16, the metadata says fp32"):
        read_artifact(bad)
