"""Stage 4: train students on the distilled images with labels made online for every augmented batch (Alg. 1 l.12-15).

The fast loop (`student.loop: fast`): the distilled set is resident on the device as uint8; each
step draws crop/flip/mix parameters on the set's generator and one `augment_mix` call writes the
student's view and, for the projector, CLIP's view; the label source labels exactly those images
(a merged bf16 Relabeler, the weak teachers, or stored labels replayed); the fused
`soft_label_loss` (MSE + beta CE, the paper, or temperature KL + beta CE, the peers) trains the
student, in bf16 autocast and channels-last on a GPU. On a GPU the next batch and its labels can
be made on a side stream while the student steps (`student.overlap`: auto measures both ways on
the first steps and keeps the faster).

With `student.shuffle_patches` (RDED's recipe, on in the paper presets) each image is first cut
into select.factor row and column strips put in a random order, drawn per image and step and
folded into augment_mix's source coordinates (RDED: ShufflePatches before RandomResizedCrop).

The plain loop (`student.loop: plain`) draws the same parameters and runs the PyTorch references
(per-sample interpolate, unmerged fp32 projector, unfused loss) in fp32: the check that the fast
loop computes the same thing.
"""
from __future__ import annotations

import math
import os

import torch

from hello_fast import distributed, labels
from hello_fast._io import write_json
from hello_fast._progress import log
from hello_fast._util import Normalize, save_model
from hello_fast.data.dali import DaliDistilledSet
from hello_fast.data.distilled import load_distilled
from hello_fast.data.loader import batches
from hello_fast.data.schedule import (
    resident_seed,
    resident_set,
    schedule_of,
    views_for,
)
from hello_fast.data.spec import AugmentRecipe, DataPass
from hello_fast.engine import Engine, every
from hello_fast.layout import distilled_stage
from hello_fast.logs import TrainingLog
from hello_fast.models.students import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    decay_groups,
    learning_rate,
    top1,
)
from hello_fast.ops import soft_label_loss, soft_label_loss_reference
from hello_fast.projector.artifact import read_artifact
from hello_fast.stages.contract import Stage, StageInputs

NAME = "student"


def _lr_factor(schedule: str, step: int, total: int, epoch: int, epochs: int) -> float:
    if schedule == "rded":  # RDED's 0.5 * (1 + cos(pi * e / 2E)): falls only to half
        return 0.5 * (1 + math.cos(math.pi * epoch / (2 * epochs)))
    return 0.5 * (1 + math.cos(math.pi * step / total))


def training_set(cfg, distilled, device, source, views):
    """Where the loop's augmented batches come from: the resident set and augment_mix, or a DALI pipeline."""
    sc = cfg.student
    if sc.augment != "dali":
        return resident_set(cfg, distilled, device)
    if source.replays:
        log(f"student ({source.name}): stored labels replay exact crops; using the resident set, not DALI")
        return resident_set(cfg, distilled, device)

    return DaliDistilledSet(distilled.images, distilled.labels, device, AugmentRecipe.from_config(cfg), resident_seed(cfg),
                            batch_size=max(distributed.share_sizes(sc.batch_size)), views=views,
                            num_threads=DataPass.from_config(cfg).threads)


class EpochBatches:
    """The student's batches of one epoch with their labels, made one step ahead (on a side stream when overlapping):
    (AugmentedBatch, target logits or None) items, what student_loss takes."""

    def __init__(self, cfg, resident, source, views, epoch, fast, device, overlap: bool):
        sc = cfg.student
        self.cfg, self.resident, self.source, self.views, self.fast = cfg, resident, source, views, fast
        self.channels_last = fast and device.type == "cuda"
        self.backend = None if fast else "torch"
        if source.replays:
            self.plan = iter(source.epoch(epoch))
        else:
            self.plan = ((index, None, None) for index in resident.epoch_order(sc.batch_size))
        self.stream = torch.cuda.Stream(device) if (overlap and device.type == "cuda") else None
        self.ahead = self._make()

    def _make(self):
        item = next(self.plan, None)
        if item is None:
            return None
        index, params, stored = item
        if params is None:
            params = self.resident.draw(index)
        index, params, stored = self.resident.my_share(index, params, stored)
        batch = self.resident.make(index, params, views=self.views, channels_last=self.channels_last, backend=self.backend)
        batch.stored_logits = stored
        return batch, self.source(batch)

    def __iter__(self):
        main = torch.cuda.current_stream() if self.stream is not None else None
        while self.ahead is not None:
            current = self.ahead
            if self.stream is not None:
                main.wait_stream(self.stream)
                for t in (*current[0].views, current[0].lam, current[1]):
                    if t is not None:
                        t.record_stream(main)
                self.stream.wait_stream(main)
                with torch.cuda.stream(self.stream):
                    self.ahead = self._make()  # the next batch and its labels, while the student steps
            else:
                self.ahead = self._make()
            yield current


