"""A distilled set resident on the device as uint8, drawing augmented batches with one augment_mix call per step.

The student loop's images never leave the device: each step draws crop/flip/mix parameters by the
set's AugmentRecipe (hello_fast.data.spec: sample_augment_params, RandomResizedCrop with the
recipe's scale and ratio, CutMix or Mixup, and RDED's ShufflePatches with shuffle_factor > 1) and
one augment_mix call writes every view the step needs
(the student's normalisation, CLIP's for the projector). Parameters are drawn from the set's own
generator, so the stream of batches depends only on the seed and the schedule, not on what
consumes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hello_fast import distributed
from hello_fast.data.spec import AugmentRecipe
from hello_fast.ops import augment_mix, sample_augment_params


@dataclass
class Batch:
    """One augmented step: the views, hard labels, mixing partner and own-label weights, and how it was drawn."""

    views: tuple
    hard: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor  # lam_eff
    index: torch.Tensor
    params: dict
    stored_logits: torch.Tensor | None = None  # set when stored labels are replayed


class ResidentSet:
    """The distilled set (uint8 (N, 3, H, W)) on `device`, drawing batches by an AugmentRecipe from its own generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device, recipe: AugmentRecipe, seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("ResidentSet: images must be uint8 (N, 3, H, W)")
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device)
        self.device = torch.device(device)
        self.recipe = recipe
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def epoch_order(self, batch_size: int) -> list[torch.Tensor]:
        """This epoch's batches of image indices (a fresh permutation)."""
        perm = torch.randperm(len(self), generator=self.generator)
        return [chunk.to(self.device) for chunk in perm.split(batch_size)]

    def draw(self, index: torch.Tensor) -> dict:
        """The recipe's parameters for a global batch; under torchrun each rank's share mixes within itself."""
        r = self.recipe
        H, W = self.images.shape[-2:]
        groups = distributed.share_sizes(index.shape[0]) if distributed.world().distributed else None
        return sample_augment_params(index, H, W, out_size=r.out_size, scale=r.scale, ratio=r.ratio,
                                     flip_prob=r.flip_prob, mode=r.mix, alpha=r.alpha, generator=self.generator,
                                     groups=groups, shuffle_factor=r.shuffle_factor)

    @staticmethod
    def my_share(index: torch.Tensor, params: dict, logits=None):
        """This rank's rows of a global batch (partners renumbered within the share)."""
        if not distributed.world().distributed:
            return index, params, logits
        s = distributed.share(index.shape[0])
        mine = {k: v[s] for k, v in params.items()}
        mine["partner"] = mine["partner"] - s.start
        return index[s], mine, (None if logits is None else logits[s])

    def make(self, index, params: dict, *, views, channels_last: bool = False, backend=None, check: bool = False) -> Batch:
        """The batch for given parameters (drawn by `draw`, or replayed from stored labels)."""
        r = self.recipe
        out, lam = augment_mix(self.images, index, **params, mode=r.mix, out_size=r.out_size, views=views,
                               channels_last=channels_last, check=check, backend=backend)
        return Batch(out, self.labels[index], params["partner"], lam, index, params)
