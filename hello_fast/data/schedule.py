"""The students' augmentation schedule: what a stored-labels replay must match, the resident set it draws from, the views it needs.

Shared by the student stage (hello_fast/stages/student.py) and the label sources (hello_fast/labels.py),
which write stored labels for exactly the schedule the student will replay. The schedule is the
AugmentRecipe's every field plus the loop's seed, epochs, batch size, image count and ranks: a
field added to the recipe changes it, so replay refuses labels written before.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from hello_fast import distributed
from hello_fast.data.resident import ResidentSet
from hello_fast.data.spec import AugmentRecipe
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD

# the resident set's generator seed: cfg.seed + this (the students' own stream, apart from the stages')
_SEED_OFFSET = 4


def schedule_of(cfg, num_images: int, recipe: AugmentRecipe | None = None) -> dict:
    """What stored labels depend on, as JSON values: replay is only valid for exactly this schedule.

    `recipe`: the students' AugmentRecipe (default: built from `cfg`)."""
    recipe = AugmentRecipe.from_config(cfg) if recipe is None else recipe
    sc = cfg.student
    schedule = {**dataclasses.asdict(recipe), "seed": cfg.seed, "epochs": sc.epochs, "batch_size": sc.batch_size,
                "images": num_images, "ranks": distributed.world().size}
    return json.loads(json.dumps(schedule))  # tuples as lists: the form the stored index reads back


def views_for(source, device, fast: bool):
    """The views each step needs: the student's (also the teachers'), and CLIP's for the projector."""
    student_dtype = torch.bfloat16 if (fast and device.type == "cuda") else torch.float32
    views = [(IMAGENET_MEAN, IMAGENET_STD, student_dtype)]
    if source.needs_clip_view:
        views.append((source.mean, source.std, source.dtype))
    return views


def resident_seed(cfg) -> int:
    """The seed of the students' resident set (and of DALI's distilled set): the same stream for both."""
    return cfg.seed + _SEED_OFFSET


def resident_set(cfg, distilled, device, recipe: AugmentRecipe | None = None) -> ResidentSet:
    """The distilled set on `device`, drawing by `recipe` (default: the config's) from the run's seed."""
    recipe = AugmentRecipe.from_config(cfg) if recipe is None else recipe
    return ResidentSet(distilled.images, distilled.labels, device, recipe, seed=resident_seed(cfg))