def student_loss(net, cfg, source, fast: bool, device):
    """The student's loss on one batch of `EpochBatches`: the fused soft_label_loss (the PyTorch reference when not
    `fast`) of the student's logits on the first view against the source's labels, in bf16 autocast on a GPU."""
    sc = cfg.student
    loss_fn = soft_label_loss if fast else soft_label_loss_reference
    use_amp = fast and device.type == "cuda"
    kwargs = labels.loss_settings(source, sc)  # rded brings its own (KL at T=20, no CE)

    def loss(item):
        batch, target = item
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = net(batch.views[0])
        return loss_fn(logits.float(), target, batch.hard, batch.partner, batch.lam, **kwargs), batch.hard.numel()

    return loss


def student_engine(cfg, student, source, device, *, fast: bool, steps_per_epoch: int, folder: str | None = None,
                   log=None, extra=None) -> Engine:
    """The engine that trains `student` with `source`'s labels: AdamW on decay groups, the recipe's lr schedule set
    per step, student_loss. `hello-fast bench student-loop` times this engine's step."""
    sc = cfg.student
    lr = learning_rate(sc.arch, sc.lr)
    opt = torch.optim.AdamW(decay_groups(student, sc.weight_decay, norms_and_biases=sc.decay_norms_and_biases), lr=lr)
    total = sc.epochs * steps_per_epoch
    engine = Engine(f"student ({source.name})", student, opt, device=device, epochs=sc.epochs, loss=None,
                    knob="student.lr", folder=folder, checkpoint_every=cfg.checkpoint_every, log=log, extra=extra,
                    lr_at=lambda step, epoch: lr * _lr_factor(sc.schedule, step, total, epoch - 1, sc.epochs))
    engine.loss = student_loss(engine.net, cfg, source, fast, device)
    return engine


