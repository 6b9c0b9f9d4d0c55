"""Label sources for the student loop, behind one interface: soft labels (or none) for each augmented batch.

- `hard`: no soft labels; the loss is the mixed one-hot cross-entropy;
- `teacher`: the weak teachers' averaged logits, online (RDED's scheme with HeLlO's weak teachers);
- `projector`: the label artifact's projector through a Relabeler, online (HeLlO);
- `stored`: SRe2L-style soft labels, written once for the whole schedule (fp16 logits and the
  augmentation parameters of every batch of every epoch) and read back per batch. Replay only
  works for the exact schedule they were written for (seed, epochs, batch size, image count,
  resolution, mixing), which is checked: a mismatch is an error, not silently wrong labels.
"""
from __future__ import annotations

import json
import os

import torch

from hello_fast.errors import HelloError

SOURCES = ("hard", "teacher", "projector", "stored")


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
            out = self.teachers[0](x).float()
            for t in self.teachers[1:]:
                out += t(x).float()
        return out / len(self.teachers)


class ProjectorLabels(LabelSource):
    """Online labels from a projector: a merged, bf16, channels-last Relabeler (fast) or the unmerged fp32 projector."""

    name = "projector"
    needs_clip_view = True

    def __init__(self, projector, meta: dict, label_bytes: int, *, device, fast: bool = True, capture: bool = False):
        from hello_fast.relabel import Relabeler

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
            p = {k: data[f"{step}.{k}"].to(self.device) for k in ("crop", "flip", "partner", "lam", "cut")}
            yield data[f"{step}.index"].to(self.device), p, data[f"{step}.logits"].to(self.device).float()

    def __call__(self, batch):
        return batch.stored_logits

    @classmethod
    def write(cls, directory: str, resident, labeler: LabelSource, schedule: dict, *, out_size: int, scale, flip: bool,
              mix: str, alpha: float, views, progress=None) -> "StoredLabels":
        """Draw the whole schedule's batches once, label them with `labeler`, and store params + fp16 logits.

        `resident` must be in the state the training loop will start from (same seed), so replay
        gives the training loop exactly these batches.
        """
        from safetensors.torch import save_file

        from hello_fast._io import atomic_path, write_json

        os.makedirs(directory, exist_ok=True)
        epochs = range(1, schedule["epochs"] + 1)
        for epoch in (progress(epochs, desc="stored labels", unit="epoch") if progress else epochs):
            tensors = {}
            order = resident.epoch_order(schedule["batch_size"])
            for step, index in enumerate(order):
                params = resident.draw(index, out_size=out_size, scale=scale, flip=flip, mix=mix, alpha=alpha)
                batch = resident.make(index, params, out_size=out_size, mix=mix, views=views)
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
