"""Real CLIP files, offline: every published form of RN50's weights loads with the activation it was trained with.

The forms are built here from a randomly initialised RN50 (no pretrained weights can be downloaded):
OpenAI's TorchScript archive (fp16 weights, OpenAI's key layout and extra entries, as `RN50.pt`),
OpenAI's state dict, open_clip / Hugging Face state dicts (.bin, .safetensors, a snapshot folder),
and the `openai` tag read from the Hugging Face hub cache and from OpenAI's archive in ~/.cache/clip.
"""
import copy
import hashlib
import os
import pickle
import zipfile

import pytest
import torch
from open_clip.model import convert_weights_to_lp
from open_clip.transformer import QuickGELU
from safetensors import safe_open
from safetensors.torch import save_file

from hello_fast.errors import HelloError
from hello_fast.models import clip as clip_mod
from hello_fast.models._torchscript import read_torchscript_state_dict
from hello_fast.models.clip import load_clip
from hello_fast.projector.artifact import (
    artifact_metadata,
    load_projector,
    read_artifact,
    save_artifact,
)
from hello_fast.projector.head import text_head_weight
from hello_fast.projector.model import build_projector

_OPENAI_EXTRAS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


class _OpenAIStyle(torch.nn.Module):
    """CLIP's modules, parameters and persistent buffers under OpenAI's names, plus OpenAI's extra entries.

    Traced with a trivial forward: tracing keeps every submodule and parameter, and the archive is
    what torch.jit.save writes for any module (OpenAI's RN50.pt was traced the same way).
    """

    def __init__(self, clip):
        super().__init__()
        persistent = set(clip.state_dict())
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in clip.named_buffers(recurse=False):
            if name in persistent:
                self.register_buffer(name, b)
        for name, v in _OPENAI_EXTRAS.items():
            self.register_buffer(name, torch.tensor(v))

    def forward(self, x):
        return x * self.logit_scale.exp()


@pytest.fixture(scope="module")
def rn50():
    """(fp32 model with random weights, OpenAI's fp16 version of its state dict)."""
    model = clip_mod._build("RN50", "quick_gelu", seed=0)  # random weights: the forms, not the values, are under test
    half = copy.deepcopy(model)
    convert_weights_to_lp(half, torch.float16)  # OpenAI publishes conv/linear/attention weights in fp16
    return model, half


def _openai_archive(half_model, path):
    traced = torch.jit.trace(_OpenAIStyle(half_model), torch.ones(2))
    traced.save(str(path))
    return path


def _expected(half_model):
    return {k: v.float() for k, v in half_model.state_dict().items()}


def _is_quick_gelu(model) -> bool:
    return isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def _same_weights(model, expected) -> bool:
    got = model.state_dict()
    return set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_torchscript_archive_loads_safely_with_quick_gelu(rn50, tmp_path):
    _, half = rn50
    path = _openai_archive(half, tmp_path / "RN50.pt")
    reference = torch.jit.load(str(path), map_location="cpu").state_dict()  # trusted here: we wrote it
    state = read_torchscript_state_dict(str(path))
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    assert state["visual.conv1.weight"].dtype == torch.float16 and "input_resolution" in state
    backbone = load_clip("RN50", str(path))
    assert backbone.activation == "quick_gelu" and _is_quick_gelu(backbone.model)
    assert backbone.pretrained == "RN50.pt"
    assert _same_weights(backbone.model, _expected(half))
    assert backbone.weights_sha256 == clip_mod.weights_fingerprint(backbone.model)


def test_torchscript_reader_runs_nothing_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Payload(), protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(HelloError, match="not part of a plain weights pickle"):
        load_clip("RN50", str(path))
    assert not marker.exists()


@pytest.mark.parametrize("form", ["openai_state_dict", "open_clip_bin", "safetensors", "hf_snapshot_folder"])
def test_state_dict_files_load_with_the_right_activation(rn50, tmp_path, form):
    model, half = rn50
    if form == "openai_state_dict":  # OpenAI's own state dict: fp16 with its extra entries
        expected = _expected(half)
        path = tmp_path / "RN50_state.pt"
        torch.save({**half.state_dict(), **{k: torch.tensor(v) for k, v in _OPENAI_EXTRAS.items()}}, path)
    elif form == "open_clip_bin":  # an open_clip training checkpoint: wrapped, DDP-prefixed
        expected = model.state_dict()
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    else:
        expected = _expected(half)
        folder = tmp_path / "snapshot"
        folder.mkdir()
        path = folder / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in half.state_dict().items()}, str(path))
        if form == "hf_snapshot_folder":
            path = folder
    backbone = load_clip("RN50", str(path))
    # every published RN50 weight (OpenAI's, yfcc15m, cc12m) was trained with QuickGELU
    assert backbone.activation == "quick_gelu" and _is_quick_gelu(backbone.model)
    assert _same_weights(backbone.model, {k: v.float() for k, v in expected.items()})


def test_explicit_activation_wins_and_changes_the_head(rn50, tmp_path):
    _, half = rn50
    path = tmp_path / "rn50.safetensors"
    save_file({k: v.contiguous() for k, v in half.state_dict().items()}, str(path))
    quick = load_clip("RN50", str(path))
    gelu = load_clip("RN50", str(path), activation="gelu")
    assert gelu.activation == "gelu" and not _is_quick_gelu(gelu.model)
    assert gelu.weights_sha256 == quick.weights_sha256 and gelu.arch_sha256 != quick.arch_sha256
    names = ["goldfish", "tabby cat", "fire engine"]
    a = text_head_weight(quick, names, ["a photo of a {}."])
    b = text_head_weight(gelu, names, ["a photo of a {}."])
    assert (a - b).abs().max() > 1e-3  # the same weights, another zero-shot head


