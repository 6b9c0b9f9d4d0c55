"""The label artifact: the projector's LoRA tensors in safetensors, with the metadata to rebuild it.

What is stored: every LoRA A and B, in fp32, fp16, or int8 with one fp32 scale per output channel
(row) of each matrix (`<layer>.lora_a.scale`: symmetric, scale = max|row| / 127); and as metadata
the backbone (CLIP: open_clip name, weights source, activation; a classifier: `kind: classifier`,
its name and weights source; both: a sha256 of the architecture and one of the weights), the class
names in order, the prompt templates, how the head started (`head_init`), the ranks and scale, the
tower's normalisation and resolution, the tensors' dtype, a sha256 of the stored tensors, the
format version, and (format 3) a sha256 of the metadata itself, so a flipped class name is refused too. The head's base weight is stored only when it came from the training data
(head_init prototypes: `head.weight` and the feature centre `head.center`): CLIP's zero-shot head is rebuilt from the text tower and the
class names, a random head from its seed. Loading checks all of it and refuses, with a clear
message, files that are truncated, foreign, tampered with, or made for another backbone
(weights, architecture or activation) or other classes; fp16 and int8 tensors come back as fp32.
Formats 1 (fp32 only, no activation record) and 2 (CLIP only) are still read.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from hello_fast import __version__
from hello_fast._io import atomic_path
from hello_fast.errors import HelloError
from hello_fast.models.classifier import load_classifier
from hello_fast.models.clip import expected_activation, load_clip
from hello_fast.projector.head import HEAD_INITS, random_head_weight
from hello_fast.projector.model import build_projector

FORMAT = "hello_fast.label_artifact"
FORMAT_VERSION = 3  # 3: classifier backbones, head_init and a stored prototype head
HEAD_WEIGHT = "head.weight"  # the head's base weight (C, d), stored for head_init prototypes only
HEAD_CENTER = "head.center"  # the feature centre (d,) subtracted before normalising, with it
PROTOTYPE_TENSORS = (HEAD_WEIGHT, HEAD_CENTER)
DTYPES = ("fp32", "fp16", "int8")
_INT8_MAX = 127
# all metadata is one sorted JSON document under this key: safetensors keeps metadata in a hash
# map, so several keys would be written in a random order and the file would not be reproducible
META_KEY = FORMAT
_REQUIRED = ("format", "format_version", "backbone", "class_names", "templates", "conv_rank", "head_rank",
             "linear_rank", "alpha", "mean", "std", "image_size", "logit_scale", "tensors_sha256")


def metadata_sha256(meta: dict) -> str:
    """sha256 of the metadata document without its own checksum (sorted JSON, as stored)."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def artifact_metadata(projector, backbone, class_names, templates, *, conv_rank, head_rank, linear_rank, alpha,
                      dtype: str = "fp32", head_init: str = "text", head_seed: int | None = None, extra=None) -> dict:
    if dtype not in DTYPES:
        raise HelloError(f"artifact dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
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
        "image_size": projector.image_size,
        "logit_scale": backbone.logit_scale,
        "dtype": dtype,
        "head_init": head_init,
        "created_by": f"hello_fast {__version__}",
    }
    if head_init == "random":
        meta["head_seed"] = head_seed
    if extra:
        meta.update(extra)
    return meta


