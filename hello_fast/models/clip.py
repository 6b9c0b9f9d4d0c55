"""CLIP backbones through open_clip, offline: pretrained tags from the local cache, checkpoint files, or a seeded random init.

The backbone's identity (model name, weights source, sha256 of its weights) goes into every
label artifact, so an artifact is never applied on top of other weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import resources

import torch

from hello_fast.errors import HelloError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP's own prompts for digits (its MNIST prompt) and scenes (its SUN397 prompts)
_TEMPLATES = {
    "digits": ['a photo of the number: "{}".'],
    "places": ["a photo of a {}.", "a photo of the {}."],
}

_configs_registered = False


@dataclass
class ClipBackbone:
    """A loaded CLIP model and what identifies it."""

    model: torch.nn.Module
    name: str
    pretrained: str | None  # the tag or file name it was loaded from; None for a seeded random init
    weights_sha256: str
    mean: tuple
    std: tuple
    image_size: int
    logit_scale: float
    init_seed: int | None = None  # the seed of a random init (pretrained None)

    @property
    def identity(self) -> dict:
        ident = {"model": self.name, "pretrained": self.pretrained, "weights_sha256": self.weights_sha256}
        if self.pretrained is None:
            ident["init_seed"] = self.init_seed
        return ident

    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.name)


def _register_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(str(resources.files("hello_fast").joinpath("models", "configs")))
        _configs_registered = True


def template_strings(spec) -> list[str]:
    """Prompt templates as "{}" format strings: a named set (imagenet, simple, digits, places) or a list."""
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(t, str) and "{}" in t for t in spec):
            raise HelloError('clip.templates: a list of templates must hold strings with a "{}" for the class name')
        return list(spec)
    if spec in _TEMPLATES:
        return list(_TEMPLATES[spec])
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    named = {"imagenet": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if spec not in named:
        raise HelloError(f"clip.templates: unknown template set {spec!r}; use imagenet, simple, digits, places or a list")
    return [t("{}") for t in named[spec]]  # open_clip's templates are lambdas: recover the format strings


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def _calibrate_random_tower(visual: torch.nn.Module, seed: int, batches: int = 2, batch_size: int = 8) -> None:
    """Make a randomly initialised tower's features carry signal, without any data.

    open_clip's init zeroes every residual branch (bn3.weight = 0) and leaves BatchNorm at unit
    running statistics, so in eval mode the signal shrinks ~3x per stage and every image maps to
    nearly the same feature (cosine ~0.99999): nothing for LoRA to adapt. Here BatchNorm layers
    get unit scale, zero shift and running statistics measured on 16 seeded smooth-noise images
    (per-channel statistics over every pixel: plenty; RN50 at 224 px takes ~2 s on a CPU).
    Deterministic in `seed`, so the backbone stays "random init, seed N" (and its sha256 says so).
    """
    bns = [m for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return  # LayerNorm towers (ViT) keep their scale without help
    for m in bns:
        torch.nn.init.ones_(m.weight)
        torch.nn.init.zeros_(m.bias)
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    g = torch.Generator().manual_seed(seed)
    # in float64, then rounded once to float32: the statistics (and so the weights' sha256) come out the
    # same for any thread count or CPU, whose float32 reduction orders differ in the last bits
    visual.double().train()
    for _ in range(batches):
        noise = torch.randn(batch_size, 3, max(1, size // 4), max(1, size // 4), generator=g, dtype=torch.float64)
        visual(torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False))
    for m in bns:
        m.momentum = 0.1
    visual.float().eval()


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs a warning on the root logger for every random init; here that is intended."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_clip(name: str, pretrained: str | None = None, init_seed: int = 0, device="cpu", calibrate: bool = True) -> ClipBackbone:
    """Build an open_clip model by name with weights from a tag, a file, or a seeded random init.

    Works offline: a tag loads from the local cache (HF hub or open_clip's), a path loads the file.
    `calibrate=False` skips the random init's BatchNorm calibration (for shape-only uses).
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    _register_configs()
    if name not in open_clip.list_models():
        raise HelloError(f"unknown CLIP model {name!r}; open_clip knows e.g. RN50, ViT-B-32 (and hello-tiny-rn)")
    kwargs = {}
    if pretrained in (None, "", "none", "random"):
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(init_seed)
            model = open_clip.create_model(name, pretrained=None)
        if calibrate:
            _calibrate_random_tower(model.visual, init_seed)
        source = None
    elif os.path.exists(pretrained) or os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")):
        if not os.path.isfile(pretrained):
            raise HelloError(f"CLIP checkpoint {pretrained} does not exist")
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as e:
            raise HelloError(f"could not load CLIP checkpoint {pretrained} into {name}: {str(e).splitlines()[0]}") from None
        source = os.path.basename(pretrained)
    else:
        tag_cfg = get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = list_pretrained_tags_by_model(name)
            raise HelloError(f"{pretrained!r} is neither a pretrained tag of {name} ({', '.join(tags) or 'none'}) nor a file")
        if tag_cfg.get("quick_gelu") and not name.endswith("quickgelu"):
            kwargs["force_quick_gelu"] = True  # the OpenAI weights were trained with QuickGELU
        try:
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as e:
            raise HelloError(
                f"could not load CLIP weights {name}/{pretrained} ({str(e).splitlines()[0][:200]}). Without network "
                f"access the weights must be in the local cache or given as a file: set clip.pretrained to the checkpoint path"
            ) from None
        source = pretrained
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or OPENAI_STD)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ClipBackbone(
        model=model, name=name, pretrained=source, weights_sha256=weights_fingerprint(model),
        mean=mean, std=std, image_size=size, logit_scale=float(model.logit_scale.exp()),
        init_seed=init_seed if source is None else None,
    )
