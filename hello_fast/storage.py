"""Label storage of each scheme for a config: the projector artifact, SRe2L-style stored soft labels, the RDED teacher.

- artifact: the exact bytes of the label-artifact file the projector stage would write (LoRA
  tensors in fp32 + metadata), built from the real backbone architecture (weights not needed);
- SRe2L/FKD-style stored labels (Yin et al.): for every epoch and every augmented image, the fp16
  logits (C x 2 bytes), the crop coordinates (4 x fp32), the flip flag (1 byte) and the mix
  partner index (int64), plus per batch the mix lambda (fp32) and box (4 x int64);
- RDED: the teacher network shipped with the data (fp32 state dict as safetensors).
Byte counts are exact for the shapes given; the paper's "MB" are MiB (2^20 bytes).
"""
from __future__ import annotations

import math

import torch

MIB = 2**20


def sre2l_soft_label_bytes(num_images: int, num_classes: int, epochs: int, batch_size: int) -> int:
    per_image = num_classes * 2 + 4 * 4 + 1 + 8
    per_batch = 4 + 4 * 8
    batches = math.ceil(num_images / batch_size)
    return epochs * (num_images * per_image + batches * per_batch)


def teacher_bytes(arch: str, num_classes: int, image_size: int, width: int | None) -> int:
    from safetensors.torch import save

    from hello_fast.models.students import build_model

    model = build_model(arch, num_classes, image_size, width)
    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def _class_names(cfg, num_classes: int) -> tuple[list[str], bool]:
    """The class names the artifact would carry; (names, exact?)."""
    if cfg.clip.class_names:
        return list(cfg.clip.class_names), True
    if cfg.data.source == "digits":
        from hello_fast.data.sources import DIGIT_NAMES

        return DIGIT_NAMES, True
    if num_classes == 1000:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), True
    return [f"class {i:04d}" for i in range(num_classes)], False


def artifact_file_bytes(cfg, num_classes: int, class_names: list[str]) -> tuple[int, int]:
    """(bytes, LoRA parameters) of the artifact this config would write."""
    from hello_fast.models.clip import load_clip, template_strings
    from hello_fast.projector.artifact import artifact_bytes, artifact_metadata
    from hello_fast.projector.model import build_projector

    pc = cfg.projector
    # the architecture is what matters: a seeded random init has the same shapes and an equally long sha256
    backbone = load_clip(cfg.clip.model, None, cfg.clip.init_seed, calibrate=False)
    backbone.pretrained = cfg.clip.pretrained if cfg.clip.pretrained is None else str(cfg.clip.pretrained).split("/")[-1]
    embed_dim = backbone.model.visual.output_dim
    projector = build_projector(backbone, class_names, [], conv_rank=pc.conv_rank, head_rank=pc.head_rank,
                                linear_rank=pc.linear_rank, alpha=pc.alpha, head_weight=torch.zeros(num_classes, embed_dim))
    tensors = projector.lora_state_dict()
    meta = artifact_metadata(projector, backbone, class_names, template_strings(cfg.clip.templates), conv_rank=pc.conv_rank,
                             head_rank=pc.head_rank, linear_rank=pc.linear_rank, alpha=pc.alpha)
    return len(artifact_bytes(tensors, meta)), sum(t.numel() for t in tensors.values())


def storage_report(cfg, num_classes: int | None = None, class_names: list[str] | None = None) -> dict:
    """Label storage in bytes of each scheme for `cfg` (keys artifact_bytes, sre2l_soft_label_bytes, teacher_bytes)."""
    C = num_classes or cfg.data.num_classes
    if C is None:
        raise ValueError("storage: the config does not say how many classes (data.num_classes) and no data was given")
    exact = True
    if class_names is None:
        class_names, exact = _class_names(cfg, C)
    art, params = artifact_file_bytes(cfg, C, class_names)
    n_images = C * cfg.select.ipc
    sre2l = sre2l_soft_label_bytes(n_images, C, cfg.student.epochs, cfg.student.batch_size)
    tc = cfg.teachers
    teacher = teacher_bytes(tc.arch, C, cfg.data.image_size, tc.width if tc.arch == "resnet18" else None)
    return {
        "config": cfg.name,
        "num_classes": C,
        "distilled_images": n_images,
        "student_epochs": cfg.student.epochs,
        "artifact_bytes": art,
        "artifact_lora_parameters": params,
        "artifact_metadata_exact": exact,
        "sre2l_soft_label_bytes": sre2l,
        "teacher_bytes": teacher,
    }


def format_bytes(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:,.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{n} B"
