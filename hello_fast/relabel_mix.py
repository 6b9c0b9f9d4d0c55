"""RelabelMix: timm's Mixup/CutMix options, with soft labels from a labeler on the same mixed crops, in one augment_mix pass.

    relabel_mix = RelabelMix("artifact.safetensors", mixup_alpha=0.0, cutmix_alpha=1.0)
    criterion = RelabelMixLoss(relabel_mix, mode="kl", beta=0.1)
    for images, target in loader:             # uint8 (or float in [0, 1]) batches of one size
        x, soft = relabel_mix(images)          # the student's view + the labeler's soft labels
        loss = criterion(model(x), soft, target)

Where timm's `x, y = mixup_fn(x, y)` mixes one-hot targets, RelabelMix labels the mixed images
themselves (HeLlO, RDED): one `augment_mix` call crops (torchvision's RandomResizedCrop rule),
flips, mixes and writes both the student's normalised view and the labeler's view of the same
mixed crops; the labeler (a label artifact's Relabeler, the weak teachers, or any `nn.Module`)
labels the labeler's view. `soft` is (B, C) float32 logits, or probabilities softmax(z / T) with
`temperature=T`. Each batch's mixing (`partner`, `lam` = each sample's effective own share) is
kept on the object for the hard-label term of `RelabelMixLoss` and for `mixed_target`.

timm's options and their meaning here (timm.data.Mixup): `mixup_alpha`, `cutmix_alpha` (Beta
parameters; 0 turns one off), `cutmix_minmax` (box sides uniform in [min, max) of the image,
cutmix_alpha forced to 1), `prob` (chance of mixing a batch / pair / element), `switch_prob`
(chance of CutMix instead of Mixup when both are on), `mode`: `batch` (one lambda and one box for
the batch), `pair` (sample i and B-1-i swap the same box / share one lambda), `elem` (a lambda
and a box per sample); the partner of sample i is always sample B-1-i (timm's `x.flip(0)`); CutMix
boxes are squares of side int(S sqrt(1-lambda)) around a uniform centre, clipped, as timm's
`rand_bbox` (see the differences below), and lambda is corrected to
the clipped box's area (timm's default `correct_lam=True`). `RelabelMix.from_recipe` builds one
from a student loop's AugmentRecipe (hello_fast.data.spec).
Differences from timm, all deliberate:
- in `pair` and `elem` modes with both Mixup and CutMix on, timm picks the kind per element;
  augment_mix applies one kind per call, so here the kind is drawn once per batch (each sample
  still has chance `switch_prob` of CutMix); lambdas, boxes and `prob` stay per element / pair;
- odd batches are accepted in `batch` and `elem` modes (the middle sample is its own partner);
  timm refuses them in every mode, here only `pair` does;
- no `label_smoothing` / `num_classes`: the targets are the labeler's, not smoothed one-hots;
- crops are resized bilinearly without antialiasing (augment_mix's rule);
- the CutMix box is the package's one rule (augment_mix.cutmix_box: clip(centre -/+ side // 2), the
  rule the student loop and every backend draw with); current timm's rand_bbox ends the box at
  centre + (side + 1) // 2, one pixel further when the side is odd;
- randomness comes from the object's own generators (`seed=`), not numpy's global state.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from hello_fast.data.spec import AugmentRecipe
from hello_fast.distributed import resolve_device
from hello_fast.errors import HelloError
from hello_fast.layout import artifact_path, load_teachers
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD, mean_teacher_logits
from hello_fast.ops import augment_mix, sample_augment_params, soft_label_loss
from hello_fast.ops.augment_mix import cutmix_box
from hello_fast.relabel import Relabeler
from hello_fast.rundir import RunDir

MODES = ("batch", "pair", "elem")
LOSS_MODES = ("mse", "kl")


def _check_range(name: str, value, low: float, high: float) -> float:
    value = float(value)
    if not low <= value <= high:
        raise HelloError(f"RelabelMix: {name} must lie in [{low}, {high}], got {value}")
    return value


class RelabelMix:
    """Crop + flip + Mixup/CutMix a batch once, and label the mixed images: `x, soft = relabel_mix(images)`.

    `labeler`: a label artifact path, a `Relabeler`, a list of weak teachers (their logits are
    averaged) or one `nn.Module` (put in eval mode; run under no_grad, in bf16 autocast on a GPU
    when `amp`). Module labelers see images normalised with `labeler_mean`/`labeler_std`
    (default: the student's); a Relabeler gets its CLIP normalisation and resolution.
    Crops: `out_size` (default: the input's side), `scale`, `ratio`, `hflip` (flip chance).
    The student's view: `mean`, `std`, `dtype`, `channels_last` (default: on a GPU).
    `device`: where augmentation runs (default: the labeler's device); `seed`: the generators'
    seed (default: drawn from torch's global generator). See the module docstring for timm's options.
    """

    def __init__(self, labeler, *, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, cutmix_minmax=None,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch", out_size: int | None = None,
                 scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype=torch.float32, channels_last: bool | None = None, labeler_mean=None, labeler_std=None,
                 temperature: float | None = None, amp: bool = True, device=None, seed: int | None = None,
                 backend: str | None = None):
        if mode not in MODES:
            raise HelloError(f"RelabelMix: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mixup_alpha = _check_range("mixup_alpha", mixup_alpha, 0.0, float("inf"))
        self.cutmix_alpha = _check_range("cutmix_alpha", cutmix_alpha, 0.0, float("inf"))
        self.cutmix_minmax = None
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2 or not 0 <= cutmix_minmax[0] <= cutmix_minmax[1] <= 1:
                raise HelloError(f"RelabelMix: cutmix_minmax must be (min, max) with 0 <= min <= max <= 1, got {cutmix_minmax}")
            self.cutmix_minmax = (float(cutmix_minmax[0]), float(cutmix_minmax[1]))
            self.cutmix_alpha = 1.0  # timm's rule: minmax boxes, the Beta draw only decides whether to mix
        self.prob = _check_range("prob", prob, 0.0, 1.0)
        self.switch_prob = _check_range("switch_prob", switch_prob, 0.0, 1.0)
        self.hflip = _check_range("hflip", hflip, 0.0, 1.0)
        self.mode = mode
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise HelloError(f"RelabelMix: scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise HelloError(f"RelabelMix: ratio must be (low, high) with 0 < low <= high, got {ratio}")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        if out_size is not None and (not isinstance(out_size, int) or out_size < 1):
            raise HelloError(f"RelabelMix: out_size must be a positive int, got {out_size!r}")
        self.out_size = out_size
        if temperature is not None and not 0 < temperature < float("inf"):
            raise HelloError(f"RelabelMix: temperature must be a positive number (or None for logits), got {temperature}")
        self.temperature = None if temperature is None else float(temperature)
        self.backend = backend

        if isinstance(labeler, (str, os.PathLike)):
            labeler = Relabeler.from_artifact(os.fspath(labeler), device=device)
        if isinstance(labeler, Relabeler):
            if labeler_mean is not None or labeler_std is not None:
                raise HelloError("RelabelMix: a Relabeler normalises for its own CLIP backbone; drop labeler_mean/labeler_std")
            self.relabeler, self.teachers = labeler, None
            self.device = torch.device(device) if device is not None else labeler.device
            label_view = (tuple(labeler.mean), tuple(labeler.std), labeler.dtype)
        else:
            modules = [labeler] if isinstance(labeler, nn.Module) else list(labeler) if isinstance(labeler, (list, tuple)) else None
            if not modules or not all(isinstance(m, nn.Module) for m in modules):
                raise HelloError("RelabelMix: labeler must be a label artifact path, a Relabeler, an nn.Module or a "
                                 f"non-empty list of nn.Modules (weak teachers), got {type(labeler).__name__}")
            self.relabeler, self.teachers = None, [m.eval() for m in modules]
            first = next(modules[0].parameters(), None)
            self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
            label_view = (tuple(labeler_mean or mean), tuple(labeler_std or std), torch.float32)
        student_view = (tuple(mean), tuple(std), dtype)
        same = student_view == label_view
        self._views = [student_view] if same else [student_view, label_view]
        self._label_view = 0 if same else 1
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        self._amp = amp and self.device.type == "cuda"
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self._generator = torch.Generator().manual_seed(int(seed))
        self._rng = np.random.default_rng(int(seed))
        self.partner = self.lam = None  # the last batch's mixing
        self.kind = None

    @classmethod
    def from_recipe(cls, labeler, recipe: AugmentRecipe, **options) -> "RelabelMix":
        """A RelabelMix drawing by a student loop's AugmentRecipe: its out_size, scale, ratio, flip and mix (one lambda
        and one box per batch, every batch mixed); `options` are the others (device, seed, dtype, ...)."""
        if recipe.shuffle_factor != 1:
            raise HelloError(f"RelabelMix: the recipe's ShufflePatches (shuffle_factor {recipe.shuffle_factor}) is the "
                             "student loop's; RelabelMix crops the images as given")
        taken = {"mixup_alpha", "cutmix_alpha", "mode", "prob", "out_size", "scale", "ratio", "hflip"} & set(options)
        if taken:
            raise HelloError(f"RelabelMix.from_recipe: the recipe sets {', '.join(sorted(taken))}")
        alphas = {"none": (0.0, 0.0), "mixup": (recipe.alpha, 0.0), "cutmix": (0.0, recipe.alpha)}[recipe.mix]
        return cls(labeler, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], mode="batch", prob=1.0,
                   out_size=recipe.out_size, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.flip_prob, **options)

    @classmethod
    def from_artifact(cls, path: str, *, backbone_weights: str | None = None, device=None, capture: bool = False,
                      **options) -> "RelabelMix":
        """A RelabelMix labelling with a label artifact's projector (see Relabeler.from_artifact)."""
        relabel = Relabeler.from_artifact(path, backbone_weights=backbone_weights, device=device, capture=capture)
        return cls(relabel, device=device, **options)

    @classmethod
    def from_run(cls, run_dir: str, source: str = "projector", *, device=None, **options) -> "RelabelMix":
        """A RelabelMix labelling with a finished run's label artifact (`projector`) or weak teachers (`teacher`)."""
        run = RunDir(run_dir)
        if source == "projector":
            path = artifact_path(run)
            if not os.path.isfile(path):
                raise HelloError(f"{run.root} has no label artifact ({path}); run `hello-fast projector --out {run.root}` first")
            return cls.from_artifact(path, device=device, **options)
        if source == "teacher":
            if run.done("teachers") is None:
                raise HelloError(f"{run.root} has no finished teachers stage; run `hello-fast teachers --out {run.root}` first")
            device = resolve_device(str(device or "auto"))
            return cls(load_teachers(run, device), device=device, **options)
        raise HelloError(f"RelabelMix.from_run: source must be projector or teacher, got {source!r}")

    @property
    def num_classes(self) -> int | None:
        """The label artifact's class count (None for module labelers: their output decides)."""
        return self.relabeler.num_classes if self.relabeler is not None else None

    @property
    def class_names(self) -> list[str] | None:
        return self.relabeler.class_names if self.relabeler is not None else None

    # -- drawing (on the host, from this object's generators) ---------------------------------------
    def draw(self, batch_size: int, height: int, width: int, out_size: int | None = None) -> tuple[dict, str]:
        """One batch's parameters for augment_mix (CPU tensors: crop, flip, partner, lam, cut) and the mix kind.

        `lam` holds the drawn lambdas (1 where a sample is not mixed); augment_mix corrects CutMix's
        to the box area (its `lam_eff`). Calling RelabelMix draws exactly this.
        """
        S = out_size or self.out_size or height
        index = torch.arange(batch_size)
        p = sample_augment_params(index, height, width, out_size=S, scale=self.scale, ratio=self.ratio,
                                  flip_prob=self.hflip, mode="none", generator=self._generator)
        kind, lam, cut = self._draw_mix(batch_size, S)
        params = {"crop": p["crop"], "flip": p["flip"], "partner": torch.arange(batch_size - 1, -1, -1),
                  "lam": torch.from_numpy(lam).float(), "cut": torch.from_numpy(cut).long()}
        return params, kind

    def _draw_mix(self, B: int, S: int):
        """timm's per-batch / per-pair / per-element lambda, kind and box, expanded to one row per sample."""
        rng = self._rng
        if self.mode == "pair" and B % 2:
            raise HelloError(f"RelabelMix: mode 'pair' needs an even batch, got {B} (drop_last=True in the DataLoader)")
        lam, cut = np.ones(B), np.zeros((B, 4), dtype=np.int64)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return "none", lam, cut
        n = {"batch": 1, "pair": B // 2, "elem": B}[self.mode]
        both = self.mixup_alpha > 0 and self.cutmix_alpha > 0
        use_cutmix = bool(rng.random() < self.switch_prob) if both else self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        drawn = rng.beta(alpha, alpha, size=n)
        mixed = rng.random(n) < self.prob
        if not mixed.any():
            return "none", lam, cut
        unit_lam = np.where(mixed, drawn, 1.0)
        unit_cut = np.zeros((n, 4), dtype=np.int64)
        if use_cutmix:
            unit_cut[mixed] = self._boxes(int(mixed.sum()), unit_lam[mixed], S)
        rows = np.arange(B)
        unit = {"batch": np.zeros(B, dtype=np.int64), "pair": np.minimum(rows, B - 1 - rows), "elem": rows}[self.mode]
        return ("cutmix" if use_cutmix else "mixup"), unit_lam[unit], unit_cut[unit]

    def _boxes(self, n: int, lam: np.ndarray, S: int) -> np.ndarray:
        """(top, left, bottom, right) per unit: timm's rand_bbox (augment_mix.cutmix_box, the box rule of every
        backend) or, with cutmix_minmax, timm's rand_bbox_minmax (sides drawn in [min, max) of the image)."""
        rng = self._rng
        if self.cutmix_minmax is not None:
            lo, hi = int(S * self.cutmix_minmax[0]), int(S * self.cutmix_minmax[1])
            cut_h = rng.integers(lo, max(hi, lo + 1), size=n)
            cut_w = rng.integers(lo, max(hi, lo + 1), size=n)
            top = rng.integers(0, S - cut_h + 1)
            left = rng.integers(0, S - cut_w + 1)
            return np.stack([top, left, top + cut_h, left + cut_w], 1)
        side = (S * np.sqrt(1.0 - lam)).astype(np.int64)
        cy = rng.integers(0, S, size=n)
        cx = rng.integers(0, S, size=n)
        return np.stack(cutmix_box(cy, cx, side, S), 1)

    @torch.compiler.disable
    def _prepare(self, images: torch.Tensor):
        """uint8 source batch on the device, its parameters and mix kind (host work: kept out of compiled graphs)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise HelloError(f"RelabelMix: expected images (B, 3, H, W), got {shape}")
        if images.shape[0] == 0:
            raise HelloError("RelabelMix: empty batch")
        if images.is_floating_point():
            low, high = float(images.min()), float(images.max())
            if low < 0 or high > 1:
                raise HelloError(f"RelabelMix: float images must lie in [0, 1] (got [{low:.3g}, {high:.3g}]): "
                                 "pass uint8 or un-normalised images")
            images = images.mul(255).round_().to(torch.uint8)
        elif images.dtype != torch.uint8:
            raise HelloError(f"RelabelMix: images must be uint8 or float in [0, 1], got {images.dtype}")
        B, _, H, W = images.shape
        S = self.out_size
        if S is None:
            if H != W:
                raise HelloError(f"RelabelMix: the images are {H}x{W}; give out_size= for non-square inputs")
            S = H
        params, kind = self.draw(B, H, W, S)
        src = images.to(self.device, non_blocking=True).contiguous()
        params = {k: v.to(self.device, non_blocking=True) for k, v in params.items()}
        return src, torch.arange(B, device=self.device), params, kind, S

    @torch.no_grad()
    def _label(self, view: torch.Tensor) -> torch.Tensor:
        if self.relabeler is not None:
            return self.relabeler(view)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            return mean_teacher_logits(self.teachers, view)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, soft): the student's view (B, 3, S, S) and the labeler's (B, C) float32 logits or probabilities."""
        src, index, params, kind, S = self._prepare(images)
        views, lam = augment_mix(src, index, **params, mode=kind, out_size=S, views=self._views,
                                 channels_last=self.channels_last, check=False, backend=self.backend)
        soft = self._label(views[self._label_view])
        if self.temperature is not None:
            soft = torch.softmax(soft / self.temperature, dim=1)
        self.partner, self.lam, self.kind = params["partner"], lam, kind
        return views[0], soft

    def mixed_target(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """timm-style mixed one-hot targets (B, num_classes) of the last batch: lam y + (1 - lam) y[partner]."""
        if self.lam is None:
            raise HelloError("RelabelMix.mixed_target: call relabel_mix(images) first")
        target = target.to(self.lam.device)
        one_hot = torch.nn.functional.one_hot(target, num_classes).float()
        lam = self.lam[:, None]
        return lam * one_hot + (1 - lam) * one_hot[self.partner]


class RelabelMixLoss:
    """`loss(student_logits, soft, target=None)`: MSE or temperature-KL against RelabelMix's soft labels + beta x mixed CE.

    `mode="mse"` (HeLlO's Alg. 1) compares logits; `mode="kl"` is KL(softmax(soft/T) || softmax(s/T)),
    batch-mean, no T^2 factor (RDED/SRe2L practice), T = `temperature` (default 4) or, when the
    RelabelMix gives probabilities, its own temperature. `beta > 0` adds the cross-entropy with the
    hard labels `target` mixed as the last batch was (its `partner` and `lam`). Computed by the
    fused `soft_label_loss` op (gradient to the student's logits only).
    """

    def __init__(self, relabel_mix: RelabelMix | None = None, *, mode: str = "mse", temperature: float | None = None,
                 beta: float = 0.0, backend: str | None = None):
        if mode not in LOSS_MODES:
            raise HelloError(f"RelabelMixLoss: mode must be one of {', '.join(LOSS_MODES)}, got {mode!r}")
        if not 0 <= beta < float("inf"):
            raise HelloError(f"RelabelMixLoss: beta must be >= 0 and finite, got {beta}")
        self.relabel_mix, self.mode, self.beta, self.backend = relabel_mix, mode, float(beta), backend
        made_at = relabel_mix.temperature if relabel_mix is not None else None
        self._probabilities = made_at is not None
        if self._probabilities:
            if mode == "mse":
                raise HelloError("RelabelMixLoss: mse compares logits, but the RelabelMix gives probabilities "
                                 "(temperature=...); make it without temperature or use mode='kl'")
            if temperature is not None and float(temperature) != made_at:
                raise HelloError(f"RelabelMixLoss: the soft labels are probabilities at T={made_at}; "
                                 f"temperature={temperature} would not match")
            temperature = made_at
        self.temperature = 4.0 if temperature is None else float(temperature)
        if not 0 < self.temperature < float("inf"):
            raise HelloError(f"RelabelMixLoss: temperature must be a positive number, got {temperature}")

    def __call__(self, student_logits: torch.Tensor, soft: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        B = student_logits.shape[0]
        device = student_logits.device
        if self.beta > 0:
            rm = self.relabel_mix
            if target is None:
                raise HelloError("RelabelMixLoss: beta > 0 needs the hard labels: loss(student_logits, soft, target)")
            if rm is None or rm.lam is None:
                raise HelloError("RelabelMixLoss: beta > 0 needs the RelabelMix that made the batch: RelabelMixLoss(relabel_mix, ...)")
            if target.dtype != torch.long or target.shape != (B,):
                raise HelloError(f"RelabelMixLoss: target must be int64 class indices of shape ({B},), got "
                                 f"{target.dtype} {tuple(target.shape)}")
            hard, partner, lam = target.to(device), rm.partner.to(device), rm.lam.to(device)
        else:
            hard = torch.zeros(B, dtype=torch.long, device=device)
            partner = torch.arange(B, device=device)
            lam = torch.ones(B, device=device)
        t = soft.float()
        if self._probabilities:  # T log p has softmax(. / T) = p: the kernel's KL sees the same target
            t = self.temperature * torch.log(t.clamp_min(torch.finfo(torch.float32).tiny))
        return soft_label_loss(student_logits.float(), t.to(device), hard, partner, lam, mode=self.mode,
                               temperature=self.temperature, beta=self.beta, backend=self.backend)
