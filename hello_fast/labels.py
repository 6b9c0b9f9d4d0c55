"""Label sources for the student loop, behind one interface: soft labels (or none) for each augmented batch.

- `hard`: no soft labels; the loss is the mixed one-hot cross-entropy;
- `teacher`: the weak teachers' averaged logits, online (RDED's scheme with HeLlO's weak teachers);
- `rded`: RDED's own scheme (Sun et al., LINs-lab/RDED validation/main.py): the fully trained teacher
  labels each batch online and the student learns by KL at temperature 20 on CutMix batches (4 on
  Mixup batches), with no hard-label term, whatever student.loss says;
- `projector`: the label artifact's projector through a Relabeler, online (HeLlO);
- `stored`: SRe2L-style soft labels, written once for the whole schedule (fp16 logits and the
  augmentation parameters of every batch of every epoch) and read back per batch. Replay only
  works for the exact schedule they were written for (the students' AugmentRecipe, seed, epochs,
  batch size, image count, ranks: hello_fast.data.schedule.schedule_of), which is checked: a
  mismatch is an error, not silently wrong labels;
- the compression baselines, stored labels written smaller (each decodes to float logits):
  `stored_int8` / `stored_int4`: symmetric per-crop quantisation (one fp32 scale per crop,
  scale = max|logit| / 127 or / 7; int4 packed two to a byte); `stored_topk` (FKD/LPQLD): the
  student.stored_topk largest logits per crop (fp16) with their class indices (int16) and one fp16
  fill logit that every other class gets, chosen so that softmax (T=1) gives the dropped classes
  together the probability they had; `stored_pool` (LPLD, Xiao & He 2024): a random
  student.stored_pool_fraction of the schedule's batches is labelled and kept (fp16), and every
  epoch replays its steps drawn from that pool, so each label is used with its own crops.

A source's `label_bytes` is what it ships beside the images: the network or artifact file, or for
stored labels the bytes of every stored tensor (labels, their scales and indices, and the replayed
augmentation parameters; file headers not counted).
"""
from __future__ import annotations

import json
import math
import os

import torch

from hello_fast import distributed
from hello_fast._io import atomic_path, write_json
from hello_fast._progress import log, progress
from hello_fast._util import load_network
from hello_fast.data.schedule import resident_set, schedule_of, views_for
from hello_fast.errors import HelloError
from hello_fast.layout import artifact_path, load_teachers, observer_path
from hello_fast.models.students import mean_teacher_logits
from hello_fast.projector.artifact import load_projector
from hello_fast.relabel import Relabeler
from hello_fast.storage import network_bytes


class LabelSource:
    name = "hard"
    needs_clip_view = False
    replays = False  # True: the source dictates each batch's images (stored labels)
    label_bytes = 0
    # the source's own loss (RDED's KL at its temperature); None: the student's settings
    loss: str | None = None
    temperature: float | None = None
    beta: float | None = None

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


# RDED's temperature per mix (LINs-lab/RDED argument.py): 20 with CutMix, 4 with Mixup
RDED_TEMPERATURE = {"cutmix": 20.0, "mixup": 4.0, "none": 20.0}


class RdedLabels(TeacherLabels):
    """RDED's online labels: its fully trained teacher on each augmented batch, learned by KL at RDED's temperature."""

    name = "rded"
    loss = "kl"
    beta = 0.0  # RDED's student loss is the KL alone

    def __init__(self, teacher, mix: str, *, fast: bool = True):
        super().__init__([teacher], network_bytes(teacher), fast=fast)
        self.temperature = RDED_TEMPERATURE[mix]


def loss_settings(source: LabelSource, sc) -> dict:
    """The soft_label_loss settings for a student of `source`: the source's own (rded), else student.loss,
    student.temperature and student.beta (hard labels: the CE alone, beta 1)."""
    if source.name == "hard":
        beta = 1.0
    else:
        beta = sc.beta if source.beta is None else source.beta
    return {"mode": source.loss or sc.loss, "temperature": source.temperature or sc.temperature, "beta": beta}


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


