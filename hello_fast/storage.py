"""Label storage of each scheme for a config: the projector artifact (and the CLIP backbone it needs), SRe2L-style stored soft labels, the RDED teacher.

- artifact: the exact bytes of the label-artifact file the projector stage would write (LoRA
  tensors + metadata), built from the real backbone architecture (weights not needed), in the
  configured dtype and in each of fp32, fp16 and int8 (one fp32 scale per output channel);
- backbone: the public model the artifact runs on, downloaded once and shared by every artifact
  and dataset, file headers not counted. CLIP: its weights at 2 bytes each (OpenAI publishes CLIP
  in half precision); both towers count: the image tower makes every label, the text tower
  rebuilds the zero-shot head from the class names (the artifact does not store it); the image
  tower alone is reported beside it. An image classifier (projector.backbone efficientnet_lite0,
  timm:NAME, torchvision:NAME): its feature layers at 4 bytes each (timm and torchvision publish
  fp32), its classifier layer not counted (the projector drops it). A random-init backbone (the
  digits default) is rebuilt from its seed: nothing to download, but its size is reported the same
  way;
- SRe2L/FKD-style stored labels (Yin et al.): for every epoch and every augmented image, the fp16
  logits (C x 2 bytes), the crop coordinates (4 x fp32), the flip flag (1 byte) and the mix
  partner index (int64), plus per batch the mix lambda (fp32) and box (4 x int64);
- the compressed stored labels (the label sources stored_int8, stored_int4, stored_topk, stored_pool:
  hello_fast/labels.py), the same replay parameters with each crop's logits stored as int8 or int4
  with one fp32 scale (C + 4 or ceil(C/2) + 4 bytes), as the top k fp16 logits with int16 indices and
  one fp16 fill logit (4k + 2 bytes), or SRe2L's fp16 for a student.stored_pool_fraction share of the
  batches (LPLD's pruned label pool);
- RDED: the teacher network shipped with the data (fp32 state dict as safetensors).
Byte counts are exact for the shapes given; the paper's "MB" are MiB (2^20 bytes).
"""
from __future__ import annotations

import math

import torch

from hello_fast.data.sources import DIGIT_NAMES
from hello_fast.models.backbone import configured_image_size
from hello_fast.models.classifier import RANDOM, load_classifier
from hello_fast.models.clip import (
    architecture_sha256,
    expected_activation,
    load_clip,
    template_strings,
)
from hello_fast.models.students import build_model
from hello_fast.projector.artifact import (
    DTYPES,
    artifact_bytes,
    artifact_metadata,
    artifact_tensors,
)
from hello_fast.projector.head import feature_dim
from hello_fast.projector.model import build_projector, projector_image_size

MIB = 2**20
_PUBLISHED_BYTES_PER_WEIGHT = 2  # OpenAI's CLIP releases are fp16
_CLASSIFIER_BYTES_PER_WEIGHT = 4  # timm's and torchvision's releases (and EfficientNet-Lite0's wheel) are fp32


def sre2l_soft_label_bytes(num_images: int, num_classes: int, epochs: int, batch_size: int) -> int:
    per_image = num_classes * 2 + 4 * 4 + 1 + 8
    per_batch = 4 + 4 * 8
    batches = math.ceil(num_images / batch_size)
    return epochs * (num_images * per_image + batches * per_batch)


