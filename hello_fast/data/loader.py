"""Batches over an image set, for the passes over the original data (teachers, projector, selection, evaluation).

Training batches: RandomResizedCrop (torchvision's sampling rule) + horizontal flip, drawn from a
per-sample generator seeded by (seed, epoch, index), so the augmentation stream is the same for
any number of DataLoader workers or processes. Evaluation batches: resize the shorter side, then
centre-crop. Images are decoded in DataLoader workers for file sets. A run's folder sets have
passed the image check (hello_fast.data.validate) already; an image that still fails to decode is
dropped from its batch (FileImageSet warns, naming the file). Batches are uint8 (B, 3, S, S).
A DataPass (hello_fast.data.spec) says how a pass reads; with `loader="dali"` file sets go to
hello_fast.data.dali instead: the same order, labels, sharding and kind of batch, decoded and
augmented by DALI (on the GPU when the device is one).
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from hello_fast.data import dali
from hello_fast.data.dali import FolderBatches
from hello_fast.data.sources import FileImageSet, ImageSet
from hello_fast.data.spec import DataPass, rank_plan
from hello_fast.errors import HelloError
from hello_fast.ops.augment_mix import CROP_TRIES, crop_fallback, crop_try

_MIX = 1_000_003


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + index) % (2**63 - 1)


def random_resized_crop_box(height: int, width: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) by torchvision's RandomResizedCrop rule (augment_mix.crop_try / crop_fallback), drawn
    one try at a time from `g` in float64."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)))
        h, w, fits = crop_try(torch.tensor(target_area, dtype=torch.float64), torch.tensor(aspect, dtype=torch.float64),
                              height, width)
        if bool(fits):
            h, w = int(h), int(w)
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    return crop_fallback(height, width, ratio)


def eval_transform(img: torch.Tensor, size: int, resize: int | None) -> torch.Tensor:
    """Resize the shorter side to `resize` (default size*256/224), then centre-crop `size`."""
    resize = resize or int(round(size * 256 / 224))
    h, w = img.shape[-2:]
    if min(h, w) != resize:
        img = TF.resize(img, [resize], antialias=True)
    return TF.center_crop(img, [size, size])


class _View(Dataset):
    """Sample i of `images` as the pass makes it: `crops` random-resized crops (K, 3, S, S) when training
    (one crop: (3, S, S)), drawn from the generator of (seed, epoch, i); the eval transform otherwise."""

    def __init__(self, images: ImageSet, data_pass: DataPass, train: bool, seed: int, epoch: int, crops: int):
        self.images, self.data_pass, self.size, self.train = images, data_pass, data_pass.image_size, train
        self.seed, self.epoch, self.crops = seed, epoch, crops

    def __len__(self):
        return len(self.images)

    def _crop(self, img, g):
        p = self.data_pass
        top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], p.scale, p.ratio, g)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if p.flip and bool(torch.rand((), generator=g) < 0.5):
            img = img.flip(-1)
        return img

    def __getitem__(self, i):
        img = self.images.load(i)
        if img is None:
            return None
        if self.train:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
            crops = [self._crop(img, g) for _ in range(self.crops)]
            img = crops[0] if self.crops == 1 else torch.stack(crops)
        else:
            img = eval_transform(img, self.size, self.data_pass.eval_resize)
        return img.contiguous(), int(self.images.labels[i]), i


def _collate(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    index = torch.tensor([it[2] for it in items], dtype=torch.long)
    return images, labels, index


class Batches:
    """An iterable of (uint8 images, labels, indices) batches; `len()` is the number of batches."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if batch is not None:
                yield batch


def resolve_loader(loader: str, images: ImageSet) -> str:
    """`dali` or `torch` for a pass over `images` (`auto`: DALI when installed and the images are files it reads)."""
    files = isinstance(images, FileImageSet)
    if loader == "torch":
        return "torch"
    if loader == "dali":
        if not files:
            raise HelloError("the dali loader reads image files (an ImageNet-style folder: --data DIR); "
                             "this data set is held in memory: use --loader torch")
        return "dali"
    if loader != "auto":
        raise HelloError(f"loader must be auto, dali or torch; got {loader!r}")
    return "dali" if files and dali.available() and not dali.unsupported_files(images.files) else "torch"


def batches(images: ImageSet, data_pass: DataPass, *, train: bool, batch_size: int, seed: int = 0, epoch: int = 0,
            device=None, shuffle: bool | None = None, indices=None, drop_last: bool = False, crops: int = 1):
    """Batches of `images` for one pass (all, or `indices` in that order, shuffled per (seed, epoch) when `shuffle`,
    which defaults to `train`).

    `data_pass` says how (hello_fast.data.spec.DataPass): the loader (torch: torchvision in
    DataLoader workers; dali: hello_fast.data.dali on `device`; auto), the training crop and flip,
    the evaluation resize, and `sharded` (under torchrun this rank's share of every global batch,
    `spec.rank_plan`, for both loaders). `crops` > 1 (training, torch loader): that many crops of each image, batches (B, crops, 3, S, S).
    """
    shuffle = train if shuffle is None else shuffle
    order = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if shuffle:
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
        order = order[torch.randperm(len(order), generator=g)]
    plan = rank_plan(order, batch_size, drop_last=drop_last, sharded=data_pass.sharded, train=train)
    if resolve_loader(data_pass.loader, images) == "dali":
        if crops != 1:
            raise HelloError("the dali loader draws one crop per image read; use the torch loader for several crops per image")
        return FolderBatches(images, plan, data_pass, train=train, seed=sample_seed(seed, epoch, -2), device=device)
    view = _View(images, data_pass, train, seed, epoch, crops)
    return Batches(DataLoader(view, batch_sampler=plan, num_workers=data_pass.workers, collate_fn=_collate,
                              persistent_workers=False, pin_memory=False))