# -- stored labels and their compressed forms ----------------------------------------------------

# the label sources that replay stored labels, and how each stores a crop's logits
STORED = {"stored": "fp16", "stored_int8": "int8", "stored_int4": "int4", "stored_topk": "topk", "stored_pool": "fp16"}
_BITS = {"int8": 8, "int4": 4}


def quantize_logits(logits: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation: (q, scale fp32 (B,)), scale = max|row| / (2^(bits-1) - 1), q = round(x / scale).

    int8: q is int8 (B, C); int4: q in [-7, 7] packed two to a byte, uint8 (B, ceil(C/2)), low nibble first.
    Dequantised entries are within scale / 2 of the input."""
    qmax = 2 ** (bits - 1) - 1
    x = logits.float()
    scale = x.abs().amax(1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(x / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    if bits == 8:
        return q, scale
    u = (q + 8).to(torch.uint8)  # 1..15
    if u.shape[1] % 2:
        u = torch.cat([u, torch.full_like(u[:, :1], 8)], 1)
    return u[:, 0::2] | (u[:, 1::2] << 4), scale


def dequantize_logits(q: torch.Tensor, scale: torch.Tensor, bits: int, num_classes: int) -> torch.Tensor:
    """Float logits (B, num_classes) from quantize_logits' (q, scale)."""
    if bits == 4:
        u = torch.stack([q & 15, q >> 4], 2).flatten(1)[:, :num_classes]
        q = u.to(torch.int8) - 8
    return q.float() * scale[:, None]


def top_k_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values fp16 (B, k), class indices int16 (B, k), fill fp16 (B,)): each row's k largest logits, and the
    logit each other class gets so that softmax (T=1) gives them together the probability they had."""
    x = logits.float()
    C = x.shape[1]
    if not 0 < k < C:
        raise HelloError(f"stored_topk: student.stored_topk must lie in [1, {C - 1}] for {C} classes, got {k}")
    if C > 2**15:
        raise HelloError(f"stored_topk: int16 class indices hold at most {2**15} classes, the labels have {C}")
    values, indices = x.topk(k, dim=1)
    dropped = x.scatter(1, indices, float("-inf"))
    fill = torch.logsumexp(dropped, 1) - math.log(C - k)
    return values.to(torch.float16), indices.to(torch.int16), fill.to(torch.float16)


def expand_top_k(values: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float logits (B, num_classes) from top_k_logits' output."""
    out = fill.float()[:, None].expand(-1, num_classes).clone()
    return out.scatter(1, indices.long(), values.float())


def _encode(logits: torch.Tensor, encoding: str, top_k: int | None) -> dict:
    if encoding == "fp16":
        return {"logits": logits.to(torch.float16)}
    if encoding in _BITS:
        q, scale = quantize_logits(logits, _BITS[encoding])
        return {"q": q, "scale": scale}
    values, indices, fill = top_k_logits(logits, top_k)
    return {"values": values, "indices": indices, "fill": fill}


def _decode(data: dict, key: str, encoding: str, num_classes: int) -> torch.Tensor:
    if encoding == "fp16":
        return data[f"{key}.logits"].float()
    if encoding in _BITS:
        return dequantize_logits(data[f"{key}.q"], data[f"{key}.scale"], _BITS[encoding], num_classes)
    return expand_top_k(data[f"{key}.values"], data[f"{key}.indices"], data[f"{key}.fill"], num_classes)


_PARAMS = ("crop", "flip", "partner", "lam", "cut", "shuffle")  # shuffle: only with ShufflePatches


