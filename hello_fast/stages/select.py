"""Stage 1: the distilled images. RDED patch selection with an observer (HeLlO Sec. 3.4, Eq. 6), or a random real subset.

RDED (Sun et al., LINs-lab/RDED): per class, sample `candidates_per_class` real images; take
`crops_per_image` random-resized crops of each at 1/factor resolution (aspect ratio 1); score each
crop, zero-padded to full size, by the observer's cross-entropy with the image's class; keep each
image's best crop, then the class's ipc * factor^2 lowest-CE crops, and tile them factor x factor
into ipc images, interleaved as RDED's `mix_images` does (image i gets difficulty ranks i, ipc+i,
2*ipc+i, ...; `select.tiling: consecutive` puts consecutive ranks in one image instead). `random`
keeps ipc random real images per class ("A Label is Worth a Thousand Images": a random subset with
good soft labels is a strong baseline).

The observer (`select.observer`): `teacher` / `last_weak`, the last weak teacher; `full`, the teacher
run trained on to `teachers.epochs` (RDED observes with a fully trained ResNet-18: torchvision's
ImageNet weights); `projector`, the label artifact's projector; or a path to your own checkpoint
of `teachers.arch` for the data's classes: a torchvision-style state dict (`.pth`/`.pt`/`.bin`, read
with weights_only=True, also wrapped in {"state_dict": ...} with DDP's `module.` prefix, as
PyTorch's ImageNet example saves it) or `.safetensors` (plain, or a hello_fast network file).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from hello_fast._io import file_sha256, read_state_dict
from hello_fast._progress import log, progress
from hello_fast._util import Normalize, load_network
from hello_fast.config import is_checkpoint_path
from hello_fast.data.distilled import save_distilled
from hello_fast.data.loader import batches, eval_transform, resolve_loader
from hello_fast.data.spec import DataPass
from hello_fast.errors import HelloError
from hello_fast.layout import artifact_path, observer_path
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD, build_model
from hello_fast.projector.artifact import load_projector
from hello_fast.stages.contract import Stage, StageInputs

NAME = "select"


# the crops' generator of image i is the loader's of (seed, _CROPS_EPOCH, i): apart from every training epoch
_CROPS_EPOCH = -7


def crops_pass(cfg, train_set) -> DataPass:
    """RDED's scoring pass: square random-resized crops (ratio 1, select.crop_scale, no flip) at 1/factor of the
    image size, read by the torch loader: DALI's reader yields one crop per image read, and selection takes
    select.crops_per_image crops of each image from one generator."""
    sc = cfg.select
    data_pass = dataclasses.replace(DataPass.from_config(cfg), image_size=cfg.data.image_size // sc.factor,
                                    scale=tuple(sc.crop_scale), ratio=(1.0, 1.0), flip=False, loader="torch")
    if resolve_loader(cfg.data.loader, train_set) == "dali":
        log(f"select: scoring {sc.crops_per_image} crops per image with the torch loader (DALI draws one crop per read)")
    return data_pass


def _candidates(labels: torch.Tensor, num_classes: int, per_class: int, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero()[:, 0]
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return out


class Observer:
    """Scores crops by cross-entropy: a teacher network (ImageNet normalisation) or the projector (CLIP's)."""

    def __init__(self, model, normalize, size):
        self.model, self.normalize, self.size = model, normalize, size

    @torch.no_grad()
    def cross_entropy(self, crops_uint8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(crops_uint8)  # (N, 3, s, s) normalised
        s = x.shape[-1]
        pad_total = self.size - s
        if pad_total > 0:  # zero-pad (the mean colour after normalisation) to full size, centred
            lo = pad_total // 2
            x = F.pad(x, (lo, pad_total - lo, lo, pad_total - lo))
        return F.cross_entropy(self.model(x).float(), labels, reduction="none")


def teacher_observer(path: str, device, image_size: int) -> Observer:
    model, _ = load_network(path, device)
    return Observer(model, Normalize(IMAGENET_MEAN, IMAGENET_STD), image_size)


def checkpoint_observer(path: str, cfg, num_classes: int, device) -> Observer:
    """Your own network as the observer: a teachers.arch checkpoint for the data's classes (ImageNet normalisation)."""
    if not os.path.isfile(path):
        raise HelloError(f"observer checkpoint {path} does not exist (select.observer names a file)")
    state, meta = read_state_dict(path, "observer checkpoint")
    tc = cfg.teachers
    if "arch" in meta:  # a network this package saved: it says what it is
        model, meta = load_network(path, device)
        if meta["num_classes"] != num_classes:
            raise HelloError(f"observer checkpoint {path} has {meta['num_classes']} outputs but the data has {num_classes} classes")
        return Observer(model, Normalize(IMAGENET_MEAN, IMAGENET_STD), cfg.data.image_size)
    model = build_model(tc.arch, num_classes, cfg.data.image_size, tc.width if tc.arch == "resnet18" else None)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HelloError(f"observer checkpoint {path} is not a {tc.arch} state dict as torchvision names it: "
                         f"{len(missing)} missing (e.g. {', '.join(missing[:2]) or '-'}), {len(unexpected)} unexpected "
                         f"(e.g. {', '.join(unexpected[:2]) or '-'})")
    for key, t in expected.items():
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != tuple(t.shape):
            shape = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            hint = f" (the data has {num_classes} classes)" if key.endswith("weight") and t.dim() == 2 else ""
            raise HelloError(f"observer checkpoint {path}: {key} is {shape}, {tc.arch} at {cfg.data.image_size} px needs "
                             f"{tuple(t.shape)}{hint}")
    model.load_state_dict(state)
    return Observer(model.to(device).eval(), Normalize(IMAGENET_MEAN, IMAGENET_STD), cfg.data.image_size)


def make_observer(cfg, run, device, num_classes: int) -> Observer | None:
    """The RDED observer `select.observer` names (None for random selection)."""
    name = cfg.select.observer
    if cfg.select.method != "rded":
        return None
    if name in ("teacher", "last_weak", "full"):
        return teacher_observer(observer_path(run, full=name == "full"), device, cfg.data.image_size)
    if name == "projector":
        projector, _ = load_projector(artifact_path(run), device=device)
        return projector_observer(projector, cfg.data.image_size)
    return checkpoint_observer(name, cfg, num_classes, device)


def projector_observer(projector, image_size: int) -> Observer:
    def normalize(images):
        x = images.float() / 255.0
        scale = projector.image_size / image_size  # crops are 1/factor of the data size: keep that share of CLIP's
        if projector.image_size != image_size:
            size = max(1, int(round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - projector.mean) / projector.std

    return Observer(projector, normalize, projector.image_size)


def rded_select(cfg, train_set, observer: Observer, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Distilled images uint8 (C*ipc, 3, S, S), their labels, and selection statistics."""
    sc = cfg.select
    S = cfg.data.image_size
    f = sc.factor
    patch = S // f
    if patch < 1:
        raise ValueError(f"select.factor {f} is larger than the image size {S}")
    need = sc.ipc * f * f
    g = torch.Generator().manual_seed(cfg.seed)
    per_class = _candidates(train_set.labels, train_set.num_classes, sc.candidates_per_class, g)
    order = torch.cat(per_class).tolist()
    loader = batches(train_set, crops_pass(cfg, train_set), train=True, batch_size=max(1, sc.batch_size // sc.crops_per_image),
                     seed=cfg.seed, epoch=_CROPS_EPOCH, shuffle=False, indices=order, crops=sc.crops_per_image)
    crops_of, ce_of = {}, {}
    for crops, _, idx in progress(loader, desc="select: scoring crops", unit="batch"):
        n, k = len(idx), sc.crops_per_image
        crops = crops.view(n, k, 3, patch, patch)
        labels = train_set.labels[idx].repeat_interleave(k).to(device)
        ce = observer.cross_entropy(crops.flatten(0, 1).to(device), labels).view(n, k).cpu()
        for j, i in enumerate(idx.tolist()):
            crops_of[i], ce_of[i] = crops[j], ce[j]
    images, labels, mean_ce = [], [], []
    for c, cand in enumerate(per_class):
        cand = [i for i in cand.tolist() if i in crops_of]
        if not cand:
            raise ValueError(f"select: class {train_set.class_names[c]!r} has no readable images")
        # each image's best crop first (by CE), then the remaining crops by CE, as needed
        ranked = []
        for i in cand:
            ce_sorted, order_k = torch.sort(ce_of[i])
            for rank, (v, kk) in enumerate(zip(ce_sorted.tolist(), order_k.tolist())):
                ranked.append((rank > 0, v, i, kk))
        ranked.sort()
        chosen = ranked[:need]
        while len(chosen) < need:  # fewer crops than patches needed: repeat the best ones
            chosen += ranked[: need - len(chosen)]
        mean_ce.append(sum(v for _, v, _, _ in chosen) / need)
        tiles = tile_patches(torch.stack([crops_of[i][kk] for _, _, i, kk in chosen]), sc.ipc, f, sc.tiling)
        if f * patch != S:
            tiles = TF.resize(tiles, [S, S], antialias=True)
        images.append(tiles)
        labels += [c] * sc.ipc
    stats = {"mean_selected_ce": sum(mean_ce) / len(mean_ce), "scored_images": len(crops_of)}
    return torch.cat(images), torch.tensor(labels), stats


def tile_patches(patches: torch.Tensor, ipc: int, factor: int, tiling: str = "interleave") -> torch.Tensor:
    """ipc images (ipc, 3, f*p, f*p) tiled from patches (ipc*f*f, 3, p, p) given in difficulty rank order.

    interleave (RDED's mix_images): image i holds ranks i, ipc+i, 2*ipc+i, ..., rank k*ipc+i in grid
    cell k (row-major), so every image mixes easy and hard patches; consecutive: image i holds ranks
    i*f*f .. (i+1)*f*f - 1 (this package's rule before 2026-12: the easiest patches share image 0).
    """
    n, c, p, _ = patches.shape
    if n != ipc * factor * factor:
        raise ValueError(f"tile_patches: {n} patches for {ipc} images of {factor}x{factor}")
    if tiling == "interleave":
        grid = patches.view(factor, factor, ipc, c, p, p).permute(2, 3, 0, 4, 1, 5)
    elif tiling == "consecutive":
        grid = patches.view(ipc, factor, factor, c, p, p).permute(0, 3, 1, 4, 2, 5)
    else:
        raise ValueError(f"tile_patches: tiling must be interleave or consecutive, got {tiling!r}")
    return grid.reshape(ipc, c, factor * p, factor * p)


def random_select(cfg, train_set) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(cfg.seed)
    images, labels = [], []
    for c, cand in enumerate(_candidates(train_set.labels, train_set.num_classes, 10**9, g)):
        taken = 0
        for i in cand.tolist():
            img = train_set.load(i)
            if img is None:
                continue
            images.append(eval_transform(img, cfg.data.image_size, cfg.data.eval_resize))
            labels.append(c)
            taken += 1
            if taken == cfg.select.ipc:
                break
        if taken < cfg.select.ipc:
            log(f"select: class {train_set.class_names[c]!r} has only {taken} readable images (< ipc {cfg.select.ipc})")
    return torch.stack(images), torch.tensor(labels), {}


def select_images(inputs: StageInputs, out: str) -> dict:
    """Run the selection and write the distilled set into `out`. Returns the stage summary."""
    cfg = inputs.cfg
    train_set, _ = inputs.data()
    summary = {"method": cfg.select.method}
    if cfg.select.method == "rded":
        observer = make_observer(cfg, inputs.run, inputs.device, train_set.num_classes)
        images, labels, stats = rded_select(cfg, train_set, observer, inputs.device)
    else:
        images, labels, stats = random_select(cfg, train_set)
    summary.update(stats)
    summary["images"] = int(labels.numel())
    save_distilled(out, images, labels, train_set.class_names,
                   {"method": cfg.select.method, "ipc": cfg.select.ipc, "factor": cfg.select.factor})
    log(f"select: {labels.numel()} distilled images ({cfg.select.method}, ipc {cfg.select.ipc})")
    return summary


def _reads(cfg, unit) -> tuple[str, ...]:
    """The observer's stage: none for random selection or a checkpoint file."""
    if cfg.select.method == "random" or is_checkpoint_path(cfg.select.observer):
        return ()
    return ("projector",) if cfg.select.observer == "projector" else ("teachers",)


def _identity(cfg, unit) -> tuple[str, ...]:
    if cfg.select.method == "rded" and is_checkpoint_path(cfg.select.observer):
        return (file_sha256(cfg.select.observer, "observer checkpoint (select.observer names a file)"),)
    return ()


STAGE = Stage(NAME, options=("data", "select"), run=select_images, reads=_reads, identity=_identity, collective=False)
