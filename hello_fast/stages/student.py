"""Stage 4: train students on the distilled images with labels made online for every augmented batch (Alg. 1 l.12-15).

The distilled set stays resident on the device as uint8. Each step draws crop/flip/mix parameters
(RandomResizedCrop with the student's scale range, flip, CutMix or Mixup), makes the student's view
and, when the projector labels, CLIP's view with one `augment_mix` call, asks the label source for
soft labels on exactly those images, and minimises `soft_label_loss` (MSE + beta CE, the paper, or
temperature KL + beta CE, the peers). Label sources: `hard` (mixed one-hot CE only), `teacher`
(the weak teachers' averaged logits, online) and `projector` (the label artifact, online).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from hello_fast._io import write_json
from hello_fast._progress import log, progress
from hello_fast._util import Normalize, save_model
from hello_fast.data.loader import batches
from hello_fast.errors import HelloError
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD, build_model, top1
from hello_fast.ops import augment_mix, sample_augment_params, soft_label_loss

STAGE = "student"
SOURCES = ("hard", "teacher", "projector")


class LabelSource:
    """Soft labels for an augmented batch: `__call__(views) -> logits (B, C)` or None for hard labels."""

    name = "hard"
    needs_clip_view = False
    label_bytes = 0

    def __call__(self, student_view, clip_view):
        return None


class HardLabels(LabelSource):
    def __init__(self, num_images: int):
        self.label_bytes = num_images * 8  # one int64 class index per distilled image


class TeacherLabels(LabelSource):
    name = "teacher"

    def __init__(self, teachers, label_bytes: int):
        self.teachers = teachers
        self.label_bytes = label_bytes

    @torch.no_grad()
    def __call__(self, student_view, clip_view):
        from hello_fast.stages.teachers import mean_teacher_logits

        return mean_teacher_logits(self.teachers, student_view)


class ProjectorLabels(LabelSource):
    name = "projector"
    needs_clip_view = True

    def __init__(self, projector, label_bytes: int):
        projector.merge()  # labels only: fold LoRA into the weights once
        self.projector = projector.eval()
        self.label_bytes = label_bytes

    @torch.no_grad()
    def __call__(self, student_view, clip_view):
        size = self.projector.image_size
        if size and clip_view.shape[-1] != size:
            clip_view = F.interpolate(clip_view, size=(size, size), mode="bilinear", align_corners=False)
        return self.projector(clip_view)


def _lr_factor(schedule: str, step: int, total: int, epoch: int, epochs: int) -> float:
    if schedule == "rded":  # RDED's 0.5 * (1 + cos(pi * e / 2E)): falls only to half
        return 0.5 * (1 + math.cos(math.pi * epoch / (2 * epochs)))
    return 0.5 * (1 + math.cos(math.pi * step / total))


def train_student(cfg, distilled, val_set, source: LabelSource, device, out_dir: str) -> dict:
    """Train one student with `source` labels; returns {top1_last, top1_best, label_bytes, history}."""
    sc = cfg.student
    S = cfg.data.image_size
    torch.manual_seed(cfg.seed)  # every label source starts from the same student
    width = sc.width if sc.arch == "resnet18" else None
    student = build_model(sc.arch, distilled.num_classes, S, width).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    resident = distilled.images.to(device)
    labels = distilled.labels.to(device)
    N, _, H, W = resident.shape
    steps_per_epoch = max(1, -(-N // sc.batch_size))
    total = sc.epochs * steps_per_epoch
    views = [(IMAGENET_MEAN, IMAGENET_STD, torch.float32)]
    if source.needs_clip_view:
        views.append((tuple(source.projector.mean.flatten().tolist()), tuple(source.projector.std.flatten().tolist()), torch.float32))
    g = torch.Generator().manual_seed(cfg.seed + 4)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val = batches(val_set, size=S, batch_size=sc.eval_batch_size, train=False, num_workers=cfg.data.num_workers,
                  eval_resize=cfg.data.eval_resize)
    history, step = [], 0
    beta = 1.0 if source.name == "hard" else sc.beta
    bar = progress(range(1, sc.epochs + 1), desc=f"student ({source.name})", unit="epoch")
    for epoch in bar:
        student.train()
        perm = torch.randperm(N, generator=g).to(device)
        for chunk in perm.split(sc.batch_size):
            for group in opt.param_groups:
                group["lr"] = sc.lr * _lr_factor(sc.schedule, step, total, epoch - 1, sc.epochs)
            p = sample_augment_params(chunk, H, W, out_size=S, scale=sc.scale, flip_prob=0.5 if cfg.data.flip else 0.0,
                                      mode=sc.mix, alpha=sc.mix_alpha, generator=g)
            out, lam = augment_mix(resident, chunk, **p, mode=sc.mix, out_size=S, views=views)
            x = out[0]
            target = source(x, out[1] if len(out) > 1 else None)
            logits = student(x)
            loss = soft_label_loss(logits, target, labels[chunk], p["partner"], lam, mode=sc.loss,
                                   temperature=sc.temperature, beta=beta)
            if not torch.isfinite(loss):
                raise HelloError(f"student ({source.name}): the loss became {loss.item()} at epoch {epoch}; lower student.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if epoch % sc.eval_every == 0 or epoch == sc.epochs:
            acc = top1(student, val, device, norm)
            history.append({"epoch": epoch, "top1": acc, "loss": loss.item()})
            bar.set_postfix(top1=f"{acc:.1f}")
    result = {
        "top1_last": history[-1]["top1"],
        "top1_best": max(h["top1"] for h in history),
        "label_bytes": int(source.label_bytes),
        "history": history,
    }
    save_model(os.path.join(out_dir, "student.safetensors"), student,
               {"arch": sc.arch, "num_classes": distilled.num_classes, "image_size": S, "width": width,
                "label_source": source.name, "top1_last": result["top1_last"]})
    write_json(os.path.join(out_dir, "history.json"), history)
    log(f"student ({source.name}): top-1 last {result['top1_last']:.1f}%, best {result['top1_best']:.1f}%")
    return result
