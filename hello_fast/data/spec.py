"""The two specs every data path is built from: a pass over the original set (DataPass) and the students' augmentation (AugmentRecipe).

Both are frozen dataclasses built once from the config (timm's `create_transform(**cfg)` /
`Mixup(**args)` shape): the loaders, DALI, selection, the resident set, RelabelMix and
stored-label replay take them instead of re-reading loose config fields.

- `DataPass`: how `hello_fast.data.loader.batches` reads and augments the original set.
  `sharded` has one meaning for every loader: under torchrun each rank takes its contiguous
  share of every global batch, with the order a single process would use, so that together the
  ranks see exactly the single process's batches (`rank_plan`).
- `AugmentRecipe`: what the student loop draws per batch (crop, flip, CutMix/Mixup, ShufflePatches).
  Its fields are also what stored labels depend on (`hello_fast.data.schedule.schedule_of` takes
  all of them), so a field added here changes the replay schedule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hello_fast import distributed
from hello_fast.errors import HelloError

# torchvision's RandomResizedCrop default aspect-ratio range, used by every training crop here
RATIO = (3 / 4, 4 / 3)
LOADERS = ("auto", "dali", "torch")
MIXES = ("none", "mixup", "cutmix")


def dali_threads(workers: int) -> int:
    """DALI's CPU threads for `workers` (data.num_workers): that many, or up to 4 when 0."""
    return workers if workers > 0 else min(4, os.cpu_count() or 1)


def _pair(name: str, value, owner: str) -> tuple[float, float]:
    if len(value) != 2 or not 0 < float(value[0]) <= float(value[1]):
        raise HelloError(f"{owner}: {name} must be (low, high) with 0 < low <= high, got {tuple(value)}")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class DataPass:
    """A pass over an image set: resolution, loader, workers, the evaluation resize and the training crop/flip.

    `scale`/`ratio`: RandomResizedCrop's ranges for training batches; `eval_resize`: the shorter
    side before the centre crop of evaluation batches (None: image_size * 256 / 224); `sharded`:
    under torchrun, this rank's share of every global batch (see the module docstring).
    """

    image_size: int
    loader: str = "torch"
    workers: int = 0
    eval_resize: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = RATIO
    flip: bool = True
    sharded: bool = False

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise HelloError(f"DataPass: image_size must be a positive int, got {self.image_size!r}")
        if self.loader not in LOADERS:
            raise HelloError(f"loader must be auto, dali or torch; got {self.loader!r}")
        if self.workers < 0:
            raise HelloError(f"DataPass: workers must be >= 0, got {self.workers}")
        object.__setattr__(self, "scale", _pair("scale", self.scale, "DataPass"))
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio, "DataPass"))

    @classmethod
    def from_config(cls, cfg, *, sharded: bool = False) -> "DataPass":
        """The run's pass over its original set (data.*); `sharded` for the passes every rank shares."""
        d = cfg.data
        return cls(image_size=d.image_size, loader=d.loader, workers=d.num_workers, eval_resize=d.eval_resize,
                   scale=tuple(d.train_scale), flip=d.flip, sharded=sharded)

    @property
    def threads(self) -> int:
        """DALI's CPU threads for this pass."""
        return dali_threads(self.workers)


def rank_plan(order: torch.Tensor, batch_size: int, *, drop_last: bool, sharded: bool, train: bool = False) -> list[list[int]]:
    """The batches of `order` this process reads: every global batch of `batch_size`, or with `sharded`
    under torchrun this rank's contiguous share of each. The one sharding rule of the torch and DALI loaders.

    A global batch with fewer rows than ranks leaves some rank without rows: in training every rank
    then skips it (DDP's gradient all-reduce needs every rank in every step, or the job hangs); in
    evaluation the ranks without rows skip it (the counts are summed once at the end)."""
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    world = distributed.world()
    if sharded and world.distributed:
        if train:
            chunks = [c for c in chunks if len(c) >= world.size]
        chunks = [c[distributed.share(len(c), world.rank, world.size)] for c in chunks]
    return [c.tolist() for c in chunks if len(c)]


@dataclass(frozen=True)
class AugmentRecipe:
    """The students' per-batch augmentation: RandomResizedCrop to `out_size` (`scale`, `ratio`), flips,
    one mix per batch (`mix`: none | mixup | cutmix, lambda ~ Beta(alpha, alpha)) and RDED's
    ShufflePatches with `shuffle_factor` > 1 (1: none).

    timm's Mixup options beyond these (cutmix_minmax, prob, switch_prob, per-pair/element modes)
    are RelabelMix's own (`RelabelMix.from_recipe` adds them); the student loop has no option
    for them, so the recipe does not carry them.
    """

    out_size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = RATIO
    flip: bool = True
    mix: str = "cutmix"
    alpha: float = 1.0
    shuffle_factor: int = 1

    def __post_init__(self):
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int) or self.out_size < 1:
            raise HelloError(f"AugmentRecipe: out_size must be a positive int, got {self.out_size!r}")
        scale = _pair("scale", self.scale, "AugmentRecipe")
        if scale[1] > 1:
            raise HelloError(f"AugmentRecipe: scale must lie in (0, 1], got {scale}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio, "AugmentRecipe"))
        if self.mix not in MIXES:
            raise HelloError(f"AugmentRecipe: mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if not 0 < float(self.alpha) < float("inf"):
            raise HelloError(f"AugmentRecipe: alpha must be a positive number, got {self.alpha}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.shuffle_factor, bool) or not isinstance(self.shuffle_factor, int) or self.shuffle_factor < 1:
            raise HelloError(f"AugmentRecipe: shuffle_factor must be an int >= 1, got {self.shuffle_factor!r}")

    @classmethod
    def from_config(cls, cfg) -> "AugmentRecipe":
        """The student loop's recipe: data.image_size, student.scale, data.flip, student.mix / mix_alpha, and
        select.factor as the ShufflePatches factor with student.shuffle_patches."""
        sc = cfg.student
        return cls(out_size=cfg.data.image_size, scale=tuple(sc.scale), flip=cfg.data.flip, mix=sc.mix,
                   alpha=sc.mix_alpha, shuffle_factor=cfg.select.factor if sc.shuffle_patches else 1)

    @property
    def flip_prob(self) -> float:
        return 0.5 if self.flip else 0.0
