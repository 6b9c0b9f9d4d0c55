"""Batches over an image set, for the passes over the original data (teachers, projector, selection, evaluation).

Training batches: RandomResizedCrop (torchvision's sampling rule) + horizontal flip, drawn from a
per-sample generator seeded by (seed, epoch, index), so the augmentation stream is the same for
any number of DataLoader workers or processes. Evaluation batches: resize the shorter side, then
centre-crop. Images are decoded in DataLoader workers for file sets. A run's folder sets have
passed the image check (hello_fast.data.validate) already; an image that still fails to decode is
dropped from its batch (FileImageSet warns, naming the file). Batches are uint8 (B, 3, S, S).
`loader="dali"` hands file sets to hello_fast.data.dali instead: the same order, labels and kind
of batch, decoded and augmented by DALI (on the GPU when the device is one).
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from hello_fast import distributed
from hello_fast.data import dali
from hello_fast.data.dali import FolderBatches
from hello_fast.data.sources import FileImageSet, ImageSet
from hello_fast.errors import HelloError

_MIX = 1_000_003


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + index) % (2**63 - 1)


def random_resized_crop_box(height: int, width: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) by torchvision's RandomResizedCrop rule: 10 tries, then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_transform(img: torch.Tensor, size: int, resize: int | None) -> torch.Tensor:
    """Resize the shorter side to `resize` (default size*256/224), then centre-crop `size`."""
    resize = resize or int(round(size * 256 / 224))
    h, w = img.shape[-2:]
    if min(h, w) != resize:
        img = TF.resize(img, [resize], antialias=True)
    return TF.center_crop(img, [size, size])


class _View(Dataset):
    def __init__(self, images: ImageSet, size: int, train: bool, scale, ratio, flip: bool, seed: int, epoch: int, eval_resize):
        self.images, self.size, self.train = images, size, train
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.seed, self.epoch, self.eval_resize = seed, epoch, eval_resize

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images.load(i)
        if img is None:
            return None
        if self.train:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
            top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], self.scale, self.ratio, g)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if self.flip and bool(torch.rand((), generator=g) < 0.5):
                img = img.flip(-1)
        else:
            img = eval_transform(img, self.size, self.eval_resize)
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


def batches(images: ImageSet, *, size: int, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, shuffle: bool | None = None,
            indices=None, num_workers: int = 0, eval_resize: int | None = None, drop_last: bool = False,
            sharded: bool = False, loader: str = "torch", device=None):
    """Batches of `images` (all, or `indices` in that order, shuffled per (seed, epoch) when `shuffle`).

    `sharded`: under torchrun, this rank's share (torch: a contiguous share of every global batch
    of `batch_size`, the same order and augmentation on every rank, so that together the ranks see
    exactly the batches a single process would; DALI: the reader's shard of the epoch).
    `loader`: torch (torchvision in DataLoader workers), dali (hello_fast.data.dali, on `device`)
    or auto. Both take the images in the same order and yield the same kind of batch.
    """
    shuffle = train if shuffle is None else shuffle
    order = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if shuffle:
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
        order = order[torch.randperm(len(order), generator=g)]
    if resolve_loader(loader, images) == "dali":
        return FolderBatches(images, order, size=size, batch_size=batch_size, train=train,
                              seed=sample_seed(seed, epoch, -2), scale=scale, ratio=ratio, flip=flip,
                              drop_last=drop_last, eval_resize=eval_resize, device=device,
                              num_workers=num_workers, sharded=sharded)
    view = _View(images, size, train, scale, ratio, flip, seed, epoch, eval_resize)
    common = dict(num_workers=num_workers, collate_fn=_collate, persistent_workers=False, pin_memory=False)
    if sharded and distributed.world().distributed:
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if drop_last and chunks and len(chunks[-1]) < batch_size:
            chunks = chunks[:-1]
        plan = [c[distributed.share(len(c))].tolist() for c in chunks]
        loader = DataLoader(view, batch_sampler=[p for p in plan if p], **common)
    else:
        loader = DataLoader(view, batch_size=batch_size, sampler=order.tolist(), drop_last=drop_last, **common)
    return Batches(loader)
