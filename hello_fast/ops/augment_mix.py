"""The student loop's augmentation in one op: crop + bilinear resize + flip + CutMix/Mixup + normalise into several views.

`augment_mix(src, index, crop, flip, partner, lam, cut, mode=, out_size=, views=, shuffle=)` returns
the normalised views and each sample's effective own-label weight `lam_eff`:
  image[b] = src[index[b]], or with `shuffle` (int64 (B, 2, factor)) RDED's ShufflePatches of it:
            the image cut into `factor` horizontal strips put in the order shuffle[b, 0] and
            `factor` vertical strips put in the order shuffle[b, 1] (strip k of the result is
            strip shuffle[b, ., k] of the source; strips are size // factor pixels, the last
            source strip also takes the remainder, so the image keeps its size);
  base[b] = bilinear resize (align_corners=False, no antialias, as F.interpolate) of the crop
            crop[b] = (top, left, height, width) of image[b], flipped left-right if flip[b];
  mixup:  x[b] = lam[b] base[b] + (1 - lam[b]) base[partner[b]],      lam_eff = lam;
  cutmix: x[b] = base[b] with the box cut[b] = (top, left, bottom, right) from base[partner[b]],
          lam_eff[b] = 1 - box area / out_size^2;
  none:   x = base, lam_eff = 1;
  view v = ((x / 255 - mean_v) / std_v).to(dtype_v), shape (B, 3, out_size, out_size).
`sample_augment_params` draws crop/flip/partner/lam/cut by torchvision's RandomResizedCrop rule
and the CutMix/Mixup rules (lam ~ Beta(alpha, alpha), box clipped to the image, lam corrected to
the box's area), and with `shuffle_factor > 1` the strip orders (uniform permutations, drawn per
image, as RDED's ShufflePatches does per image before its RandomResizedCrop).

The backends fold the shuffle into the source coordinates: a bilinear tap at (y, x) of the
shuffled image reads the source pixel (rows[y], cols[x]) given by `strip_source_index`.
RDED's ShufflePatches (LINs-lab/RDED validation/utils.py) drops the remainder when a side is not
a multiple of the factor (its last-strip test compares a pixel offset with the strip count), so
its output shrinks to factor * (size // factor); here the last strip keeps it, as that code
intends. The two agree whenever the factor divides the size (RDED's 224 px images, factor 2).

One semantics for every backend (Triton, CUDA, C++, the reference): this module checks the
arguments once, before dispatching (at most MAX_VIEWS views of float32/float16/bfloat16; crops,
indices, partners, boxes and strip orders in range, else IndexError), every backend computes the pixels in
float32 and rounds once into each view's dtype, and `effective_lam` is the only place lam_eff
is computed. The csrc ops keep TORCH_CHECKs with the same limits for C++ callers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hello_fast.ops import _backend, _registrations
from hello_fast._limits import DTYPE_CODES, MAX_SHUFFLE_FACTOR, MAX_VIEWS, check_kernel_dtype, strip_source_index

MODES = ("none", "mixup", "cutmix")
# preferred first; the dispatcher drops what this device cannot run (see _backend for the roles)
_OFFERED = _backend.CUDA_THEN_TRITON


def _views_spec(views):
    out = []
    for v in views:
        if len(v) != 3:
            raise ValueError("augment_mix: each view is (mean[3], std[3], dtype)")
        mean, std, dtype = v
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"augment_mix: a view needs 3 means and 3 positive stds, got {mean}, {std}")
        check_kernel_dtype("augment_mix", "a view's dtype", dtype)
        out.append((mean, std, dtype))
    if not out:
        raise ValueError("augment_mix: give at least one view")
    if len(out) > MAX_VIEWS:
        raise ValueError(f"augment_mix: at most {MAX_VIEWS} views are written in one pass, got {len(out)}")
    return out


def _check_shapes(src, index, crop, flip, partner, lam, cut, mode, out_size, shuffle=None):
    """Dtypes, shapes, devices and the mode (no data read: always checked); returns B."""
    if mode not in MODES:
        raise ValueError(f"augment_mix: mode must be one of {MODES}, got {mode!r}")
    if src.dtype != torch.uint8 or src.dim() != 4 or src.shape[1] != 3:
        raise ValueError(f"augment_mix: src must be uint8 (S, 3, H, W), got {src.dtype} {tuple(src.shape)}")
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"augment_mix: out_size must be a positive int, got {out_size!r}")
    B = index.shape[0] if index.dim() == 1 else -1
    expect = {"index": (index, (B,), torch.long), "crop": (crop, (B, 4), torch.long), "flip": (flip, (B,), torch.bool),
              "partner": (partner, (B,), torch.long), "lam": (lam, (B,), torch.float32), "cut": (cut, (B, 4), torch.long)}
    for name, (t, shape, dtype) in expect.items():
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"augment_mix: {name} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        if t.device != src.device:
            raise ValueError(f"augment_mix: {name} is on {t.device}, src on {src.device}")
    if B == 0:
        raise ValueError("augment_mix: empty batch")
    if shuffle is not None:
        H, W = src.shape[-2:]
        if shuffle.dtype != torch.long or shuffle.dim() != 3 or tuple(shuffle.shape[:2]) != (B, 2):
            raise ValueError(f"augment_mix: shuffle must be int64 of shape ({B}, 2, factor), got {shuffle.dtype} "
                             f"{tuple(shuffle.shape)}")
        factor = shuffle.shape[2]
        if not 1 <= factor <= min(MAX_SHUFFLE_FACTOR, H, W):
            raise ValueError(f"augment_mix: the shuffle factor must lie in [1, {min(MAX_SHUFFLE_FACTOR, H, W)}] "
                             f"(at most {MAX_SHUFFLE_FACTOR} and the image's {H}x{W} sides), got {factor}")
        if shuffle.device != src.device:
            raise ValueError(f"augment_mix: shuffle is on {shuffle.device}, src on {src.device}")
    return B


def check_augment_args(src, index, crop, flip, partner, lam, cut, mode, out_size, shuffle=None):
    """Raise ValueError/IndexError for anything malformed or out of range (reads the parameters on the host); returns B."""
    B = _check_shapes(src, index, crop, flip, partner, lam, cut, mode, out_size, shuffle)
    S, _, H, W = src.shape
    idx = index.cpu()
    if int(idx.min()) < 0 or int(idx.max()) >= S:
        raise IndexError(f"augment_mix: index must lie in [0, {S}), got [{int(idx.min())}, {int(idx.max())}]")
    c = crop.cpu()
    top, left, h, w = c.unbind(1)
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > H) | (left + w > W)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise IndexError(f"augment_mix: crop[{b}] = {c[b].tolist()} (top, left, height, width) is not inside a {H}x{W} image")
    p = partner.cpu()
    if int(p.min()) < 0 or int(p.max()) >= B:
        raise IndexError(f"augment_mix: partner must index batch rows [0, {B}), got [{int(p.min())}, {int(p.max())}]")
    if mode == "cutmix":
        k = cut.cpu()
        t0, l0, b1, r1 = k.unbind(1)
        bad = (t0 < 0) | (l0 < 0) | (t0 > b1) | (l0 > r1) | (b1 > out_size) | (r1 > out_size)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise IndexError(f"augment_mix: cut[{b}] = {k[b].tolist()} (top, left, bottom, right) is not a box inside {out_size}x{out_size}")
    if mode == "mixup" and not bool(torch.isfinite(lam).all()):
        raise ValueError("augment_mix: lam must be finite")
    if shuffle is not None:
        order = shuffle.cpu()
        bad = (order.sort(-1).values != torch.arange(order.shape[-1])).any(-1)  # (B, 2)
        if bool(bad.any()):
            b, axis = bad.nonzero()[0].tolist()
            raise IndexError(f"augment_mix: shuffle[{b}, {axis}] = {order[b, axis].tolist()} is not an order of the "
                             f"{order.shape[-1]} strips (a permutation of 0..{order.shape[-1] - 1})")
    return B


def _assert_in_range(src, index, crop, partner, lam, cut, mode, out_size, shuffle) -> None:
    """check_augment_args' range rules as one device-side assertion (torch.compile: a host read would break the graph)."""
    S, _, H, W = src.shape
    B = index.shape[0]
    top, left, h, w = crop.unbind(1)
    ok = ((index >= 0) & (index < S)).all() & ((partner >= 0) & (partner < B)).all()
    ok = ok & ((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= H) & (left + w <= W)).all()
    if mode == "cutmix":
        t0, l0, b1, r1 = cut.unbind(1)
        ok = ok & ((t0 >= 0) & (l0 >= 0) & (t0 <= b1) & (l0 <= r1) & (b1 <= out_size) & (r1 <= out_size)).all()
    if mode == "mixup":
        ok = ok & torch.isfinite(lam).all()
    if shuffle is not None:
        ok = ok & (shuffle.sort(-1).values == torch.arange(shuffle.shape[-1], device=shuffle.device)).all()
    torch._assert_async(ok, "augment_mix: an index, crop, partner, CutMix box, lam or strip order is out of range")


