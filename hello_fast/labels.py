"""Label sources for the student loop, behind one interface: soft labels (or none) for each augmented batch.

- `hard`: no soft labels; the loss is the mixed one-hot cross-entropy;
- `teacher`: the weak teachers' averaged logits, online (RDED's scheme with HeLlO's weak teachers);
- `projector`: the label artifact's projector through a Relabeler, online (HeLlO);
- `stored`: SRe2L-style soft labels, written once for the whole schedule (fp16 logits and the
  augmentation parameters of every batch of every epoch) and read back per batch. Replay only
  works for the exact schedule they were written for (the students' AugmentRecipe, seed, epochs,
  batch size, image count, ranks: hello_fast.data.schedule.schedule_of), which is checked: a mismatch is an error, not silently wrong labels.
"""
from __future__ import annotations

import json
import os

import torch

from hello_fast import distributed
from hello_fast._io import atomic_path, write_json
from hello_fast._progress import log, progress
from hello_fast.errors import HelloError
from hello_fast.projector.artifact import load_projector
from hello_fast.relabel import Relabeler
from hello_fast.stages.projector import artifact_path
from hello_fast.data.schedule import resident_set, schedule_of, views_for
from hello_fast.stages.teachers import load_teachers, mean_teacher_logits


class LabelSource:
    name = "hard"
    needs_clip_view = False
    replays = False  # True: the source dictates each batch's images (stored labels)
    label_bytes = 0

    def __call__(self, batch):
        """Target logits (B, C) float32 for the batch's images, or None (hard labels only)."""
        return None


class HardLabels(LabelSource):
    def __init__(self, num_images: int):
        self.label_bytes = num_images * 8  # one int64 class index per distilled image


class TeacherLabels(LabelSource):
    name = "teacher"

    def __init__(self, teachers, label_bytes: int, *, fast: bool = True):
        self.teachers = [t.eval() for t in teachers]
        self.label_bytes = label_bytes
        self.device = next(self.teachers[0].parameters()).device
        self.fast = fast and self.device.type == "cuda"
        if self.fast:
            for t in self.teachers:
                t.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, batch):
        x = batch.views[0]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.fast):
            return mean_teacher_logits(self.teachers, x)


class ProjectorLabels(LabelSource):
    """Online labels from a projector: a merged, bf16, channels-last Relabeler (fast) or the unmerged fp32 projector."""

    name = "projector"
    needs_clip_view = True

    def __init__(self, projector, meta: dict, label_bytes: int, *, device, fast: bool = True, capture: bool = False):
        self.label_bytes = label_bytes
        self.fast = fast
        self.meta = meta
        if fast:
            self.relabel = Relabeler(projector, meta, device=device, capture=capture)
            self.mean, self.std = self.relabel.mean, self.relabel.std
            self.dtype = self.relabel.dtype
        else:
            self.projector = projector.to(device).eval()
            self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
            self.dtype = torch.float32

    @torch.no_grad()
    def __call__(self, batch):
        x = batch.views[1]
        if self.fast:
            return self.relabel(x)
        size = self.projector.image_size
        if size and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
        return self.projector(x.float()).float()


