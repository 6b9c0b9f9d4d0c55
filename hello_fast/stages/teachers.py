"""Stage 0: weak teachers, the checkpoints of one ResNet-18 run at early epochs (HeLlO Sec. 3.3).

One network is trained on the original train set with PyTorch's ImageNet recipe (SGD, momentum,
step decay); the checkpoints at `teachers.keep_epochs` are kept. Their averaged soft labels guide
the projector (Eq. 5); the last one is the default RDED observer. With `select.observer: full`, or
with the `rded` label source in student.label_sources, the run goes on to `teachers.epochs` and that
fully trained network is kept too (RDED's observer and RDED's online labeler).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from hello_fast import distributed
from hello_fast._progress import log
from hello_fast._util import Normalize, save_model
from hello_fast.data.loader import batches
from hello_fast.data.spec import DataPass
from hello_fast.engine import Engine
from hello_fast.errors import HelloError
from hello_fast.layout import TEACHERS, teacher_path
from hello_fast.logs import TrainingLog
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD, build_model, top1
from hello_fast.stages.contract import Stage, StageInputs

NAME = TEACHERS


def train_teachers(inputs: StageInputs, out: str) -> dict:
    """Train the teacher run and keep the weak-teacher checkpoints in `out`. Returns the stage summary.

    Data-parallel under torchrun; resumes from the last epoch checkpoint of an interrupted run.
    """
    cfg, device = inputs.cfg, inputs.device
    tc = cfg.teachers
    train_set, val_set = inputs.data()
    keep = sorted(set(tc.keep_epochs))
    last = last_epoch(cfg)
    main = distributed.world().main
    model = build_model(tc.arch, train_set.num_classes, cfg.data.image_size, tc.width if tc.arch == "resnet18" else None).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    summary = {"checkpoints": [], "top1": {}, "bytes": {}}

    def loss(batch):
        images, labels, _ = batch
        images, labels = images.to(device), labels.to(device)
        return F.cross_entropy(engine.net(norm(images)), labels), labels.numel()

    engine = Engine(NAME, model, opt, device=device, epochs=last, loss=loss, knob="teachers.lr", folder=out,
                    checkpoint_every=cfg.checkpoint_every, scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=tc.lr_step, gamma=0.1),
                    log=lambda first: TrainingLog.for_stage(cfg, inputs.run.root, NAME, first_epoch=first),
                    extra={"summary": (lambda: summary, summary.update)})
    data_pass = DataPass.from_config(cfg, sharded=True)
    val = batches(val_set, data_pass, train=False, batch_size=256, device=device)

    def epoch_batches(epoch):
        return batches(train_set, data_pass, train=True, batch_size=tc.batch_size, seed=cfg.seed, epoch=epoch, device=device)

    def keep_checkpoint(epoch, acc, _seconds):
        """A weak teacher (a kept epoch) or the fully trained observer (the last epoch) is saved with its val top-1."""
        full = epoch == last and trains_full(cfg)
        meta = {"arch": tc.arch, "num_classes": train_set.num_classes, "image_size": cfg.data.image_size,
                "width": tc.width if tc.arch == "resnet18" else None, "epoch": epoch, "top1": acc,
                "class_names": train_set.class_names}
        path = teacher_path(out, epoch)
        if main:
            nbytes = save_model(path, model, meta)
            if epoch in keep:
                summary["bytes"][str(epoch)] = nbytes
            log(f"teachers: epoch {epoch} kept as a {'weak teacher' if epoch in keep else 'full observer'} "
                f"(val top-1 {acc:.1f}%)")
        if epoch in keep:
            summary["checkpoints"].append(os.path.basename(path))
            summary["top1"][str(epoch)] = acc
        if full:
            summary["observer"] = os.path.basename(path)
            summary["observer_top1"] = acc

    kept = lambda epoch: epoch in keep or (epoch == last and trains_full(cfg))  # noqa: E731
    engine.run(epoch_batches, evaluate=lambda: top1(engine.net, val, device, norm), evaluate_at=kept,
               after_epoch=lambda epoch, acc, seconds: keep_checkpoint(epoch, acc, seconds) if kept(epoch) else None)
    return summary


def trains_full(cfg) -> bool:
    """Whether the teacher run goes on to teachers.epochs for a fully trained network: RDED's observer
    (select.observer: full) or RDED's online labeler (the `rded` label source)."""
    return (cfg.select.method == "rded" and cfg.select.observer == "full") or "rded" in cfg.student.label_sources


def last_epoch(cfg) -> int:
    """The teacher run's last epoch: the last kept weak teacher, or teachers.epochs for a full observer."""
    last = max(cfg.teachers.keep_epochs)
    if trains_full(cfg):
        if cfg.teachers.epochs < last:
            raise HelloError(f"a fully trained network (select.observer: full, or the rded label source) trains the "
                             f"teachers to teachers.epochs ({cfg.teachers.epochs}), "
                             f"which is before the last weak teacher (epoch {last}); raise teachers.epochs")
        last = cfg.teachers.epochs
    return last


def _identity(cfg, unit) -> tuple[str, ...]:
    return ("full observer",) if trains_full(cfg) else ()  # the run then goes on to teachers.epochs


STAGE = Stage(NAME, options=("data", "teachers"), run=train_teachers, identity=_identity)
