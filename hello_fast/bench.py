"""`hello-fast bench student-loop`: images per second of the student loop with each way of getting labels.

Loops, all training the same student on the same resident set of distilled images:
- fast: this package's loop (resident uint8 set, one augment_mix call for both views, merged bf16
  channels-last Relabeler, fused soft_label_loss, bf16 autocast + channels-last student on a GPU);
- fast_teacher: the same loop labelled by one online ResNet-18 teacher (RDED's scheme, made fast);
- naive: the plain-PyTorch HeLlO loop: torchvision augmentation on the CPU in DataLoader workers,
  fp32 unmerged projector, CutMix as a separate pass, normalisation per view, unfused loss;
- rded_teacher: the RDED-style loop: torchvision on the CPU, an online fp32 ResNet-18 teacher;
- stored: SRe2L-style labels read from disk every batch (augmentation replayed from stored params);
- floor: labels precomputed in memory, batches pre-made: the student step alone.
`labeling_overhead` = (fast step - floor step) / projector forward (the Relabeler alone at that
batch): 1.0 means labeling costs exactly the projector's forward, nothing more.
Each loop builds its own labeler from the same unmerged fp32 projector (`_Setup.labeler`): the
Relabeler merges and casts a copy, so the naive loop really runs the unmerged fp32 projector.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from hello_fast import _progress, labels
from hello_fast._progress import log
from hello_fast.config import load_config
from hello_fast.data import schedule
from hello_fast.data.resident import Batch, ResidentSet
from hello_fast.data.spec import AugmentRecipe
from hello_fast.models.clip import load_clip
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD, build_model
from hello_fast.ops.augment_mix import cutmix_box
from hello_fast.projector.model import build_projector
from hello_fast.stages import student as st


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, steps: int, device, warmup: int = 2) -> float:
    """Median seconds per step after warm-up."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


class _Setup:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.C = args.classes
        g = torch.Generator().manual_seed(0)
        n = max(2 * args.batch, 64)
        src_res = int(args.res * 8 / 7)  # distilled images a bit larger than the crops
        self.images = torch.randint(0, 256, (n, 3, src_res, src_res), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, self.C, (n,), generator=g)
        recipe = AugmentRecipe.from_config(load_config("digits", [f"data.image_size={args.res}", "data.flip=true"]))
        self.resident = ResidentSet(self.images, self.labels, self.device, recipe, seed=1)
        backbone = load_clip(args.projector, None, 0)
        head = F.normalize(torch.randn(self.C, backbone.model.visual.output_dim, generator=g), dim=-1)
        self.projector = build_projector(backbone, [f"c{i}" for i in range(self.C)], ["{}"], conv_rank=args.conv_rank,
                                         head_rank=args.head_rank, head_weight=head)
        for _, m in self.projector.lora_modules():
            with torch.no_grad():
                m.lora_b.normal_(std=0.01, generator=g)
        self.meta = {"class_names": [f"c{i}" for i in range(self.C)], "image_size": backbone.image_size,
                     "mean": list(backbone.mean), "std": list(backbone.std)}
        self.width = args.width if args.student == "resnet18" else None

    def labeler(self, kind: str):
        """A labeler of its own for one loop, built from the unmerged fp32 projector (never changed).

        `fast`: a merged (bf16 + channels-last on a GPU) Relabeler; `naive`: the plain projector,
        unmerged, fp32; `teacher`: a fresh ResNet-18.
        """
        if kind == "fast":
            return labels.ProjectorLabels(self.projector, self.meta, 0, device=self.device, fast=True, capture=self.args.capture)
        if kind == "naive":
            projector = copy.deepcopy(self.projector).to(self.device, torch.float32).eval()
            if any(m.merged for _, m in projector.lora_modules()):
                raise RuntimeError("bench: the naive loop's projector must be unmerged")
            return projector
        if kind == "teacher":
            return build_model("resnet18", self.C, self.args.res, self.width).to(self.device)
        raise ValueError(kind)

    def student(self, fast: bool):
        torch.manual_seed(0)
        model = build_model(self.args.student, self.C, self.args.res, self.width).to(self.device)
        if fast and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model


def _bench_config(s: _Setup):
    return load_config("digits", [f"student.batch_size={s.args.batch}", f"data.image_size={s.args.res}", "data.flip=true",
                                  "student.loss=mse", "student.beta=0.1", "student.epochs=1"])


