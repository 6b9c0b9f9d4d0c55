"""CLIP backbones through open_clip, offline, in every form the weights come in, with the activation they were trained with.

Weights come from: a seeded random init (`pretrained: null`); an open_clip tag (`openai`, ...) read
from the local caches (the Hugging Face hub cache open_clip downloads into, or OpenAI's own
TorchScript archive in `~/.cache/clip`, checked against the sha256 in OpenAI's URL); or a file or
folder: OpenAI's TorchScript archive (`RN50.pt`, read without running its code: see
`_torchscript.py`), an open_clip / Hugging Face state dict (`.pt`, `.pth`, `.bin` through
`torch.load(weights_only=True)`, `.safetensors`), or a Hugging Face snapshot folder holding one.

OpenAI trained its CLIP models with QuickGELU (x * sigmoid(1.702 x)); open_clip's `RN50` config
builds GELU unless told otherwise, and the text tower that makes the head would then be another
function of the same weights. `activation: auto` picks what the weights were trained with: the
tag's record; QuickGELU for OpenAI's archives and state dicts (they carry OpenAI's
`input_resolution`/`context_length`/`vocab_size` entries); for other files, what every published
weight of that architecture uses, and an error when those disagree (set it explicitly then).
The backbone's identity (model, weights source, activation, a sha256 of its architecture config
and one of its weights) goes into every label artifact, so an artifact is never applied to
another function than the one it was trained on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from importlib import resources

import torch

from hello_fast._io import check_state_dict, file_sha256, read_state_dict
from hello_fast._progress import log
from hello_fast.config import looks_like_file
from hello_fast.errors import HelloError
from hello_fast.models._torchscript import (
    is_torchscript_archive,
    read_torchscript_state_dict,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")
# entries OpenAI's state dicts carry beside the weights (open_clip drops them too)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# open_clip's preferred checkpoint names inside a Hugging Face snapshot folder, safest first
_FOLDER_CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                       "open_clip_pytorch_model.bin", "pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth")

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
    activation: str = "gelu"  # quick_gelu | gelu: the towers' GELU flavour
    arch_sha256: str = ""  # sha256 of the open_clip architecture config the model was built from

    has_text_tower = True  # the zero-shot head comes from the text tower (projector.head_init text)

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    def describe(self) -> str:
        return f"{self.name} ({self.pretrained or 'random init'}, {self.activation}, sha256 {self.weights_sha256[:12]}…)"

    @property
    def identity(self) -> dict:
        ident = {"model": self.name, "pretrained": self.pretrained, "weights_sha256": self.weights_sha256,
                 "activation": self.activation, "arch_sha256": self.arch_sha256}
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
    from open_clip.zero_shot_metadata import (
        OPENAI_IMAGENET_TEMPLATES,
        SIMPLE_IMAGENET_TEMPLATES,
    )

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


def _model_config(name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise HelloError(f"unknown CLIP model {name!r}; open_clip knows e.g. RN50, ViT-B-32 (and hello-tiny-rn)")
    return cfg


def architecture_sha256(name: str, activation: str) -> str:
    """sha256 of the open_clip config `name` builds with `activation`: what the weights' sha256 cannot see."""
    cfg = dict(_model_config(name), quick_gelu=activation == "quick_gelu")
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _check_activation(activation: str) -> None:
    if activation not in ("auto",) + ACTIVATIONS:
        raise HelloError(f"clip.activation must be one of auto, quick_gelu, gelu; got {activation!r}")


def _config_activation(name: str) -> str:
    return "quick_gelu" if _model_config(name).get("quick_gelu") else "gelu"


def _published_activations(name: str) -> set[str]:
    """The activations open_clip records for the published weights of architecture `name`."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    base = _config_activation(name)
    return {"quick_gelu" if get_pretrained_cfg(name, t).get("quick_gelu") else base for t in list_pretrained_tags_by_model(name)}


def _is_path(pretrained: str) -> bool:
    return os.path.exists(pretrained) or looks_like_file(pretrained)


def expected_activation(name: str, pretrained: str | None, activation: str = "auto") -> str:
    """The activation load_clip would choose, decided without reading weights (file contents aside: then a best guess)."""
    _check_activation(activation)
    _register_configs()
    if activation != "auto":
        return activation
    if pretrained in (None, "", "none", "random"):
        return _config_activation(name)
    if not _is_path(pretrained):
        from open_clip.pretrained import get_pretrained_cfg

        cfg = get_pretrained_cfg(name, pretrained) or {}
        return "quick_gelu" if cfg.get("quick_gelu") else _config_activation(name)
    published = _published_activations(name)
    return published.pop() if len(published) == 1 else "quick_gelu"


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
    """open_clip logs a warning on the root logger for every random init and warns on activation overrides; here both are intended."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            yield
    finally:
        root.setLevel(level)