def artifact_tensors(projector, head_init: str) -> dict[str, torch.Tensor]:
    """What the artifact stores of a projector: its LoRA tensors, and the head's base weight when it came from data."""
    tensors = projector.lora_state_dict()
    if head_init == "prototypes":
        tensors[HEAD_WEIGHT] = projector.head.base_weight.detach().float().cpu().contiguous()
        tensors[HEAD_CENTER] = projector.feature_center.detach().float().cpu().contiguous()
    return tensors


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row (output channel): t ~ q * scale[:, None, ...]."""
    rows = t.detach().float().reshape(t.shape[0], -1)
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))  # an all-zero row (untrained B) stays zero
    q = torch.round(rows / scale[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q.reshape(t.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1) * scale.float()[:, None]).reshape(q.shape)


def encode_tensors(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """fp32 LoRA tensors as the artifact stores them in `dtype` (int8 adds a `<name>.scale` per tensor)."""
    if dtype not in DTYPES:
        raise HelloError(f"artifact dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    out = {}
    for name, t in tensors.items():
        t = t.detach().float().cpu().contiguous()
        if dtype == "fp32":
            out[name] = t
        elif dtype == "fp16":
            half = t.half()
            if not torch.isfinite(half).all():
                raise HelloError(f"LoRA tensor {name} overflows fp16 (max |x| {t.abs().max().item():.3g}); keep the artifact in fp32")
            out[name] = half
        else:
            out[name], out[f"{name}.scale"] = quantize_rows(t)
    return out


def artifact_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """The exact bytes of the artifact file for these fp32 LoRA tensors and metadata (stored in meta's dtype)."""
    from safetensors.torch import save

    stored = encode_tensors(tensors, meta.get("dtype", "fp32"))
    meta = dict(meta, tensors_sha256=tensors_sha256(stored))
    meta["metadata_sha256"] = metadata_sha256(meta)
    return save({k: v.contiguous() for k, v in stored.items()}, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def save_artifact(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Write the artifact atomically; returns its size in bytes."""
    data = artifact_bytes(tensors, meta)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return len(data)


def read_artifact(path: str, decode: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA tensors, metadata) of a label artifact, validated; HelloError on anything wrong.

    The tensors come back as fp32 (fp16 widened, int8 multiplied by its scales); `decode=False`
    gives them as stored.
    """
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
    if meta["format_version"] >= 3 and meta.get("metadata_sha256") != metadata_sha256(meta):
        raise HelloError(f"{path}: the metadata does not match its checksum (corrupted or edited)")
    if tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise HelloError(f"{path}: the LoRA tensors do not match the checksum in the metadata (corrupted or edited)")
    meta.setdefault("dtype", "fp32")  # format 1 stored fp32 only
    meta.setdefault("head_init", "text")  # formats 1-2: CLIP's text head only
    _check_consistency(path, tensors, meta)
    return (decode_tensors(tensors, meta["dtype"]) if decode else tensors), meta


_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def decode_tensors(stored: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The fp32 LoRA tensors of an artifact's stored tensors."""
    if dtype == "int8":
        return {k: dequantize_rows(t, stored[f"{k}.scale"]) for k, t in stored.items() if not k.endswith(".scale")}
    return {k: t.float() for k, t in stored.items()}


def _check_consistency(path, tensors, meta) -> None:
    names = meta["class_names"]
    if not isinstance(names, list) or not names:
        raise HelloError(f"{path}: the artifact lists no class names")
    dtype = meta["dtype"]
    if dtype not in DTYPES:
        raise HelloError(f"{path}: unknown tensor dtype {dtype!r} (this hello_fast reads {', '.join(DTYPES)})")
    a, b = tensors.get("head.lora_a"), tensors.get("head.lora_b")
    if a is None or b is None:
        raise HelloError(f"{path}: the artifact has no head LoRA tensors")
    if b.shape[0] != len(names) or a.shape[0] != meta["head_rank"] or b.shape[1] != meta["head_rank"]:
        raise HelloError(f"{path}: head LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit {len(names)} classes at rank {meta['head_rank']}")
    head_init = meta["head_init"]
    if head_init not in HEAD_INITS:
        raise HelloError(f"{path}: unknown head_init {head_init!r}")
    for key, shape in ((HEAD_WEIGHT, (len(names), a.shape[1])), (HEAD_CENTER, (a.shape[1],))):
        t = tensors.get(key)
        if (t is not None) != (head_init == "prototypes"):
            raise HelloError(f"{path}: a {head_init} head {'lacks' if t is None else 'must not store'} {key}")
        if t is not None and tuple(t.shape) != shape:
            raise HelloError(f"{path}: {key} is {tuple(t.shape)}, the head needs {shape}")
    if head_init == "random" and not isinstance(meta.get("head_seed"), int):
        raise HelloError(f"{path}: a random head needs its integer head_seed")
    for key, t in sorted(tensors.items()):
        if dtype == "int8" and key.endswith((".lora_a.scale", ".lora_b.scale", *(f"{k}.scale" for k in PROTOTYPE_TENSORS))):
            base = tensors.get(key[: -len(".scale")])
            if base is None or t.dtype != torch.float32 or tuple(t.shape) != (base.shape[0],):
                raise HelloError(f"{path}: int8 scale {key} does not fit its tensor (one fp32 scale per row)")
            continue
        if not (key.endswith(".lora_a") or key.endswith(".lora_b") or key in PROTOTYPE_TENSORS):
            raise HelloError(f"{path}: unexpected tensor {key} in a label artifact")
        if t.dtype != _TORCH_DTYPES[dtype]:
            raise HelloError(f"{path}: tensor {key} is {t.dtype}, the metadata says {dtype}")
        if dtype == "int8" and f"{key}.scale" not in tensors:
            raise HelloError(f"{path}: int8 tensor {key} has no scale")


def convert_artifact(src: str, dst: str, dtype: str) -> int:
    """Rewrite a label artifact with its LoRA tensors in `dtype` (fp32, fp16 or int8); returns the new size in bytes."""
    tensors, meta = read_artifact(src)
    meta = {k: v for k, v in meta.items() if k not in ("tensors_sha256", "metadata_sha256")}
    meta["dtype"] = dtype
    return save_artifact(dst, tensors, meta)


def _recorded_activation(ident: dict) -> str:
    """The activation an artifact's backbone ran: recorded since format 2; for format 1, what load_clip chose then."""
    if ident.get("activation"):
        return ident["activation"]
    from open_clip.pretrained import get_pretrained_cfg


    tag = ident.get("pretrained")
    is_tag = bool(tag) and bool(get_pretrained_cfg(ident["model"], tag))  # format 1 built files with the config's activation
    return expected_activation(ident["model"], tag if is_tag else None)


def _check_backbone(path: str, ident: dict, backbone, activation: str | None) -> None:
    """Refuse a backbone other than the artifact's (kind, name, activation, architecture, weights), naming both."""
    kind = ident.get("kind", "clip")
    recorded = f"{ident['model']} ({ident.get('pretrained') or ('published weights' if kind == 'classifier' else 'random init')}, " \
               f"sha256 {ident['weights_sha256'][:12]}…)"
    if backbone.name != ident["model"] or backbone.has_text_tower != (kind == "clip"):
        raise HelloError(f"{path} was trained on backbone {recorded} but the backbone given is {backbone.describe()}")
    if kind == "clip" and backbone.activation != activation:
        raise HelloError(
            f"{path} was trained on {ident['model']} running {activation} but the backbone given runs {backbone.activation}: "
            f"its text head and features are another function of the same weights (load it with clip.activation={activation})"
        )
    if ident.get("arch_sha256") and backbone.arch_sha256 != ident["arch_sha256"]:
        raise HelloError(f"{path} was trained on backbone {ident['model']} built from another architecture "
                         f"(sha256 {ident['arch_sha256'][:12]}…) than the backbone given ({backbone.arch_sha256[:12]}…)")
    if backbone.weights_sha256 != ident["weights_sha256"]:
        raise HelloError(f"{path} was trained on backbone {recorded} but the backbone given is {backbone.describe()}")


def load_projector(path: str, *, num_classes: int | None = None, backbone=None, clip_pretrained: str | None = None,
                   device="cpu"):
    """Rebuild the projector of a label artifact on its backbone (CLIP or an image classifier).

    `backbone`: an already loaded backbone to reuse (it must be the artifact's); otherwise the
    backbone is loaded by the artifact's name and weights source, or from `clip_pretrained` (a tag
    or a local checkpoint file) when the original file is elsewhere on this machine. The weights'
    sha256 must match the artifact's; `num_classes`, when given, must match too.
    Returns (projector, metadata).
    """
    tensors, meta = read_artifact(path)
    ident = meta["backbone"]
    if num_classes is not None and num_classes != len(meta["class_names"]):
        raise HelloError(f"{path} labels {len(meta['class_names'])} classes but the data has {num_classes}")
    classifier = ident.get("kind") == "classifier"
    activation = None if classifier else _recorded_activation(ident)
    if backbone is None:
        source = clip_pretrained if clip_pretrained is not None else ident.get("pretrained")
        if classifier:
            backbone = load_classifier(ident["model"], source, device=device)
        else:
            backbone = load_clip(ident["model"], source, init_seed=ident.get("init_seed") or 0, device=device,
                                 activation=activation)
    _check_backbone(path, ident, backbone, activation)
    head_weight, center = tensors.pop(HEAD_WEIGHT, None), tensors.pop(HEAD_CENTER, None)
    if meta["head_init"] == "random":
        head_weight = random_head_weight(len(meta["class_names"]), tensors["head.lora_a"].shape[1], meta["head_seed"])
    projector = build_projector(
        backbone, meta["class_names"], meta["templates"], conv_rank=meta["conv_rank"], head_rank=meta["head_rank"],
        linear_rank=meta["linear_rank"], alpha=meta["alpha"], device=device, head_weight=head_weight,
        image_size=meta["image_size"], feature_center=center,
    )
    try:
        projector.load_lora_state_dict(tensors)
    except ValueError as e:
        raise HelloError(f"{path}: {e}") from None
    return projector.eval(), meta


def describe(path: str) -> dict:
    """What `hello-fast inspect` prints: metadata, size and parameter counts of a validated artifact."""
    stored, meta = read_artifact(path, decode=False)
    tensors = {k: t for k, t in stored.items() if not k.endswith(".scale") and k not in PROTOTYPE_TENSORS}
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
        "dtype": meta["dtype"],
        "lora_layers": len(tensors) // 2,
        "head_init": meta["head_init"],
        "stored_head": sum(int(stored[k].numel()) for k in PROTOTYPE_TENSORS if k in stored),
        "parameters": {"tower": tower, "head": head, "total": tower + head},
        "image_size": meta["image_size"],
        "mean": meta["mean"],
        "std": meta["std"],
        "created_by": meta.get("created_by"),
        "valid": True,
    }