def _fast_loop(s: _Setup, source, steps: int) -> float:
    """The product's student step (stages.student's engine) on the product's batches (EpochBatches)."""
    cfg = _bench_config(s)
    views = schedule.views_for(source, s.device, True)
    model = s.student(True)
    engine = st.student_engine(cfg, model, source, s.device, fast=True, steps_per_epoch=s.resident.steps_per_epoch(s.args.batch))
    use_amp = s.device.type == "cuda"
    _progress.set_enabled(False)
    stream = iter(())

    def next_item():
        nonlocal stream
        item = next(stream, None)
        if item is None:
            stream = iter(st.EpochBatches(cfg, s.resident, source, views, 1, True, s.device, overlap=use_amp))
            item = next(stream)
        return item

    return _time_steps(lambda: engine.step(next_item()), steps, s.device)


def _floor(s: _Setup, source, steps: int) -> float:
    """The same engine step alone (`source`'s loss): one batch and its labels made beforehand, held in memory."""
    cfg = _bench_config(s)
    engine = st.student_engine(cfg, s.student(True), source, s.device, fast=True, steps_per_epoch=1)
    use_amp = s.device.type == "cuda"
    B, R = s.args.batch, s.args.res
    dtype = torch.bfloat16 if use_amp else torch.float32
    fmt = torch.channels_last if use_amp else torch.contiguous_format
    batch = Batch(views=[torch.randn(B, 3, R, R, device=s.device, dtype=dtype).contiguous(memory_format=fmt)],
                           hard=torch.randint(0, s.C, (B,), device=s.device), partner=torch.randperm(B, device=s.device),
                  lam=torch.rand(B, device=s.device), index=torch.arange(B), params={})
    item = (batch, torch.randn(B, s.C, device=s.device))
    return _time_steps(lambda: engine.step(item), steps, s.device)


