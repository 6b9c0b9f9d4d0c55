"""Run configuration: typed sections, the paper's presets, YAML files and KEY=VALUE overrides.

A config is a preset name (`digits`, `imagenet1k-ipc10`, ...) or a YAML file; a YAML file may
start from a preset with `base: NAME`. Unknown keys are an error that names them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from hello_fast.errors import HelloError


@dataclass
class DataConfig:
    source: str = "digits"  # digits | folder | procedural
    root: str | None = None  # folder source: ImageNet-style root with train/ and val/ class folders
    image_size: int = 32  # crop size of training passes over the original set, and the students' input
    eval_resize: int | None = None  # resize before the centre crop at evaluation (None: image_size*256/224)
    val_fraction: float = 0.2  # digits/procedural: share held out for validation (stratified)
    train_scale: list = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale of training passes
    flip: bool = True  # random horizontal flips in training passes (teachers, projector, students)
    num_workers: int = 0  # DataLoader workers (torch loader) or DALI threads (0: up to 4) for folder sources
    loader: str = "auto"  # folder passes: dali (NVIDIA DALI; GPU decode on a GPU) | torch (torchvision) | auto (dali when installed)
    on_bad_image: str = "skip"  # skip (warn, naming the file) | error
    num_classes: int | None = None  # expected class count (checked against the data; used by `storage`)
    procedural_classes: int = 4
    procedural_per_class: int = 30


@dataclass
class ClipConfig:
    model: str = "hello-tiny-rn"  # an open_clip model name (RN50, ViT-B-32, ...) or a config shipped here
    pretrained: str | None = None  # an open_clip tag (e.g. openai), a checkpoint path, or None: random init
    init_seed: int = 0  # seed of the random initialisation when pretrained is None
    templates: Any = "digits"  # a template set name (imagenet, simple, digits) or a list of "{}" strings
    class_names: list | None = None  # overrides the names taken from the data


@dataclass
class TeachersConfig:
    arch: str = "resnet18"
    width: int = 64  # base width of the small-image ResNet-18 variant (64 = the standard network)
    keep_epochs: list = field(default_factory=lambda: [1, 6, 11, 16, 21, 26, 31, 36, 41])  # the weak teachers
    epochs: int = 90  # length of the LR schedule (PyTorch's ImageNet recipe); training stops at the last kept epoch
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30  # divide the LR by 10 every lr_step epochs


@dataclass
class SelectConfig:
    method: str = "rded"  # rded | random
    ipc: int = 10  # distilled images per class
    factor: int = 2  # RDED: each image tiles factor x factor selected patches
    candidates_per_class: int = 300  # RDED: real images sampled per class
    crops_per_image: int = 5  # RDED: random-resized crops scored per image
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # RDED: RandomResizedCrop scale of the patches
    observer: str = "teacher"  # teacher (the last teacher checkpoint) | projector
    batch_size: int = 256


@dataclass
class ProjectorConfig:
    conv_rank: int = 8  # LoRA rank on every conv of the CLIP image tower (0: none)
    head_rank: int = 128  # LoRA rank on the text-embedding head
    linear_rank: int = 0  # LoRA rank on the tower's linear layers (attention pool, ViT blocks)
    alpha: float | None = None  # LoRA scale = alpha / rank; None: scale 1
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    lambda_ce: float = 1.0  # Eq. 5: MSE(projector, mean weak-teacher logits) + lambda * CE


@dataclass
class RefineConfig:
    enabled: bool = False  # Eq. 7 image update (optional stage)
    steps: int = 100
    lr: float = 0.01
    downsample: int = 2  # p_hat = upsample(downsample(p, 1/downsample))
    batch_size: int = 64


@dataclass
class StudentConfig:
    arch: str = "resnet18"
    width: int | None = None  # ResNet-18 small-image variant only: base width (None: 64)
    label_sources: list = field(default_factory=lambda: ["hard", "teacher", "projector"])  # also: stored (SRe2L-style)
    artifact: str | None = None  # a label artifact for the projector source (None: the run's projector stage)
    artifact_weights: str | None = None  # CLIP weights file for that artifact's backbone, if not at its recorded source
    epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | rded (0.5 * (1 + cos(pi * e / 2E)): falls only to half)
    loss: str = "mse"  # mse (the paper) | kl (temperature KL, the peers)
    temperature: float = 4.0  # kl only
    beta: float = 0.1  # weight of the mixed hard-label CE
    mix: str = "cutmix"  # cutmix | mixup | none
    mix_alpha: float = 1.0  # Beta(alpha, alpha) for the mix weight
    scale: list = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop scale range
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    eval_batch_size: int = 256
    loop: str = "fast"  # fast (resident set, fused ops, merged bf16 relabeler) | plain (PyTorch references, fp32)
    overlap: str = "auto"  # label the next batch on a side stream (GPU): auto measures both ways | on | off
    augment: str = "fused"  # fused (resident uint8 set + augment_mix kernel) | dali (a DALI pipeline; CutMix/Mixup after)
    capture: bool = False  # replay the relabeler's forward as a CUDA graph per batch shape (GPU)


@dataclass
class Config:
    name: str = "digits"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 1  # epochs between resume checkpoints of the training stages (0: none)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A short fingerprint of some sections (with the seed): decides whether a stage is stale."""
        d = self.to_dict()
        payload = {s: d[s] for s in sections}
        payload["seed"] = self.seed
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "Config":
        _check_choice("data.source", self.data.source, ("digits", "folder", "procedural"))
        _check_choice("data.on_bad_image", self.data.on_bad_image, ("skip", "error"))
        _check_choice("data.loader", self.data.loader, ("auto", "dali", "torch"))
        _check_choice("student.augment", self.student.augment, ("fused", "dali"))
        _check_choice("select.method", self.select.method, ("rded", "random"))
        _check_choice("select.observer", self.select.observer, ("teacher", "projector"))
        _check_choice("student.loss", self.student.loss, ("mse", "kl"))
        _check_choice("student.mix", self.student.mix, ("cutmix", "mixup", "none"))
        _check_choice("student.schedule", self.student.schedule, ("cosine", "rded"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for src in self.student.label_sources:
            _check_choice("student.label_sources", src, ("hard", "teacher", "projector", "stored"))
        _check_choice("student.loop", self.student.loop, ("fast", "plain"))
        _check_choice("student.overlap", self.student.overlap, ("auto", "on", "off"))
        if not self.student.label_sources:
            raise HelloError("config: student.label_sources is empty; give at least one of hard, teacher, projector")
        if not self.teachers.keep_epochs or min(self.teachers.keep_epochs) < 1:
            raise HelloError("config: teachers.keep_epochs must list epochs >= 1")
        positive = {
            "data.image_size": self.data.image_size, "select.ipc": self.select.ipc, "select.factor": self.select.factor,
            "select.candidates_per_class": self.select.candidates_per_class, "select.crops_per_image": self.select.crops_per_image,
            "teachers.batch_size": self.teachers.batch_size, "projector.batch_size": self.projector.batch_size,
            "projector.head_rank": self.projector.head_rank, "student.batch_size": self.student.batch_size,
            "student.epochs": self.student.epochs, "refine.downsample": self.refine.downsample,
        }
        if self.checkpoint_every < 0:
            raise HelloError(f"config: checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        for key, value in positive.items():
            if value < 1:
                raise HelloError(f"config: {key} must be >= 1, got {value}")
        rates = {"teachers.lr": self.teachers.lr, "projector.lr": self.projector.lr, "student.lr": self.student.lr,
                 "refine.lr": self.refine.lr, "student.temperature": self.student.temperature,
                 "student.mix_alpha": self.student.mix_alpha}
        for key, value in rates.items():
            if not (value > 0 and value != float("inf")):
                raise HelloError(f"config: {key} must be a positive number, got {value}")
        for key, value in {"student.beta": self.student.beta, "projector.lambda_ce": self.projector.lambda_ce,
                           "teachers.weight_decay": self.teachers.weight_decay, "student.weight_decay": self.student.weight_decay,
                           "projector.weight_decay": self.projector.weight_decay, "teachers.momentum": self.teachers.momentum}.items():
            if not 0 <= value < float("inf"):
                raise HelloError(f"config: {key} must be >= 0 and finite, got {value}")
        for key, rng in (("student.scale", self.student.scale), ("data.train_scale", self.data.train_scale),
                         ("select.crop_scale", self.select.crop_scale)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
                raise HelloError(f"config: {key} must be [low, high] with 0 < low <= high <= 1, got {rng}")
        if not 0 < self.data.val_fraction < 1:
            raise HelloError(f"config: data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        return self


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise HelloError(f"config: {key} must be one of {', '.join(choices)}; got {value!r}")


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
    if not path.is_file():
        raise HelloError(f"unknown config preset {name!r}; presets: {', '.join(preset_names())} (or give a YAML file path)")
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


def _coerce(key: str, value, annotation):
    """Check (and gently coerce) one value against its dataclass annotation."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = "None" in ann
    if value is None:
        if optional or ann == "Any":
            return None
        raise HelloError(f"config: {key} may not be empty")
    if ann == "Any":
        return value
    base = ann.replace(" | None", "").strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif base == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
    raise HelloError(f"config: {key} must be {base}, got {value!r}")


# element types of list-valued keys
_LIST_ELEMENTS = {
    "teachers.keep_epochs": (int,), "student.scale": (int, float), "data.train_scale": (int, float),
    "select.crop_scale": (int, float), "student.label_sources": (str,), "clip.class_names": (str,),
}


def _check_elements(key: str, value) -> None:
    kinds = _LIST_ELEMENTS.get(key)
    if kinds is None or value is None:
        return
    for v in value:
        if isinstance(v, bool) or not isinstance(v, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise HelloError(f"config: {key} must list {names} values, got {v!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise HelloError(f"config: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise HelloError(f"config: unknown key{'s' if len(unknown) > 1 else ''} {names} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        ftype = f.type if isinstance(f.type, str) else f.type.__name__
        section = _SECTIONS.get(ftype)
        if section is not None:
            kwargs[name] = _build(section, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, f.type)
            _check_elements(prefix + name, kwargs[name])
    return cls(**kwargs)


_SECTIONS = {
    "DataConfig": DataConfig, "ClipConfig": ClipConfig, "TeachersConfig": TeachersConfig,
    "SelectConfig": SelectConfig, "ProjectorConfig": ProjectorConfig, "RefineConfig": RefineConfig,
    "StudentConfig": StudentConfig,
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise HelloError(f"--set expects KEY=VALUE (e.g. student.epochs=5), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(spec: str = "digits", overrides: list[str] | tuple = (), **top_level) -> Config:
    """Load a preset or YAML file, apply `--set` style overrides, then top-level keyword overrides.

    `top_level` takes dotted keys with `__` (e.g. `data__root="/data"`); None values are ignored.
    """
    raw = _raw_config(spec)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(raw, path, value)
    for key, value in top_level.items():
        if value is not None:
            _set_path(raw, key.split("__"), value)
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
