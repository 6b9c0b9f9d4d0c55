"""The label artifact: the projector's LoRA tensors in safetensors, with the metadata to rebuild it.

What is stored: every LoRA A and B (fp32), and as metadata the backbone (open_clip name, weights
source, sha256 of its weights), the class names in order, the prompt templates, the ranks and
scale, CLIP's normalisation and resolution, a sha256 of the tensors, and the format version.
The head's base weight is not stored: it is CLIP's zero-shot classifier, rebuilt from the
backbone's text tower and the class names. Loading checks all of it and refuses, with a clear
message, files that are truncated, foreign, tampered with, or made for other weights or classes.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from hello_fast.errors import HelloError

FORMAT = "hello_fast.label_artifact"
FORMAT_VERSION = 1
# all metadata is one sorted JSON document under this key: safetensors keeps metadata in a hash
# map, so several keys would be written in a random order and the file would not be reproducible
META_KEY = FORMAT
_REQUIRED = ("format", "format_version", "backbone", "class_names", "templates", "conv_rank", "head_rank",
             "linear_rank", "alpha", "mean", "std", "image_size", "logit_scale", "tensors_sha256")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def artifact_metadata(projector, backbone, class_names, templates, *, conv_rank, head_rank, linear_rank, alpha, extra=None) -> dict:
    from hello_fast import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone.identity,
        "class_names": list(class_names),
        "templates": list(templates),
        "conv_rank": conv_rank,
        "head_rank": head_rank,
        "linear_rank": linear_rank,
        "alpha": alpha,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "image_size": backbone.image_size,
        "logit_scale": backbone.logit_scale,
        "created_by": f"hello_fast {__version__}",
    }
    if extra:
        meta.update(extra)
    return meta


def artifact_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """The exact bytes of the artifact file for these tensors and metadata."""
    from safetensors.torch import save

    meta = dict(meta, tensors_sha256=tensors_sha256(tensors))
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def save_artifact(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Write the artifact atomically; returns its size in bytes."""
    from hello_fast._io import atomic_path

    data = artifact_bytes(tensors, meta)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return len(data)


def read_artifact(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA tensors, metadata) of a label artifact, validated; HelloError on anything wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not os.path.isfile(path):
        raise HelloError(f"label artifact {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise HelloError(f"{path} is not a readable label artifact (not a complete safetensors file: {e})") from None
    if META_KEY not in raw_meta:
        raise HelloError(f"{path} is a safetensors file but not a hello_fast label artifact (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(raw_meta[META_KEY])
    except ValueError:
        raise HelloError(f"{path}: the artifact's metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HelloError(f"{path}: the artifact's metadata is not a {FORMAT} record")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise HelloError(f"{path}: the artifact's metadata lacks {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise HelloError(f"{path}: artifact format version {meta['format_version']} is newer than this hello_fast reads ({FORMAT_VERSION}); upgrade hello_fast")
    if tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise HelloError(f"{path}: the LoRA tensors do not match the checksum in the metadata (corrupted or edited)")
    _check_consistency(path, tensors, meta)
    return tensors, meta


def _check_consistency(path, tensors, meta) -> None:
    names = meta["class_names"]
    if not isinstance(names, list) or not names:
        raise HelloError(f"{path}: the artifact lists no class names")
    a, b = tensors.get("head.lora_a"), tensors.get("head.lora_b")
    if a is None or b is None:
        raise HelloError(f"{path}: the artifact has no head LoRA tensors")
    if b.shape[0] != len(names) or a.shape[0] != meta["head_rank"] or b.shape[1] != meta["head_rank"]:
        raise HelloError(f"{path}: head LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit {len(names)} classes at rank {meta['head_rank']}")
    for key, t in tensors.items():
        if not (key.endswith(".lora_a") or key.endswith(".lora_b")):
            raise HelloError(f"{path}: unexpected tensor {key} in a label artifact")
        if t.dtype != torch.float32:
            raise HelloError(f"{path}: tensor {key} is {t.dtype}, expected float32")


def load_projector(path: str, *, num_classes: int | None = None, backbone=None, clip_pretrained: str | None = None,
                   device="cpu"):
    """Rebuild the projector of a label artifact on its CLIP backbone.

    `backbone`: an already loaded ClipBackbone to reuse (it must be the artifact's); otherwise the
    backbone is loaded by the artifact's name and weights source, or from `clip_pretrained` (a tag
    or a local checkpoint file) when the original file is elsewhere on this machine. The weights'
    sha256 must match the artifact's; `num_classes`, when given, must match too.
    Returns (projector, metadata).
    """
    from hello_fast.models.clip import load_clip
    from hello_fast.projector.model import build_projector

    tensors, meta = read_artifact(path)
    ident = meta["backbone"]
    if num_classes is not None and num_classes != len(meta["class_names"]):
        raise HelloError(f"{path} labels {len(meta['class_names'])} classes but the data has {num_classes}")
    if backbone is None:
        source = clip_pretrained if clip_pretrained is not None else ident.get("pretrained")
        backbone = load_clip(ident["model"], source, init_seed=ident.get("init_seed") or 0, device=device)
    if backbone.name != ident["model"] or backbone.weights_sha256 != ident["weights_sha256"]:
        raise HelloError(
            f"{path} was trained on backbone {ident['model']} ({ident.get('pretrained') or 'random init'}, "
            f"sha256 {ident['weights_sha256'][:12]}…) but the backbone given is {backbone.name} "
            f"({backbone.pretrained or 'random init'}, sha256 {backbone.weights_sha256[:12]}…)"
        )
    projector = build_projector(
        backbone, meta["class_names"], meta["templates"], conv_rank=meta["conv_rank"], head_rank=meta["head_rank"],
        linear_rank=meta["linear_rank"], alpha=meta["alpha"], device=device,
    )
    try:
        projector.load_lora_state_dict(tensors)
    except ValueError as e:
        raise HelloError(f"{path}: {e}") from None
    return projector.eval(), meta


def describe(path: str) -> dict:
    """What `hello-fast inspect` prints: metadata, size and parameter counts of a validated artifact."""
    tensors, meta = read_artifact(path)
    head = sum(t.numel() for k, t in tensors.items() if k.startswith("head."))
    tower = sum(t.numel() for k, t in tensors.items() if not k.startswith("head."))
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "format_version": meta["format_version"],
        "backbone": meta["backbone"],
        "num_classes": len(meta["class_names"]),
        "class_names": meta["class_names"],
        "templates": len(meta["templates"]),
        "conv_rank": meta["conv_rank"],
        "head_rank": meta["head_rank"],
        "linear_rank": meta["linear_rank"],
        "alpha": meta["alpha"],
        "lora_layers": len(tensors) // 2,
        "parameters": {"tower": tower, "head": head, "total": tower + head},
        "image_size": meta["image_size"],
        "mean": meta["mean"],
        "std": meta["std"],
        "created_by": meta.get("created_by"),
        "valid": True,
    }
