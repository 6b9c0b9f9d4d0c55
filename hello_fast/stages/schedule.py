"""The students' augmentation schedule: what a stored-labels replay must match, the resident set it draws from, the views it needs.

Shared by the student stage (hello_fast/stages/student.py) and the label sources (hello_fast/labels.py),
which write stored labels for exactly the schedule the student will replay.
"""
from __future__ import annotations

import torch

from hello_fast import distributed
from hello_fast.data.resident import ResidentSet
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD


def schedule_of(cfg, num_images: int) -> dict:
    """What stored labels depend on: replay is only valid for exactly this schedule."""
    sc = cfg.student
    return {"seed": cfg.seed, "epochs": sc.epochs, "batch_size": sc.batch_size, "images": num_images,
            "out_size": cfg.data.image_size, "scale": list(sc.scale), "flip": cfg.data.flip, "mix": sc.mix,
            "mix_alpha": sc.mix_alpha, "ranks": distributed.world().size, "shuffle_factor": shuffle_factor(cfg)}


def shuffle_factor(cfg) -> int:
    """The ShufflePatches factor of the student's augmentation: select.factor with student.shuffle_patches, else 1 (none)."""
    return cfg.select.factor if cfg.student.shuffle_patches else 1


def views_for(source, device, fast: bool):
    """The views each step needs: the student's (also the teachers'), and CLIP's for the projector."""
    student_dtype = torch.bfloat16 if (fast and device.type == "cuda") else torch.float32
    views = [(IMAGENET_MEAN, IMAGENET_STD, student_dtype)]
    if source.needs_clip_view:
        views.append((source.mean, source.std, source.dtype))
    return views


def resident_set(cfg, distilled, device) -> ResidentSet:
    return ResidentSet(distilled.images, distilled.labels, device, seed=cfg.seed + 4, shuffle_factor=shuffle_factor(cfg))
