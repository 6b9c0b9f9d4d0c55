"""Stage 2: train the LoRA projector on the original set and write the label artifact (HeLlO Sec. 3.2-3.3).

The head starts as CLIP's zero-shot classifier (normalised text embeddings of the class prompts),
or on a backbone without a text tower as the class prototypes of the training images (one pass,
its cost logged) or a seeded random head (projector.head_init);
LoRA on every conv of the image tower (and on the head) is trained with Eq. 5,
MSE(projector(x), mean of the weak teachers' logits on x) + lambda * CE(projector(x), y),
on the same augmented images for the teachers (ImageNet normalisation) and the projector (CLIP's).
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from hello_fast import distributed
from hello_fast._progress import log
from hello_fast._util import Normalize
from hello_fast.data.loader import batches
from hello_fast.data.spec import DataPass
from hello_fast.engine import Engine
from hello_fast.layout import ARTIFACT, PROJECTOR, load_teachers
from hello_fast.logs import TrainingLog
from hello_fast.models.backbone import configured_image_size, load_backbone
from hello_fast.models.clip import template_strings
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD, mean_teacher_logits
from hello_fast.projector.artifact import (
    artifact_metadata,
    artifact_tensors,
    save_artifact,
)
from hello_fast.projector.head import (
    feature_dim,
    prototype_head,
    random_head_weight,
)
from hello_fast.projector.model import (
    build_projector,
    normalize_images,
    projector_image_size,
)
from hello_fast.stages.contract import Stage, StageInputs

NAME = PROJECTOR


@torch.no_grad()
def projector_top1(projector, val_set, cfg, device) -> float:
    """Val top-1 of the projector in percent (each rank its share, summed)."""
    projector.eval()
    correct = total = 0
    for images, labels, _ in batches(val_set, DataPass.from_config(cfg, sharded=True), train=False, batch_size=256,
                                     device=device):
        pred = projector(projector.normalize(images.to(device))).argmax(1).cpu()
        correct += int((pred == labels).sum())
        total += labels.numel()
    correct, total = distributed.sum_over_ranks([correct, total], device)
    return 100.0 * correct / max(total, 1)


def initial_head(cfg, backbone, train_set, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(head weight, feature centre) for cfg's head_init: (None, None) for text (CLIP's head, built with the
    projector), (W, m) for prototypes, (W, None) for random."""
    head_init = cfg.head_init
    if head_init == "text":
        return None, None
    size = projector_image_size(backbone, configured_image_size(cfg, backbone))
    if head_init == "random":
        return random_head_weight(train_set.num_classes, feature_dim(backbone.visual, size), cfg.seed), None
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    start = time.perf_counter()
    passes = ((images.to(device), labels) for images, labels, _ in
              batches(train_set, DataPass.from_config(cfg), train=False, batch_size=256, device=device))
    weight, center = prototype_head(backbone.visual, passes, lambda x: normalize_images(x, mean, std, size),
                                    train_set.num_classes)
    log(f"projector: prototype head from {len(train_set):,} training images at {size} px in "
        f"{time.perf_counter() - start:.1f} s ({weight.shape[0]} classes x {weight.shape[1]} features)")
    return weight, center


def train_projector(inputs: StageInputs, out: str) -> dict:
    """Train the LoRA projector on the weak teachers' averaged logits (Eq. 5) and write the label artifact into `out`."""
    cfg, device = inputs.cfg, inputs.device
    pc = cfg.projector
    train_set, val_set = inputs.data()
    class_names = train_set.class_names
    templates = template_strings(cfg.clip.templates)
    backbone = load_backbone(cfg, device)
    head_init = cfg.head_init
    if backbone.has_text_tower:
        log(f"projector: CLIP {backbone.name} ({backbone.pretrained or f'random init, seed {cfg.clip.init_seed}'}, {backbone.activation}), "
            f"head {head_init}" + (f" from {len(templates)} prompt templates x {len(class_names)} classes" if head_init == "text" else ""))
    else:
        templates = []  # no text tower: no prompts
        log(f"projector: {backbone.describe()}, head {head_init}")
    head_weight, center = initial_head(cfg, backbone, train_set, device)
    torch.manual_seed(cfg.seed)  # the LoRA initialisation, whatever the prototype pass's loader drew
    projector = build_projector(backbone, class_names, templates, conv_rank=pc.conv_rank, head_rank=pc.head_rank,
                                linear_rank=pc.linear_rank, alpha=pc.alpha, device=device, head_weight=head_weight,
                                image_size=configured_image_size(cfg, backbone), feature_center=center)
    teachers = load_teachers(inputs.run, device)
    teacher_norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    params = projector.lora_parameters()
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    steps_per_epoch = max(1, -(-len(train_set) // pc.batch_size))
    summary = {"top1": {}}

    def loss(batch):
        images, labels, _ = batch
        images, labels = images.to(device), labels.to(device)
        target = mean_teacher_logits(teachers, teacher_norm(images))
        logits = engine.net(projector.normalize(images))
        return pc.mse_weight * F.mse_loss(logits, target) + pc.lambda_ce * F.cross_entropy(logits, labels), labels.numel()

    # only the LoRA tensors train (frozen_backbone): their gradients are averaged over ranks
    engine = Engine(NAME, projector, opt, device=device, epochs=pc.epochs, loss=loss, knob="projector.lr", folder=out,
                    checkpoint_every=cfg.checkpoint_every, frozen_backbone=True,
                    scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=pc.epochs * steps_per_epoch),
                    scheduler_per="step", weights=(projector.lora_state_dict, projector.load_lora_state_dict),
                    log=lambda first: TrainingLog.for_stage(cfg, inputs.run.root, NAME, first_epoch=first),
                    extra={"summary": (lambda: summary, summary.update)})
    if not engine.resumed:
        summary["zero_shot_top1"] = projector_top1(projector, val_set, cfg, device)
        log(f"projector: zero-shot val top-1 {summary['zero_shot_top1']:.1f}%")

    def epoch_batches(epoch):
        return batches(train_set, DataPass.from_config(cfg, sharded=True), train=True, batch_size=pc.batch_size,
                       seed=cfg.seed + 1, epoch=epoch, device=device)

    def record(epoch, acc, _seconds):
        summary["top1"][str(epoch)] = acc
        log(f"projector: epoch {epoch} val top-1 {acc:.1f}% (loss {engine.last_loss.item():.4f})")

    engine.run(epoch_batches, evaluate=lambda: projector_top1(projector, val_set, cfg, device), after_epoch=record)
    meta = artifact_metadata(projector, backbone, class_names, templates, conv_rank=pc.conv_rank,
                             head_rank=pc.head_rank, linear_rank=pc.linear_rank, alpha=pc.alpha,
                             dtype=pc.artifact_dtype, head_init=head_init, head_seed=cfg.seed)
    summary["lora_parameters"] = sum(p.numel() for p in params)
    if distributed.world().main:
        nbytes = save_artifact(os.path.join(out, ARTIFACT), artifact_tensors(projector, head_init), meta)
        summary["artifact_bytes"] = nbytes
        log(f"projector: label artifact {nbytes:,} bytes ({summary['lora_parameters']:,} LoRA parameters)")
    return summary


STAGE = Stage(NAME, options=("data", "clip", "projector"), run=train_projector, reads=lambda cfg, unit: ("teachers",))