def shuffle_patches(images: torch.Tensor, shuffle: torch.Tensor) -> torch.Tensor:
    """RDED's ShufflePatches of a batch (B, C, H, W) with the strip orders `shuffle` (B, 2, F): the shuffled images."""
    B, C, H, W = images.shape
    rows = strip_source_index(shuffle[:, 0].to(images.device), H)  # (B, H)
    cols = strip_source_index(shuffle[:, 1].to(images.device), W)  # (B, W)
    out = images.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


CROP_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then the centre crop


def crop_try(target_area: torch.Tensor, aspect: torch.Tensor, height: int, width: int):
    """The crop rule of every RandomResizedCrop here (torchvision's): a try of area `target_area` and aspect
    `aspect` (tensors, computed in their dtype) has h = round(sqrt(area / aspect)), w = round(sqrt(area *
    aspect)) (halves to even), and fits when 0 < h <= height and 0 < w <= width. Returns (h, w, fits)."""
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    return h, w, (w > 0) & (w <= width) & (h > 0) & (h <= height)


def crop_fallback(height: int, width: int, ratio) -> tuple[int, int, int, int]:
    """torchvision's crop after CROP_TRIES failed tries: (top, left, h, w) of the whole image's centre,
    cut to the nearest aspect in `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def cutmix_box(cy, cx, side, size: int):
    """The CutMix box rule of every backend and of RelabelMix (timm's rand_bbox): a square of side `side`
    around the centre (cy, cx), clipped to the size x size image: (top, left, bottom, right), each
    clip(centre -/+ side // 2, 0, size). Works on torch tensors and numpy arrays alike."""
    half = side // 2
    return (cy - half).clip(0, size), (cx - half).clip(0, size), (cy + half).clip(0, size), (cx + half).clip(0, size)


def mix_batch(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, cut: torch.Tensor, mode: str) -> torch.Tensor:
    """The mix step of augment_mix's semantics on a batch (B, C, H, W), in float32: Mixup lam x + (1 - lam) x[partner],
    CutMix x with the box cut[b] = (top, left, bottom, right) taken from x[partner[b]], none x.

    Mixing commutes with the affine normalisation, so it applies to raw or normalised views alike
    (the reference mixes raw pixels, the DALI backend its normalised views)."""
    x = x.float()
    if mode == "mixup":
        w = lam.to(x.device, torch.float32).view(-1, 1, 1, 1)
        return w * x + (1 - w) * x[partner]
    if mode == "cutmix":
        H, W = x.shape[-2:]
        c = cut.to(x.device)
        rows = torch.arange(H, device=x.device)[None]
        cols = torch.arange(W, device=x.device)[None]
        inside_rows = (rows >= c[:, 0:1]) & (rows < c[:, 2:3])
        inside_cols = (cols >= c[:, 1:2]) & (cols < c[:, 3:4])
        box = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]
        return torch.where(box, x[partner], x)
    return x


def effective_lam(mode: str, lam: torch.Tensor, cut: torch.Tensor, out_size: int) -> torch.Tensor:
    """lam_eff, each sample's own-label weight after mixing (float32 (B,)): lam for Mixup, 1 - box area / out_size^2
    for CutMix (lam corrected to the clipped box), 1 without mixing. Every backend's lam_eff comes from here."""
    if mode == "mixup":
        return lam.to(torch.float32).clone()
    if mode == "cutmix":
        area = (cut[:, 2] - cut[:, 0]).clamp(min=0) * (cut[:, 3] - cut[:, 1]).clamp(min=0)
        return 1.0 - area.to(torch.float32) / float(out_size * out_size)
    return torch.ones(lam.shape, dtype=torch.float32, device=lam.device)


def augment_mix_reference(src, index, crop, flip, partner, lam, cut, *, mode, out_size, views, shuffle=None):
    """The PyTorch reference (fp32 math, one F.interpolate per sample): CPU fallback and test oracle."""
    views = _views_spec(views)
    crops = crop.tolist()
    idx = index.tolist()
    flips = flip.tolist()
    # each sample's image: the source, or its ShufflePatches built explicitly
    images = src[index] if shuffle is None else shuffle_patches(src[index], shuffle)
    base = []
    for b in range(len(idx)):
        # the source pixels of sample b: its crop, resized and flipped
        top, left, h, w = crops[b]
        patch = images[b, :, top : top + h, left : left + w].float()[None]
        img = F.interpolate(patch, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False)[0]
        base.append(img.flip(-1) if flips[b] else img)
    x = mix_batch(torch.stack(base), partner, lam, cut, mode)
    out = []
    for mean, std, dtype in views:
        m = torch.tensor(mean, device=src.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=src.device).view(1, 3, 1, 1)
        out.append(((x / 255.0 - m) / s).to(dtype))
    return tuple(out), effective_lam(mode, lam, cut, out_size)


def augment_mix(src, index, crop, flip, partner, lam, cut, *, mode, out_size, views, shuffle=None, channels_last=False,
                check=True, backend=None):
    """(ShufflePatches,) crop, resize, flip, mix and normalise a batch from the image set `src` in one pass.

    Returns (tuple of one tensor per view, lam_eff float32 (B,)). See the module docstring.
    `shuffle`: None, or each sample's strip orders int64 (B, 2, factor) (sample_augment_params' "shuffle").
    `channels_last` writes the views in channels-last memory. `check=False` skips the range checks, which read the
    parameters on the host (a device sync): use it only for parameters from sample_augment_params. Out-of-range
    parameters are then undefined behaviour; the CUDA kernel writes NaN for such a sample rather than read outside
    `src`, the C++ CPU op still raises.
    """
    if check and torch.compiler.is_compiling():
        _check_shapes(src, index, crop, flip, partner, lam, cut, mode, out_size, shuffle)
        _assert_in_range(src, index, crop, partner, lam, cut, mode, out_size, shuffle)
    elif check:
        check_augment_args(src, index, crop, flip, partner, lam, cut, mode, out_size, shuffle)
    else:
        _check_shapes(src, index, crop, flip, partner, lam, cut, mode, out_size, shuffle)
    spec = _views_spec(views)
    name = _backend.choose("augment_mix", backend, src.device, _OFFERED)
    if name == "torch":
        out, _ = augment_mix_reference(src, index, crop, flip, partner, lam, cut, mode=mode, out_size=out_size, views=spec,
                                       shuffle=shuffle)
        if channels_last:
            out = tuple(v.contiguous(memory_format=torch.channels_last) for v in out)
    elif name == "triton" and not (src.device.type == "cuda" and _registrations.triton_serves_cuda()):
        # Triton beside the CUDA kernels, or in the interpreter: its launcher directly (the op's key is taken)
        from hello_fast.kernels import (
            augment_mix as kern,  # triton is an optional dependency
        )

        out = kern.augment_mix(src, index, crop, flip, partner, lam, cut, mode, int(out_size), spec, channels_last,
                               shuffle=shuffle)
    else:  # the op: the C++ kernel of the device, or Triton where it is the op's CUDA kernel
        mean = [m for v in spec for m in v[0]]
        std = [s for v in spec for s in v[1]]
        codes = [DTYPE_CODES[v[2]] for v in spec]
        out = torch.ops.hello_fast.augment_mix(src, index, crop, flip, partner, lam, cut, mode, int(out_size), mean, std,
                                               codes, bool(channels_last), shuffle)
    return tuple(out), effective_lam(mode, lam, cut, out_size)


def _beta(alpha: float, n: int, g: torch.Generator) -> np.ndarray:
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return np.random.default_rng(seed).beta(alpha, alpha, size=n)


def sample_augment_params(index, height: int, width: int, *, out_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                          flip_prob: float = 0.5, mode: str = "cutmix", alpha: float = 1.0, per_sample: bool = False,
                          generator: torch.Generator | None = None, groups: list[int] | None = None,
                          shuffle_factor: int = 1):
    """Draw crop, flip, partner, lam and cut (and shuffle) for a batch of images of size height x width.

    Crops follow torchvision's RandomResizedCrop (10 tries, then the centre-crop fallback);
    partner is a random permutation of the batch; lam ~ Beta(alpha, alpha) once per batch (the
    peers' practice) or per sample; a CutMix box has sides int(sqrt(1 - lam) * out_size) around a
    uniform centre, clipped to the image (`cutmix_box`; lam is corrected to the clipped area by augment_mix).
    Everything is drawn from `generator` (a CPU generator) and placed on `index.device`.
    `groups`: sizes of consecutive row groups that mix only among themselves (data-parallel ranks'
    shares of a global batch); None is one group, drawn exactly as before.
    `shuffle_factor` > 1: also RDED's ShufflePatches, a uniform order of the `shuffle_factor` row
    strips and of the column strips per image ("shuffle", int64 (B, 2, shuffle_factor)), drawn after
    everything else (the other parameters are those drawn without it); the crop is then a crop
    of the shuffled image (RDED: ShufflePatches before RandomResizedCrop).
    Returns a dict with crop, flip, partner, lam, cut (and shuffle).
    """
    if mode not in MODES:
        raise ValueError(f"sample_augment_params: mode must be one of {MODES}, got {mode!r}")
    if isinstance(shuffle_factor, bool) or not isinstance(shuffle_factor, int) or not (
            1 <= shuffle_factor <= min(MAX_SHUFFLE_FACTOR, height, width)):
        raise ValueError(f"sample_augment_params: shuffle_factor must be an int in [1, "
                         f"{min(MAX_SHUFFLE_FACTOR, height, width)}] for {height}x{width} images, got {shuffle_factor!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    B = index.shape[0]
    device = index.device
    area = height * width
    target = area * torch.empty(B, CROP_TRIES).uniform_(scale[0], scale[1], generator=g)
    aspect = torch.exp(torch.empty(B, CROP_TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g))
    h, w, ok = crop_try(target, aspect, height, width)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1))
    _, _, fh, fw = crop_fallback(height, width, ratio)
    rows = torch.arange(B)
    hh = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((B,), fh))
    ww = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((B,), fw))
    u = torch.rand(B, 2, generator=g)
    top = torch.where(first >= 0, (u[:, 0] * (height - hh + 1)).long().clamp(max=height - hh), (height - hh) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (width - ww + 1)).long().clamp(max=width - ww), (width - ww) // 2)
    crop = torch.stack([top, left, hh, ww], 1)
    flip = torch.rand(B, generator=g) < flip_prob
    if groups is None or len(groups) <= 1:
        partner = torch.randperm(B, generator=g)
    else:
        if sum(groups) != B:
            raise ValueError(f"sample_augment_params: groups {groups} do not add up to the batch of {B}")
        offsets = [sum(groups[:k]) for k in range(len(groups))]
        partner = torch.cat([torch.randperm(n, generator=g) + o for n, o in zip(groups, offsets)])
    if mode == "none":
        lam = torch.ones(B)
    else:
        lam = torch.from_numpy(_beta(alpha, B if per_sample else 1, g)).float().expand(B).contiguous()
    cut = torch.zeros(B, 4, dtype=torch.long)
    if mode == "cutmix":
        side = torch.sqrt(1 - lam)
        cut_len = (out_size * side).long()
        centre = (torch.rand(B if per_sample else 1, 2, generator=g) * out_size).long().expand(B, 2)
        cut = torch.stack(cutmix_box(centre[:, 0], centre[:, 1], cut_len, out_size), 1)
    out = {
        "crop": crop.to(device), "flip": flip.to(device), "partner": partner.to(device),
        "lam": lam.to(device), "cut": cut.to(device),
    }
    if shuffle_factor > 1:
        out["shuffle"] = torch.rand(B, 2, shuffle_factor, generator=g).argsort(-1).to(device)
    return out