class StoredLabels(LabelSource):
    """SRe2L-style stored soft labels: per epoch a file of every batch's parameters and fp16 logits."""

    name = "stored"
    replays = True
    INDEX = "stored_labels.json"

    def __init__(self, directory: str, device):
        self.directory = directory
        self.device = torch.device(device)
        path = os.path.join(directory, self.INDEX)
        if not os.path.isfile(path):
            raise HelloError(f"{directory} holds no stored labels (no {self.INDEX})")
        with open(path) as f:
            self.schedule = json.load(f)
        self.label_bytes = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
                               if n.endswith(".safetensors"))

    @classmethod
    def complete(cls, directory: str, schedule: dict) -> bool:
        """Stored labels for exactly this schedule are already there (a resumed stage reuses them)."""
        path = os.path.join(directory, cls.INDEX)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            return json.load(f) == schedule

    def check_schedule(self, schedule: dict) -> None:
        """Stored labels only fit the exact schedule they were written for."""
        diff = {k: (self.schedule.get(k), v) for k, v in schedule.items() if self.schedule.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise HelloError(f"the stored labels in {self.directory} were written for another schedule ({shown}); "
                             "rewrite them (rerun the stage) or restore the settings")

    def epoch(self, epoch: int):
        """(index, params, logits) of each step of `epoch` (1-based), on the device."""
        from safetensors.torch import load_file

        data = load_file(os.path.join(self.directory, f"epoch_{epoch:04d}.safetensors"))
        for step in range(int(data["steps"].item())):
            p = {k: data[f"{step}.{k}"].to(self.device) for k in ("crop", "flip", "partner", "lam", "cut", "shuffle")
                 if f"{step}.{k}" in data}  # shuffle: only with ShufflePatches
            yield data[f"{step}.index"].to(self.device), p, data[f"{step}.logits"].to(self.device).float()

    def __call__(self, batch):
        return batch.stored_logits

    @classmethod
    def write(cls, directory: str, resident, labeler: LabelSource, schedule: dict, *, views,
              progress=None) -> "StoredLabels":
        """Draw the whole schedule's batches once by the resident set's AugmentRecipe, label them with `labeler`,
        and store params + fp16 logits.

        `resident` must be in the state the training loop will start from (same seed and recipe), so
        replay gives the training loop exactly these batches.
        """
        from safetensors.torch import save_file


        os.makedirs(directory, exist_ok=True)
        epochs = range(1, schedule["epochs"] + 1)
        for epoch in (progress(epochs, desc="stored labels", unit="epoch") if progress else epochs):
            tensors = {}
            order = resident.epoch_order(schedule["batch_size"])
            for step, index in enumerate(order):
                params = resident.draw(index)
                batch = resident.make(index, params, views=views)
                logits = labeler(batch)
                tensors[f"{step}.index"] = index.cpu()
                for k, v in params.items():
                    tensors[f"{step}.{k}"] = v.cpu().contiguous()
                tensors[f"{step}.logits"] = logits.to(torch.float16).cpu().contiguous()
            tensors["steps"] = torch.tensor(len(order))
            with atomic_path(os.path.join(directory, f"epoch_{epoch:04d}.safetensors")) as tmp:
                save_file(tensors, tmp)
        write_json(os.path.join(directory, cls.INDEX), schedule)
        return cls(directory, resident.device)


class RestrictedLabels(LabelSource):
    """Another source's labels for some classes only: its logits' columns of `classes`, in that order.

    A class-incremental step's student has one output per class seen so far (hello_fast/study.py): its
    soft labels are the full source's logits sliced to those classes (the softmax over them follows).
    Everything else (views, stored replay, label bytes) is the wrapped source's.
    """

    def __init__(self, source: LabelSource, classes: list[int]):
        self.source = source
        self.classes = torch.as_tensor(list(classes), dtype=torch.long)
        self.name, self.needs_clip_view, self.replays = source.name, source.needs_clip_view, source.replays
        self.label_bytes = source.label_bytes

    def __getattr__(self, name):  # mean/std/dtype of a projector, epoch/check_schedule of stored labels
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __call__(self, batch):
        logits = self.source(batch)
        return None if logits is None else logits[:, self.classes.to(logits.device)]


def label_source(source: str, cfg, run, distilled, out_dir: str, device, train_set) -> LabelSource:
    """The label source a student of `source` trains with, built from a run's finished stages.

    `stored` labels the whole schedule once with the weak teachers into `out_dir/labels` (SRe2L's
    scheme) and replays it; `projector` loads `student.artifact` or the run's own artifact.
    """
    sc = cfg.student
    fast = sc.loop == "fast"
    device = torch.device(device)
    if source == "hard":
        return HardLabels(len(distilled))
    if source in ("teacher", "stored"):
        summary = run.done("teachers")["summary"]
        teachers = TeacherLabels(load_teachers(run, device), sum(summary["bytes"].values()), fast=fast)
        if source == "teacher":
            return teachers
        folder = os.path.join(out_dir, "labels")
        schedule = schedule_of(cfg, len(distilled))
        if distributed.world().main and not StoredLabels.complete(folder, schedule):
            resident = resident_set(cfg, distilled, device)
            StoredLabels.write(folder, resident, teachers, schedule, views=views_for(teachers, device, fast),
                               progress=progress)
        distributed.barrier()
        return StoredLabels(folder, device)
    if source != "projector":
        raise HelloError(f"unknown label source {source!r}")
    path = sc.artifact or artifact_path(run)
    projector, meta = load_projector(path, num_classes=train_set.num_classes, device="cpu", clip_pretrained=sc.artifact_weights)
    if meta["class_names"] != train_set.class_names:
        log(f"student: note: {path} names its classes {meta['class_names'][:3]}..., the data {train_set.class_names[:3]}...; "
            "labels follow the artifact's class order")
    return ProjectorLabels(projector, meta, os.path.getsize(path), device=device, fast=fast, capture=sc.capture)