class _CpuAugmented(torch.utils.data.Dataset):
    """The peers' data path: torchvision RandomResizedCrop + flip per image on the CPU."""

    def __init__(self, images, labels, res, normalize_for):
        self.images, self.labels = images, labels
        self.tf = v2.Compose([v2.RandomResizedCrop(res, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                              v2.ToDtype(torch.float32, scale=True)])
        self.normalize_for = normalize_for

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.tf(self.images[i])
        return [((x - torch.tensor(m).view(3, 1, 1)) / torch.tensor(sd).view(3, 1, 1)) for m, sd in self.normalize_for], self.labels[i]


def _cpu_loop(s: _Setup, labeler: str, steps: int) -> float:
    """naive (unmerged fp32 projector) or rded_teacher (fp32 ResNet-18): CPU augmentation, fp32 everything."""
    norms = [(IMAGENET_MEAN, IMAGENET_STD)]
    if labeler == "projector":
        norms.append((tuple(s.meta["mean"]), tuple(s.meta["std"])))
        teacher = s.labeler("naive")
    else:
        teacher = s.labeler("teacher").eval()
    workers = max(1, min(16, os.cpu_count() or 1))
    loader = torch.utils.data.DataLoader(_CpuAugmented(s.images, s.labels, s.args.res, norms), batch_size=s.args.batch,
                                         shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True,
                                         pin_memory=s.device.type == "cuda")
    model = s.student(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # the peers' loop: its own optimiser
    it = iter(())

    def step():
        nonlocal it
        item = next(it, None)
        if item is None:
            it = iter(loader)
            item = next(it)
        views, hard = item
        views = [v.to(s.device, non_blocking=True) for v in views]
        hard = hard.to(s.device)
        B = hard.shape[0]
        lam = float(torch.distributions.Beta(1.0, 1.0).sample())
        perm = torch.randperm(B, device=s.device)
        cut = int(s.args.res * (1 - lam) ** 0.5)
        cy, cx = torch.randint(0, s.args.res, (2,))
        y0, x0, y1, x1 = (int(v) for v in cutmix_box(cy, cx, torch.tensor(cut), s.args.res))
        for v in views:  # CutMix as a separate pass per view
            v[:, :, y0:y1, x0:x1] = v[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / s.args.res**2
        with torch.no_grad():
            target = teacher(views[-1] if labeler == "projector" else views[0]).float()
        logits = model(views[0])
        loss = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(target / 4, 1), reduction="batchmean")
        loss = loss + 0.1 * (lam * F.cross_entropy(logits, hard) + (1 - lam) * F.cross_entropy(logits, hard[perm]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        return _time_steps(step, steps, s.device, warmup=3)
    finally:
        it = loader = None  # drops the iterator and the DataLoader: its workers shut down


def run(args) -> dict:
    s = _Setup(args)
    log(f"bench student-loop: {args.student} student, {args.projector} projector, batch {args.batch}, {args.res} px, on {s.device}")
    step_s = {}
    relabel = s.labeler("fast")
    step_s["fast"] = _fast_loop(s, relabel, args.steps)
    step_s["fast_teacher"] = _fast_loop(s, labels.TeacherLabels([s.labeler("teacher")], 0, fast=True), args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("digits", [f"student.batch_size={args.batch}", f"data.image_size={args.res}", "data.flip=true",
                                     "student.epochs=1"])
        s.resident.generator.manual_seed(1)
        writer = s.labeler("fast")
        stored = labels.StoredLabels.write(tmp, s.resident, writer, labels.stored_description("stored", cfg, len(s.resident)),
                                           views=schedule.views_for(writer, s.device, True))
        step_s["stored"] = _fast_loop(s, stored, args.steps)
    step_s["floor"] = _floor(s, relabel, args.steps)
    step_s["naive"] = _cpu_loop(s, "projector", args.steps)
    step_s["rded_teacher"] = _cpu_loop(s, "teacher", args.steps)
    clip_view = torch.randn(args.batch, 3, relabel.relabel.image_size, relabel.relabel.image_size, device=s.device)
    projector_ms = _time_steps(lambda: relabel.relabel(clip_view), args.steps, s.device) * 1e3
    loops = {k: {"step_ms": round(v * 1e3, 3), "img_per_s": round(args.batch / v, 1)} for k, v in step_s.items()}
    overhead = (step_s["fast"] - step_s["floor"]) * 1e3 / projector_ms
    result = {
        "benchmark": "student_loop",
        "device": s.device.type,
        "device_name": torch.cuda.get_device_name() if s.device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": round(os.getloadavg()[0], 2),  # a shared machine's timings mean little when this is high
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "out")},
        "labelers": {"fast": "merged Relabeler (its own copy of the projector; bf16 channels-last on a GPU)",
                     "naive": "the unmerged fp32 projector (its own copy)", "stored": "a merged Relabeler of its own",
                     "fast_teacher": "a ResNet-18 of its own", "rded_teacher": "a ResNet-18 of its own, fp32"},
        "loops": loops,
        "projector_forward_ms": round(projector_ms, 3),
        "labeling_overhead": round(overhead, 3),
        "ratios": {
            "fast_over_naive": round(loops["fast"]["img_per_s"] / loops["naive"]["img_per_s"], 2),
            "fast_teacher_over_rded_teacher": round(loops["fast_teacher"]["img_per_s"] / loops["rded_teacher"]["img_per_s"], 2),
        },
        "goals_h200": {"fast_over_naive_min": 3.0, "labeling_overhead_max": 1.10, "fast_teacher_over_rded_teacher_min": 2.0},
    }
    return result


def main_bench(args) -> int:
    if args.quick:
        args.student, args.projector, args.batch, args.res, args.classes = "resnet18", "hello-tiny-rn", 32, 32, 10
        args.steps, args.width, args.head_rank, args.conv_rank = min(args.steps, 4), 16, 8, 4
    result = run(args)
    out = args.out or (os.path.join("benchmarks", "results") if os.path.isdir(os.path.join("benchmarks", "results")) else ".")
    os.makedirs(out, exist_ok=True)
    name = f"student_loop_{result['device']}{'_quick' if args.quick else ''}.json"
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for k, v in result["loops"].items():
        print(f"{k:<14} {v['img_per_s']:>10,.1f} img/s  ({v['step_ms']:.2f} ms/step)")
    print(f"projector forward {result['projector_forward_ms']:.2f} ms; labeling overhead {result['labeling_overhead']:.2f}x "
          f"the projector's forward; fast/naive {result['ratios']['fast_over_naive']:.2f}x")
    print(f"wrote {path}")
    return 0