def train_student(cfg, distilled, val_set, source, device, out_dir: str, *, loop: str | None = None,
                  log_root: str | None = None) -> dict:
    """Train one student with `source` labels; returns {top1_last, top1_best, label_bytes, history, ...}.

    Data-parallel under torchrun (each rank its share of every global batch); resumes from the last
    epoch checkpoint in `out_dir` when an interrupted run left one. `log_root`: the run directory whose
    logs/ receives the training log (None: only where `log_dir` is set).
    """
    sc = cfg.student
    loop = loop or sc.loop
    fast = loop == "fast"
    S = cfg.data.image_size
    main = distributed.world().main
    torch.manual_seed(cfg.seed)  # every label source starts from the same student, whoever calls this
    width = sc.width if sc.arch == "resnet18" else None
    student = build_model(sc.arch, distilled.num_classes, S, width).to(device)
    use_amp = fast and device.type == "cuda"
    if use_amp:
        student = student.to(memory_format=torch.channels_last)
    if sc.lr is None and main:
        log(f"student ({source.name}): lr {learning_rate(sc.arch, sc.lr):g} (RDED's rate for {sc.arch}; student.lr sets another)")
    views = views_for(source, device, fast)
    resident = training_set(cfg, distilled, device, source, views)
    if source.replays:
        source.check_schedule(schedule_of(cfg, len(resident)))
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val = batches(val_set, DataPass.from_config(cfg, sharded=True), train=False, batch_size=sc.eval_batch_size,
                  device=device)
    overlap = {"choice": {"on": True, "off": False}.get(sc.overlap)}  # None: measure (GPUs only)
    if device.type != "cuda":
        overlap["choice"] = False
    trial = {True: [], False: []}

    def put_overlap(value: int) -> None:
        if value >= 0:
            overlap["choice"] = bool(value)

    engine = student_engine(cfg, student, source, device, fast=fast, steps_per_epoch=resident.steps_per_epoch(sc.batch_size),
                            folder=out_dir,
                            log=lambda first: TrainingLog.for_stage(cfg, log_root, f"{NAME}/{source.name}", first_epoch=first),
                            extra={"resident_generator": (resident.generator.get_state, resident.generator.set_state),
                                   "overlap": (lambda: -1 if overlap["choice"] is None else int(overlap["choice"]), put_overlap)})

    def overlapped(epoch: int) -> bool:
        return overlap["choice"] if overlap["choice"] is not None else (epoch % 2 == 0)

    def epoch_batches(epoch):
        return EpochBatches(cfg, resident, source, views, epoch, fast, device, overlapped(epoch))

    def measure_overlap(epoch, _acc, seconds):
        if overlap["choice"] is None and 2 < epoch <= 4:  # epochs 1-2 warm up; 3-4 time both ways
            trial[overlapped(epoch)].append(seconds)
            if epoch == 4:
                overlap["choice"] = min(trial[True]) < min(trial[False])
                log(f"student ({source.name}): overlapped labeling {'is' if overlap['choice'] else 'is not'} faster here "
                    f"({min(trial[True]) * 1e3:.0f} vs {min(trial[False]) * 1e3:.0f} ms/epoch); keeping it "
                    f"{'on' if overlap['choice'] else 'off'}")

    def evaluate():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            return top1(engine.net, val, device, norm)

    engine.run(epoch_batches, evaluate=evaluate, evaluate_at=every(sc.eval_every, sc.epochs), after_epoch=measure_overlap)
    history = engine.history
    result = {
        "top1_last": history[-1]["top1"],
        "top1_best": max(h["top1"] for h in history),
        "label_bytes": int(source.label_bytes),
        "history": history,
        "loop": loop,
        "train_img_per_s": engine.images_per_second(),
    }
    if main:
        save_model(os.path.join(out_dir, "student.safetensors"), student,
                   {"arch": sc.arch, "num_classes": distilled.num_classes, "image_size": S, "width": width,
                    "label_source": source.name, "top1_last": result["top1_last"]})
        write_json(os.path.join(out_dir, "history.json"), history)
        log(f"student ({source.name}): top-1 last {result['top1_last']:.1f}%, best {result['top1_best']:.1f}% "
            f"({result['train_img_per_s']:.0f} img/s)")
    return result


def train_student_stage(inputs: StageInputs, out: str) -> dict:
    """One student (the unit's label source) on the finished distilled set; its files in `out`."""
    cfg = inputs.cfg
    distilled = load_distilled(inputs.run.path(distilled_stage(cfg)))
    train_set, val_set = inputs.data()
    labeler = labels.label_source(inputs.unit, cfg, inputs.run, distilled, out, inputs.device, train_set)
    return train_student(cfg, distilled, val_set, labeler, inputs.device, out, log_root=inputs.run.root)


def _reads(cfg, source) -> tuple[str, ...]:
    reads = [distilled_stage(cfg)]
    if source in ("teacher", "rded") or source in labels.STORED:
        reads.append("teachers")
    if source == "projector" and not cfg.student.artifact:
        reads.append("projector")
    return tuple(reads)


def _identity(cfg, source) -> tuple[str, ...]:
    """A student.artifact file enters by its tensors' hash and the backbone weights it is paired with; a
    compressed stored-label source by its own option."""
    if source == "projector" and cfg.student.artifact:
        _, meta = read_artifact(cfg.student.artifact)
        return (meta["tensors_sha256"], cfg.student.artifact_weights or "")
    if source == "stored_topk":
        return (f"top-k {cfg.student.stored_topk}",)
    if source == "stored_pool":
        return (f"pool {cfg.student.stored_pool_fraction!r}",)
    return ()


# One student (one label source) does not read the list of sources, nor another source's artifact or options.
STAGE = Stage(NAME, options=("data", "student", "-student.label_sources", "-student.artifact", "-student.artifact_weights",
                             "-student.stored_topk", "-student.stored_pool_fraction"),
              run=train_student_stage, reads=_reads, identity=_identity, units=lambda cfg: tuple(cfg.student.label_sources))