def label_payload_bytes(encoding: str, num_classes: int, top_k: int | None = None) -> int:
    """Bytes of one crop's stored label: fp16 logits, int8/int4 codes with an fp32 scale, or top-k (fp16 value +
    int16 index each, and an fp16 fill logit)."""
    if encoding == "fp16":
        return 2 * num_classes
    if encoding == "int8":
        return num_classes + 4
    if encoding == "int4":
        return -(-num_classes // 2) + 4
    if encoding == "topk":
        return 4 * top_k + 2
    raise ValueError(f"unknown label encoding {encoding!r}")


def compressed_label_bytes(cfg, num_images: int, num_classes: int) -> dict:
    """The stored-label baselines' bytes for cfg's schedule: SRe2L's replay parameters with each scheme's labels."""
    sc = cfg.student
    crops = sc.epochs * num_images
    params = sre2l_soft_label_bytes(num_images, num_classes, sc.epochs, sc.batch_size) - crops * 2 * num_classes
    out = {f"stored_{e}_label_bytes": params + crops * label_payload_bytes(e, num_classes) for e in ("int8", "int4")}
    k = min(sc.stored_topk, num_classes - 1)
    out["stored_topk_label_bytes"] = params + crops * label_payload_bytes("topk", num_classes, k)
    batches = sc.epochs * math.ceil(num_images / sc.batch_size)
    kept = max(1, round(sc.stored_pool_fraction * batches))
    out["stored_pool_label_bytes"] = round(sre2l_soft_label_bytes(num_images, num_classes, sc.epochs, sc.batch_size) * kept / batches)
    return out


def network_bytes(model: torch.nn.Module) -> int:
    """Bytes of a network's state dict written as safetensors (fp32 as trained): what RDED ships with its images."""
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def teacher_bytes(arch: str, num_classes: int, image_size: int, width: int | None) -> int:
    return network_bytes(build_model(arch, num_classes, image_size, width))


def weights_bytes(module: torch.nn.Module, bytes_per_float: int = _PUBLISHED_BYTES_PER_WEIGHT) -> int:
    """Bytes of a module's parameters and persistent buffers, floats at `bytes_per_float` each."""
    return sum(t.numel() * (bytes_per_float if t.is_floating_point() else t.element_size())
               for t in module.state_dict().values())


def _class_names(cfg, num_classes: int) -> tuple[list[str], bool]:
    """The class names the artifact would carry; (names, exact?)."""
    if cfg.clip.class_names:
        return list(cfg.clip.class_names), True
    if cfg.data.source in ("digits", "mnist5k"):
        return DIGIT_NAMES, True
    if num_classes == 1000:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), True
    return [f"class {i:04d}" for i in range(num_classes)], False


def _shape_backbone(cfg):
    """The configured backbone's architecture with the identity its weights would give (weights not needed)."""
    pc = cfg.projector
    if pc.backbone != "clip":
        # a seeded random init has the same shapes and an equally long sha256
        backbone = load_classifier(pc.backbone, RANDOM)
        backbone.pretrained = None if pc.pretrained is None else str(pc.pretrained).split("/")[-1]
        return backbone
    backbone = load_clip(cfg.clip.model, None, cfg.clip.init_seed, calibrate=False)
    backbone.pretrained = cfg.clip.pretrained if cfg.clip.pretrained is None else str(cfg.clip.pretrained).split("/")[-1]
    backbone.activation = expected_activation(cfg.clip.model, cfg.clip.pretrained, cfg.clip.activation)
    backbone.arch_sha256 = architecture_sha256(cfg.clip.model, backbone.activation)
    return backbone


def _artifact_sizes(cfg, num_classes: int, class_names: list[str]) -> dict:
    """Bytes of the artifact this config would write, in each dtype, its LoRA parameters, and the backbone's size."""
    pc = cfg.projector
    backbone = _shape_backbone(cfg)
    size = projector_image_size(backbone, configured_image_size(cfg, backbone))
    head_init = cfg.head_init
    templates = template_strings(cfg.clip.templates) if head_init == "text" and backbone.has_text_tower else []
    dim = feature_dim(backbone.visual, size)
    projector = build_projector(backbone, class_names, [], conv_rank=pc.conv_rank, head_rank=pc.head_rank,
                                linear_rank=pc.linear_rank, alpha=pc.alpha, head_weight=torch.zeros(num_classes, dim),
                                image_size=size, feature_center=torch.zeros(dim) if head_init == "prototypes" else None)
    tensors = artifact_tensors(projector, head_init)
    sizes = {}
    for dtype in DTYPES:
        meta = artifact_metadata(projector, backbone, class_names, templates,
                                 conv_rank=pc.conv_rank, head_rank=pc.head_rank, linear_rank=pc.linear_rank,
                                 alpha=pc.alpha, dtype=dtype, head_init=head_init, head_seed=cfg.seed)
        sizes[dtype] = len(artifact_bytes(tensors, meta))
    per_weight = _PUBLISHED_BYTES_PER_WEIGHT if backbone.has_text_tower else _CLASSIFIER_BYTES_PER_WEIGHT
    return {
        "artifact": sizes, "lora_parameters": sum(t.numel() for k, t in tensors.items() if k.endswith((".lora_a", ".lora_b"))),
        "backbone": weights_bytes(backbone.model, per_weight), "image_tower": weights_bytes(backbone.visual, per_weight),
        "backbone_name": backbone.name, "bytes_per_weight": per_weight,
    }