def test_unknown_activation_of_a_plain_file_is_an_error(tmp_path):
    # ViT-B-32's published weights use both activations: a plain file does not say which
    path = tmp_path / "vit.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(path))
    with pytest.raises(HelloError, match="cannot tell which activation .* set clip.activation"):
        load_clip("ViT-B-32", str(path))


def test_wrong_architecture_is_named(rn50, tmp_path):
    model, _ = rn50
    path = tmp_path / "rn50.safetensors"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.layer4")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(HelloError, match="does not hold RN50 weights: .* missing"):
        load_clip("RN50", str(path))


def _fake_hub_cache(root, half):
    snap = root / "models--timm--resnet50_clip.openai" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in half.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    (root / "models--timm--resnet50_clip.openai" / "refs").mkdir()
    (root / "models--timm--resnet50_clip.openai" / "refs" / "main").write_text("0" * 40)


def test_openai_tag_from_the_hub_cache(rn50, tmp_path, monkeypatch):
    import huggingface_hub.constants

    _, half = rn50
    _fake_hub_cache(tmp_path / "hub", half)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no OpenAI archive in ~/.cache/clip
    backbone = load_clip("RN50", "openai")
    assert backbone.pretrained == "openai" and backbone.activation == "quick_gelu" and _is_quick_gelu(backbone.model)
    assert _same_weights(backbone.model, _expected(half))


def test_openai_tag_from_openais_archive_in_the_clip_cache(rn50, tmp_path, monkeypatch):
    from open_clip.pretrained import get_pretrained_cfg

    _, half = rn50
    cache = tmp_path / "home" / ".cache" / "clip"
    cache.mkdir(parents=True)
    archive = _openai_archive(half, cache / "RN50.pt")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = get_pretrained_cfg("RN50", "openai")
    # OpenAI's URL names the file's sha256: point it at this archive's
    monkeypatch.setitem(cfg, "url", f"https://openaipublic.azureedge.net/clip/models/{digest}/RN50.pt")
    backbone = load_clip("RN50", "openai")
    assert backbone.pretrained == "openai" and backbone.activation == "quick_gelu"
    assert _same_weights(backbone.model, _expected(half))
    # an archive that is not OpenAI's file (sha256 differs from the URL's) is not used; offline, nothing else is there
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setitem(cfg, "url", f"https://openaipublic.azureedge.net/clip/models/{'f' * 64}/RN50.pt")
    with pytest.raises(HelloError, match="local cache"):
        load_clip("RN50", "openai")


def _tiny_artifact(path, activation):
    backbone = load_clip("hello-tiny-rn", None, init_seed=0, activation=activation)
    names = ["zero", "one", "two"]
    projector = build_projector(backbone, names, ["a photo of a {}."], conv_rank=2, head_rank=3)
    meta = artifact_metadata(projector, backbone, names, ["a photo of a {}."], conv_rank=2, head_rank=3, linear_rank=0, alpha=None)
    save_artifact(str(path), projector.lora_state_dict(), meta)
    return backbone


def test_artifact_identity_covers_the_activation(tmp_path):
    path = tmp_path / "quick.safetensors"
    trained_on = _tiny_artifact(path, "quick_gelu")
    ident = read_artifact(str(path))[1]["backbone"]
    assert ident["activation"] == "quick_gelu" and ident["arch_sha256"] == trained_on.arch_sha256
    gelu = load_clip("hello-tiny-rn", None, init_seed=0, activation="gelu")
    assert gelu.weights_sha256 == trained_on.weights_sha256  # the weights alone cannot tell them apart
    with pytest.raises(HelloError, match="running quick_gelu but the backbone given runs gelu"):
        load_projector(str(path), backbone=gelu)
    projector, _ = load_projector(str(path))  # rebuilt from the record: QuickGELU again
    assert torch.equal(projector.head.base_weight, build_projector(trained_on, ["zero", "one", "two"], ["a photo of a {}."],
                                                                   conv_rank=2, head_rank=3).head.base_weight)


def test_format_1_artifacts_still_load(tmp_path):
    """Format 1 recorded no activation: a random init ran the config's own (GELU here)."""
    import json

    from safetensors.torch import load_file

    from hello_fast.projector.artifact import META_KEY, tensors_sha256

    path = tmp_path / "v2.safetensors"
    _tiny_artifact(path, "gelu")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as g:
        meta = json.loads(g.metadata()[META_KEY])
    meta["format_version"] = 1
    for key in ("activation", "arch_sha256"):
        del meta["backbone"][key]
    del meta["dtype"]
    meta["tensors_sha256"] = tensors_sha256(tensors)
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={META_KEY: json.dumps(meta)})
    projector, meta = load_projector(str(old))
    assert meta["dtype"] == "fp32"
    with pytest.raises(HelloError, match="running gelu"):
        load_projector(str(old), backbone=load_clip("hello-tiny-rn", None, init_seed=0, activation="quick_gelu"))


def test_expected_activation_matches_what_loading_builds():
    """storage computes artifact sizes without weights: its activation guess must be load_clip's choice."""
    from hello_fast.models.clip import expected_activation

    assert expected_activation("RN50", None) == load_clip("RN50", None, calibrate=False).activation == "gelu"
    assert expected_activation("RN50", "openai") == "quick_gelu"  # the tag's record
    assert expected_activation("RN50", "/models/RN50.pt") == "quick_gelu"  # every published RN50 weight
    assert expected_activation("ViT-B-32", "laion2b_s34b_b79k") == "gelu"
    assert expected_activation("hello-tiny-rn", None, "quick_gelu") == "quick_gelu"
    with pytest.raises(HelloError, match="clip.activation must be one of"):
        expected_activation("RN50", None, "relu")