def _build(name: str, activation: str, seed: int = 0) -> torch.nn.Module:
    """open_clip's architecture `name` with the given activation, randomly initialised from `seed`."""
    import open_clip

    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(seed)
        return open_clip.create_model(name, pretrained=None, quick_gelu=activation == "quick_gelu")


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, name: str) -> None:
    """Load a full CLIP state dict strictly (OpenAI's extra entries dropped, open_clip's layout conversions applied)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state = {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    check_state_dict(model.state_dict(), state, path, name)
    model.load_state_dict(state, strict=True)  # copies (and casts OpenAI's fp16 weights) into the fp32 model


def _file_activation(name: str, path: str, openai: bool, activation: str) -> str:
    if activation != "auto":
        if openai and activation != "quick_gelu":
            log(f"clip: note: {os.path.basename(path)} holds OpenAI's weights, which were trained with QuickGELU; "
                f"building {activation} as clip.activation says")
        return activation
    if openai:
        return "quick_gelu"
    published = _published_activations(name)
    if len(published) > 1:
        raise HelloError(f"cannot tell which activation {path} was trained with: {name}'s published weights use both "
                         f"QuickGELU (OpenAI's) and GELU; set clip.activation to quick_gelu or gelu")
    return published.pop() if published else _config_activation(name)


def _checkpoint_in_folder(folder: str) -> str:
    for fname in _FOLDER_CHECKPOINTS:
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            return path
    raise HelloError(f"CLIP weights folder {folder} holds none of {', '.join(_FOLDER_CHECKPOINTS)}")


def _load_file(name: str, path: str, activation: str) -> tuple[torch.nn.Module, str]:
    """(model, activation) from a TorchScript archive, a state-dict file, or a folder holding one."""
    if os.path.isdir(path):
        path = _checkpoint_in_folder(path)
    if not os.path.isfile(path):
        raise HelloError(f"CLIP checkpoint {path} does not exist")
    if is_torchscript_archive(path):
        state, openai = read_torchscript_state_dict(path), True  # only OpenAI publishes CLIP as TorchScript
    else:
        state, _ = read_state_dict(path, "CLIP checkpoint")
        openai = any(k in state for k in _OPENAI_EXTRA_KEYS)
    act = _file_activation(name, path, openai, activation)
    model = _build(name, act)
    _load_weights(model, state, path, name)
    return model, act


def _openai_archive_in_cache(tag_cfg: dict) -> str | None:
    """OpenAI's TorchScript archive of a tag where open_clip (and OpenAI's `clip` package) download it, if intact."""
    url = tag_cfg.get("url", "")
    if "openaipublic" not in url:
        return None
    path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    if not os.path.isfile(path):
        return None
    expected = url.split("/")[-2]  # OpenAI's URLs carry the file's sha256
    if not file_sha256(path).startswith(expected):  # hashed once per process (244 MB for RN50)
        log(f"clip: {path} is not OpenAI's file (sha256 differs from the one in its URL); not used")
        return None
    return path


def _load_tag(name: str, tag: str, activation: str) -> tuple[torch.nn.Module, str]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = list_pretrained_tags_by_model(name)
        raise HelloError(f"{tag!r} is neither a pretrained tag of {name} ({', '.join(tags) or 'none'}) nor a file")
    trained = expected_activation(name, tag)  # what the tag's weights were trained with
    act = expected_activation(name, tag, activation)
    if act != trained:
        log(f"clip: note: {name}/{tag} was trained with {trained}; building {act} as clip.activation says")
    archive = _openai_archive_in_cache(tag_cfg)
    if archive is not None:
        model = _build(name, act)
        _load_weights(model, read_torchscript_state_dict(archive), archive, name)
        return model, act
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(name, pretrained=tag, quick_gelu=act == "quick_gelu")
    except Exception as e:
        raise HelloError(
            f"could not load CLIP weights {name}/{tag} ({str(e).splitlines()[0][:200]}). Without network access the "
            f"weights must be in the local cache (Hugging Face hub cache, or OpenAI's archive in ~/.cache/clip) or given "
            f"as a file: set clip.pretrained to the checkpoint path"
        ) from None
    return model, act


def load_clip(name: str, pretrained: str | None = None, init_seed: int = 0, device="cpu", calibrate: bool = True,
              activation: str = "auto") -> ClipBackbone:
    """Build an open_clip model by name with weights from a tag, a file or folder, or a seeded random init.

    Works offline (see the module docstring for the forms and the activation rule). `calibrate=False`
    skips the random init's BatchNorm calibration (for shape-only uses).
    """
    import open_clip

    _register_configs()
    _check_activation(activation)
    if name not in open_clip.list_models():
        raise HelloError(f"unknown CLIP model {name!r}; open_clip knows e.g. RN50, ViT-B-32 (and hello-tiny-rn)")
    if pretrained in (None, "", "none", "random"):
        act = expected_activation(name, None, activation)
        model = _build(name, act, init_seed)
        if calibrate:
            _calibrate_random_tower(model.visual, init_seed)
        source = None
    elif _is_path(pretrained):
        model, act = _load_file(name, pretrained, activation)
        source = os.path.basename(os.path.normpath(pretrained))
    else:
        model, act = _load_tag(name, pretrained, activation)
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
        init_seed=init_seed if source is None else None, activation=act, arch_sha256=architecture_sha256(name, act),
    )