def _backbone_label(cfg) -> tuple[str, bool]:
    """(what the backbone is, whether it is downloaded: False for a seeded random init)."""
    pc = cfg.projector
    if pc.backbone != "clip":
        if pc.pretrained == RANDOM:
            return f"{pc.backbone} (random init)", False
        return f"{pc.backbone} ({pc.pretrained or 'published ImageNet weights'})", True
    pretrained = cfg.clip.pretrained
    if pretrained:
        return f"{cfg.clip.model} ({pretrained})", True
    return f"{cfg.clip.model} (random init, seed {cfg.clip.init_seed})", False


def storage_report(cfg, num_classes: int | None = None, class_names: list[str] | None = None) -> dict:
    """Storage in bytes of each scheme for `cfg`: artifact_bytes (the configured dtype) and _fp32/_fp16/_int8,
    backbone_bytes (the shared CLIP model), sre2l_soft_label_bytes, the compressed stored labels
    (stored_int8/int4/topk/pool_label_bytes), teacher_bytes."""
    C = num_classes or cfg.data.num_classes
    if C is None:
        raise ValueError("storage: the config does not say how many classes (data.num_classes) and no data was given")
    exact = True
    if class_names is None:
        class_names, exact = _class_names(cfg, C)
    sizes = _artifact_sizes(cfg, C, class_names)
    n_images = C * cfg.select.ipc
    sre2l = sre2l_soft_label_bytes(n_images, C, cfg.student.epochs, cfg.student.batch_size)
    tc = cfg.teachers
    teacher = teacher_bytes(tc.arch, C, cfg.data.image_size, tc.width if tc.arch == "resnet18" else None)
    label, downloaded = _backbone_label(cfg)
    return {
        "config": cfg.name,
        "num_classes": C,
        "distilled_images": n_images,
        "student_epochs": cfg.student.epochs,
        "artifact_dtype": cfg.projector.artifact_dtype,
        "artifact_bytes": sizes["artifact"][cfg.projector.artifact_dtype],
        "artifact_bytes_fp32": sizes["artifact"]["fp32"],
        "artifact_bytes_fp16": sizes["artifact"]["fp16"],
        "artifact_bytes_int8": sizes["artifact"]["int8"],
        "artifact_lora_parameters": sizes["lora_parameters"],
        "artifact_metadata_exact": exact,
        "backbone": label,
        "backbone_kind": "clip" if cfg.projector.backbone == "clip" else "classifier",
        "backbone_bytes": sizes["backbone"],
        "backbone_image_tower_bytes": sizes["image_tower"],
        "backbone_bytes_per_weight": sizes["bytes_per_weight"],
        "backbone_downloaded": downloaded,
        "head_init": cfg.head_init,
        "sre2l_soft_label_bytes": sre2l,
        **compressed_label_bytes(cfg, n_images, C),
        "stored_topk": min(cfg.student.stored_topk, C - 1),
        "stored_pool_fraction": cfg.student.stored_pool_fraction,
        "teacher_bytes": teacher,
    }


def format_bytes(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:,.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{n} B"