class StoredLabels(LabelSource):
    """SRe2L-style stored soft labels (and their compressed forms): each batch's parameters and its encoded logits.

    The whole schedule: one file per epoch. A pool (stored_pool): one file of the kept batches; epoch e
    replays its steps drawn from the pool (a seeded permutation per epoch, cycled when the pool is
    smaller than an epoch), so every label comes with the crops it was made for.
    """

    replays = True
    INDEX = "stored_labels.json"
    POOL = "pool.safetensors"

    def __init__(self, directory: str, device):
        self.directory = directory
        self.device = torch.device(device)
        path = os.path.join(directory, self.INDEX)
        if not os.path.isfile(path):
            raise HelloError(f"{directory} holds no stored labels (no {self.INDEX})")
        with open(path) as f:
            self.index = json.load(f)
        if "schedule" not in self.index:
            raise HelloError(f"{directory} holds stored labels of an older format; rerun the student stage to rewrite them")
        self.schedule = self.index["schedule"]
        self.name = self.index["source"]
        self.encoding = self.index["encoding"]
        self.payload_bytes = self.index["payload_bytes"]  # the labels (logits, scales, indices)
        self.param_bytes = self.index["param_bytes"]  # the replayed batch indices and augmentation parameters
        self.label_bytes = self.payload_bytes + self.param_bytes
        self._pool = None

    @classmethod
    def complete(cls, directory: str, description: dict) -> bool:
        """Stored labels for exactly this description (source, encoding, schedule) are there (a resumed stage reuses them)."""
        path = os.path.join(directory, cls.INDEX)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            index = json.load(f)
        return all(index.get(k) == v for k, v in description.items())

    def check_schedule(self, schedule: dict) -> None:
        """Stored labels only fit the exact schedule they were written for."""
        diff = {k: (self.schedule.get(k), v) for k, v in schedule.items() if self.schedule.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise HelloError(f"the stored labels in {self.directory} were written for another schedule ({shown}); "
                             "rewrite them (rerun the stage) or restore the settings")

    def _steps(self, data: dict, keys):
        C = self.index["classes"]
        for key in keys:
            p = {k: data[f"{key}.{k}"].to(self.device) for k in _PARAMS if f"{key}.{k}" in data}
            logits = _decode(data, key, self.encoding, C).to(self.device)
            yield data[f"{key}.index"].to(self.device), p, logits

    def epoch(self, epoch: int):
        """(index, params, float logits) of each step of `epoch` (1-based), on the device."""
        from safetensors.torch import load_file

        if self.index["pool"] is None:
            data = load_file(os.path.join(self.directory, f"epoch_{epoch:04d}.safetensors"))
            yield from self._steps(data, range(int(data["steps"].item())))
            return
        if self._pool is None:
            self._pool = load_file(os.path.join(self.directory, self.POOL))
        yield from self._steps(self._pool, self.pool_order(epoch))

    def pool_order(self, epoch: int) -> list[int]:
        """The pool slots epoch `epoch` replays: a permutation of the pool per pass, seeded by (seed, epoch)."""
        kept, steps = self.index["pool"]["kept"], self.index["pool"]["steps_per_epoch"]
        g = torch.Generator().manual_seed(self.schedule["seed"] * 1_000_003 + epoch)
        order = []
        while len(order) < steps:
            order += torch.randperm(kept, generator=g).tolist()
        return order[:steps]

    def __call__(self, batch):
        return batch.stored_logits

    @classmethod
    def write(cls, directory: str, resident, labeler: LabelSource, description: dict, *, views,
              progress=None) -> "StoredLabels":
        """Draw the whole schedule's batches once by the resident set's AugmentRecipe, label them with `labeler`,
        and store params + encoded logits.

        `description`: {"source", "schedule", "encoding", "top_k", "pool_fraction"}. `resident` must be in
        the state the training loop will start from (same seed and recipe), so replay gives the training
        loop exactly these batches. A pool labels and keeps only its randomly chosen share of the batches.
        """
        from safetensors.torch import save_file

        schedule, encoding = description["schedule"], description["encoding"]
        os.makedirs(directory, exist_ok=True)
        steps_per_epoch = resident.steps_per_epoch(schedule["batch_size"])
        kept = None
        if description["pool_fraction"] is not None:
            total = schedule["epochs"] * steps_per_epoch
            n_keep = max(1, round(description["pool_fraction"] * total))
            g = torch.Generator().manual_seed(schedule["seed"])
            kept = {int(j): slot for slot, j in enumerate(sorted(torch.randperm(total, generator=g)[:n_keep].tolist()))}
        payload = params_bytes = 0
        classes = None
        pool = {}
        epochs = range(1, schedule["epochs"] + 1)
        for epoch in (progress(epochs, desc=f"stored labels ({description['source']})", unit="epoch") if progress else epochs):
            tensors = {}
            order = resident.epoch_order(schedule["batch_size"])
            for step, index in enumerate(order):
                params = resident.draw(index)
                if kept is not None:
                    slot = kept.get((epoch - 1) * steps_per_epoch + step)
                    if slot is None:
                        continue  # pruned: drawn (the stream stays the schedule's) but never labelled
                    key, target = str(slot), pool
                else:
                    key, target = str(step), tensors
                batch = resident.make(index, params, views=views)
                logits = labeler(batch)
                classes = logits.shape[1]
                stored = {"index": index, **params}
                for k, v in stored.items():
                    target[f"{key}.{k}"] = v.cpu().contiguous()
                    params_bytes += v.numel() * v.element_size()
                for k, v in _encode(logits, encoding, description["top_k"]).items():
                    target[f"{key}.{k}"] = v.cpu().contiguous()
                    payload += v.numel() * v.element_size()
            if kept is None:
                tensors["steps"] = torch.tensor(len(order))
                with atomic_path(os.path.join(directory, f"epoch_{epoch:04d}.safetensors")) as tmp:
                    save_file(tensors, tmp)
        if kept is not None:
            with atomic_path(os.path.join(directory, cls.POOL)) as tmp:
                save_file(pool, tmp)
        pool_info = None if kept is None else {"kept": len(kept), "steps_per_epoch": steps_per_epoch}
        write_json(os.path.join(directory, cls.INDEX), dict(description, classes=classes, pool=pool_info,
                                                            payload_bytes=payload, param_bytes=params_bytes))
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
        self.loss, self.temperature, self.beta = source.loss, source.temperature, source.beta  # rded's own loss

    def __getattr__(self, name):  # mean/std/dtype of a projector, epoch/check_schedule of stored labels
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __call__(self, batch):
        logits = self.source(batch)
        return None if logits is None else logits[:, self.classes.to(logits.device)]


def stored_description(source: str, cfg, num_images: int) -> dict:
    """What a stored-label source's files depend on: the source, its encoding and options, and the schedule."""
    sc = cfg.student
    return {"source": source, "schedule": schedule_of(cfg, num_images), "encoding": STORED[source],
            "top_k": sc.stored_topk if source == "stored_topk" else None,
            "pool_fraction": sc.stored_pool_fraction if source == "stored_pool" else None}


def label_source(source: str, cfg, run, distilled, out_dir: str, device, train_set) -> LabelSource:
    """The label source a student of `source` trains with, built from a run's finished stages.

    The stored sources label the whole schedule once with the weak teachers into `out_dir/labels`
    (SRe2L's scheme, or its compressed forms) and replay it; `rded` loads the teachers stage's fully
    trained network; `projector` loads `student.artifact` or the run's own artifact.
    """
    sc = cfg.student
    fast = sc.loop == "fast"
    device = torch.device(device)
    if source == "hard":
        return HardLabels(len(distilled))
    if source == "rded":
        teacher, _ = load_network(observer_path(run, full=True), device)
        return RdedLabels(teacher, sc.mix, fast=fast)
    if source == "teacher" or source in STORED:
        summary = run.done("teachers")["summary"]
        teachers = TeacherLabels(load_teachers(run, device), sum(summary["bytes"].values()), fast=fast)
        if source == "teacher":
            return teachers
        folder = os.path.join(out_dir, "labels")
        description = stored_description(source, cfg, len(distilled))
        if distributed.world().main and not StoredLabels.complete(folder, description):
            resident = resident_set(cfg, distilled, device)
            StoredLabels.write(folder, resident, teachers, description, views=views_for(teachers, device, fast),
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
