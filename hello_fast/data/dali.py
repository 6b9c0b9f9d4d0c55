"""NVIDIA DALI pipelines: decode and augment the original set's JPEGs on the GPU, and a DALI student-loop backend.

Three pipelines, each on the GPU (`device_id` an int: decoding `device="mixed"`) or the CPU
(`device_id=None`, for machines without a GPU):

- `train_pipeline`: file reader (the files in the given order) -> decode with a
  random-resized crop (torchvision's scale/ratio rule, 10 attempts) -> resize -> random flip ->
  uint8, or normalised when `mean`/`std` are given.
- `eval_pipeline`: decode -> resize the shorter side -> centre crop -> uint8 or normalised.
- `DaliDistilledSet`: the distilled set for the student loop, fed from memory: random-resized
  crop by the students' AugmentRecipe, flip, normalised for the student and for CLIP in one
  pass; CutMix/Mixup applied after by augment_mix's mix step, on the normalised views
  (normalisation is affine, so mixing after it equals mixing before).

`FolderBatches` is what the stages use (through `hello_fast.data.loader.batches` with a DataPass
whose loader is dali): the same contract as the torch loader — uint8 (B, 3, S, S) batches, labels
in the set's fixed class order, and the set indices — and the same per-(seed, epoch) order of
images and the same sharding (each rank its share of every global batch), with one
pipeline per epoch seeded by (seed, epoch) so that a resumed run sees the batches an
uninterrupted one would. The image check (hello_fast.data.validate) has left out the files that
could crash DALI's parser before a run's sets are made; a file DALI still cannot decode (bytes of
a format it lacks under an image name, a file changed since the check) is found (named by DALI,
re-checked, or by halving the suspect batches through DALI's decoder), named in a warning and its
slot taken by another image of the epoch (training; batches keep their shape and every rank its
step count) or dropped (evaluation); with `on_bad_image: error` it stops with an error naming it.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from hello_fast.data import validate
from hello_fast.data.resident import Batch, ResidentSet
from hello_fast.data.spec import AugmentRecipe, DataPass
from hello_fast.errors import HelloError
from hello_fast.ops.augment_mix import CROP_TRIES, effective_lam, mix_batch, shuffle_patches

# what DALI's image decoder reads (no GIF)
DALI_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".jp2")
_FAILED = re.compile(r"Failed to decode sample #\d+ : (.+?)\s*$", re.MULTILINE)


def available() -> bool:
    """True when nvidia.dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # an absent or broken install: the torch loader is used
        return False
    return True


def _require():
    if not available():
        raise HelloError("the dali loader needs NVIDIA DALI: pip install 'hello_fast[dali]' "
                         "(nvidia-dali-cuda130; nvidia-dali-cuda120 on CUDA 12), or use --loader torch")


def unsupported_files(files) -> list[str]:
    """The files DALI's decoder does not read (by extension)."""
    return [f for f in files if not f.lower().endswith(DALI_EXTENSIONS)]


def _device_id(device) -> int | None:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _normalize(images, mean, std, mirror):
    from nvidia.dali import fn, types

    kwargs = dict(output_layout="CHW", mirror=mirror)
    if mean is None:
        return fn.crop_mirror_normalize(images, dtype=types.UINT8, **kwargs)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, mean=[255.0 * m for m in mean],
                                    std=[255.0 * s for s in std], **kwargs)


def train_pipeline(files, indices, *, batch_size: int, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                   flip: bool = True, seed: int = 0, device_id=None, num_threads: int = 2, mean=None, std=None):
    """A built DALI pipeline over `files` in the given order; outputs (images CHW, index).

    `indices` travel with the files as the reader's labels (the set positions: the caller maps
    them to class labels). The last batch is padded with its last sample (the caller keeps the
    real rows). Sharding is the caller's: it gives each rank its own files (spec.rank_plan).
    """
    _require()
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        encoded, index = fn.readers.file(files=list(files), labels=[int(i) for i in indices], random_shuffle=False,
                                         pad_last_batch=True, name="reader")
        images = fn.decoders.image_random_crop(encoded, device="cpu" if device_id is None else "mixed",
                                               output_type=types.RGB, random_area=list(scale),
                                               random_aspect_ratio=list(ratio), num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5 if flip else 0.0)
        return _normalize(images, mean, std, mirror), index

    p = pipe()
    p.build()
    return p


def _torchvision_centre_crop(encoded, images, size: int, resize: int):
    """torchvision's eval geometry per sample: the shorter side to `resize` and the longer to
    int(resize * long / short), then the `size` crop at round((side - size) / 2) (half to even),
    or centred in zero padding where the image is smaller than the crop."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    shape = fn.peek_image_shape(encoded, dtype=types.INT64)
    h, w = shape[0], shape[1]
    tall = fn.cast(h > w, dtype=types.INT64)
    wide = 1 - tall
    new_h = wide * resize + tall * fn.cast(dmath.floor(resize * h / w), dtype=types.INT64)
    new_w = tall * resize + wide * fn.cast(dmath.floor(resize * w / h), dtype=types.INT64)
    images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       antialias=True)

    def anchor(d):  # d >= 0: Python's round(d / 2), halves to the even neighbour; d < 0: -((-d) // 2) of padding
        half = d // 2
        inside = half + (d - 2 * half) * (half - 2 * (half // 2))
        neg = fn.cast(d < 0, dtype=types.INT64)
        return (1 - neg) * inside - neg * ((0 - d) // 2)

    start = fn.cast(fn.stack(anchor(new_h - size), anchor(new_w - size)), dtype=types.FLOAT)
    extent = fn.cast(fn.stack(new_h * 0 + size, new_w * 0 + size), dtype=types.FLOAT)
    return fn.slice(images, start, extent, axes=[0, 1], normalized_anchor=False, normalized_shape=False,
                    out_of_bounds_policy="pad")


def eval_pipeline(files, indices, *, batch_size: int, size: int, resize: int | None = None, device_id=None,
                  num_threads: int = 2, mean=None, std=None):
    """A built DALI pipeline: resize the shorter side to `resize` (default size*256/224), centre-crop `size`.

    The geometry is torchvision's (`Resize(resize)` + `CenterCrop(size)`) to the pixel.
    """
    _require()
    from nvidia.dali import fn, pipeline_def, types

    resize = resize or int(round(size * 256 / 224))

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=2)
    def pipe():
        encoded, index = fn.readers.file(files=list(files), labels=[int(i) for i in indices], random_shuffle=False,
                                         pad_last_batch=True, name="reader")
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        images = _torchvision_centre_crop(encoded, images, size, resize)
        return _normalize(images, mean, std, False), index

    p = pipe()
    p.build()
    return p


def to_torch(tensor_list, device_id) -> torch.Tensor:
    """A DALI output batch as a torch tensor (on the pipeline's device)."""
    if device_id is None:
        return torch.from_numpy(np.array(tensor_list.as_tensor()))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tensor_list.as_tensor()
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=torch.device("cuda", device_id))
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


def _decodes(files: list[str], device_id, num_threads: int) -> bool:
    """True when DALI's decoder (on the pass's device) decodes every one of `files` in one batch."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(files), num_threads=num_threads, device_id=device_id, seed=0, prefetch_queue_depth=1)
    def pipe():
        encoded, _ = fn.readers.file(files=list(files), labels=list(range(len(files))), random_shuffle=False)
        return fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)

    p = pipe()
    p.build()
    try:
        p.run()
    except RuntimeError:
        return False
    finally:
        del p
    return True


def undecodable(files: list[str], *, device_id=None, num_threads: int = 2) -> list[int]:
    """The positions in `files` that DALI's decoder refuses, found by halving failing groups (about 2 log2(n) pipelines per file).

    For files the image check passed (hello_fast.data.validate): a file it has not seen can take
    the process down inside DALI's parser.
    """
    _require()
    bad, groups = [], [list(range(len(files)))] if files else []
    while groups:
        group = groups.pop()
        if _decodes([files[k] for k in group], device_id, num_threads):
            continue
        if len(group) == 1:
            bad.append(group[0])
            continue
        half = len(group) // 2
        groups += [group[half:], group[:half]]
    return sorted(bad)


class FolderBatches:
    """(uint8 images, labels, indices) batches of a file image set through DALI; `len()` is the number of batches.

    `plan`: this process's batches of set indices (hello_fast.data.spec.rank_plan: every global batch,
    or under a sharded pass this rank's share of each, as the torch loader reads them). One pipeline
    reads the plan's images in order with a batch of the plan's first (largest) batch; the last,
    shorter batch is padded by DALI's reader and cut back here.
    """

    def __init__(self, images, plan: list[list[int]], data_pass: DataPass, *, train: bool, seed: int, device):
        _require()
        bad = unsupported_files(images.files)
        if bad:
            raise HelloError(f"the dali loader cannot decode {bad[0]} ({len(bad)} such files; DALI reads "
                             f"{', '.join(DALI_EXTENSIONS)}): use --loader torch")
        self.images, self.train = images, train
        self.device_id = _device_id(device)
        self.threads = data_pass.threads
        self.batches = len(plan)
        self.batch_size = len(plan[0]) if plan else 1
        self.order = [i for batch in plan for i in batch]
        self.kw = dict(size=data_pass.image_size, device_id=self.device_id, num_threads=self.threads)
        if train:
            self.kw.update(scale=data_pass.scale, ratio=data_pass.ratio, flip=data_pass.flip, seed=seed % (2**31 - 1))
        else:
            self.kw.update(resize=data_pass.eval_resize)

    def __len__(self):
        return self.batches

    def _plan(self, order: list[int]) -> list[int]:
        """This epoch's list with known-bad images taken out: replaced (training) or dropped (evaluation)."""
        bad = self.images.bad
        if not bad:
            return order
        good = [i for i in order if i not in bad]
        if not good:
            raise HelloError("every image of this pass failed to decode")
        if not self.train:
            return good
        return [i if i not in bad else good[k % len(good)] for k, i in enumerate(order)]

    def _build(self, order):
        make = train_pipeline if self.train else eval_pipeline
        return make([self.images.files[i] for i in order], order, batch_size=self.batch_size, **self.kw)

    def _culprits(self, err: Exception, remaining: list[int]) -> list[int]:
        """The images behind a failed batch: named by DALI, else found among this batch and the prefetched ones."""
        named = {os.path.abspath(m) for m in _FAILED.findall(str(err))}
        found = sorted({i for i in remaining if os.path.abspath(self.images.files[i]) in named})
        suspects = remaining[: 3 * self.batch_size]
        if not found:  # the image check's verdict, taken now (a file changed since the run's check, or never checked)
            found = sorted({i for i in suspects if validate.image_error(self.images.files[i]) is not None})
        if not found:  # a file PIL reads but DALI does not (GIF or ICO bytes under a .jpg name): ask DALI, halving
            bad = undecodable([self.images.files[i] for i in suspects], device_id=self.device_id, num_threads=self.threads)
            found = sorted(suspects[k] for k in bad)
        return found

    def __iter__(self):
        mine = self._plan(self.order)
        pipe = self._build(mine)
        done, total, emitted = 0, len(mine), 0
        limit = len(self)
        labels = self.images.labels
        while done < total and emitted < limit:
            try:
                out_images, out_index = pipe.run()
            except RuntimeError as err:
                culprits = self._culprits(err, mine[done:])
                if not culprits:
                    raise HelloError(f"DALI failed on the batch starting at {self.images.files[mine[done]]}: {err}") from None
                for i in culprits:
                    self.images.report_bad(i, "DALI could not decode it")
                rest = self._plan(mine[done:])
                mine = mine[:done] + rest
                total = len(mine)
                if done >= total:
                    break
                del pipe
                pipe = self._build(rest)  # the remaining images of this plan
                continue
            take = min(self.batch_size, total - done)
            x = to_torch(out_images, self.device_id)[:take]
            index = torch.from_numpy(np.array(out_index.as_tensor())).reshape(-1)[:take].long()
            done += take
            emitted += 1
            yield x, labels[index], index


class DaliDistilledSet:
    """The student loop's distilled set augmented by a DALI pipeline (an alternative to ResidentSet).

    Same interface as ResidentSet (`recipe`, `epoch_order`, `draw`, `my_share`, `make`): the batch
    indices and the CutMix/Mixup parameters come from the set's generator by the recipe (the one box
    rule, augment_mix.cutmix_box) and are applied by augment_mix's mix step (`mix_batch`); crops and
    flips are drawn by DALI's random_resized_crop with the recipe's scale, ratio and flip (DALI's
    operator draws them on its own: the crops cannot follow augment_mix.crop_try), its pipeline
    rebuilt every epoch with a seed from that generator (so a resumed run repeats an uninterrupted
    one). Stored-label replay needs the exact crops: it uses ResidentSet. With shuffle_factor > 1
    RDED's ShufflePatches orders are drawn with the mix parameters and applied to the images
    (augment_mix's rule, a gather on the device) before DALI crops them.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device, recipe: AugmentRecipe, seed: int = 0, *,
                 batch_size: int, views, num_threads: int = 2):
        _require()
        # index stream, mix parameters and ShufflePatches orders
        self.resident = ResidentSet(images, labels, device, recipe, seed)
        self.recipe = recipe
        self.generator = self.resident.generator
        self.device = self.resident.device
        self.device_id = _device_id(self.device)
        self.hwc = self.resident.images.permute(0, 2, 3, 1).contiguous()
        self.labels = self.resident.labels
        self.batch_size = batch_size
        self.views = [(tuple(m), tuple(s), dt) for m, s, dt in views]
        self.threads = num_threads
        self.pipe = None

    def __len__(self):
        return len(self.resident)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.resident.steps_per_epoch(batch_size)

    def _build(self, seed: int):
        from nvidia.dali import fn, pipeline_def, types

        device = "cpu" if self.device_id is None else "gpu"
        r = self.recipe

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id, seed=seed,
                      prefetch_queue_depth=1)
        def pipe():
            images = fn.external_source(name="images", device=device, layout="HWC", dtype=types.UINT8)
            crops = fn.random_resized_crop(images, size=[r.out_size, r.out_size], random_area=list(r.scale),
                                           random_aspect_ratio=list(r.ratio), num_attempts=CROP_TRIES, antialias=False,
                                           interp_type=types.INTERP_LINEAR)
            mirror = fn.random.coin_flip(probability=r.flip_prob)
            return tuple(_normalize(crops, m, s, mirror) for m, s, _ in self.views)

        p = pipe()
        p.build()
        return p

    def epoch_order(self, batch_size: int) -> list[torch.Tensor]:
        order = self.resident.epoch_order(batch_size)
        self.pipe = self._build(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        return order

    def draw(self, index) -> dict:
        params = self.resident.draw(index)
        return {k: params[k] for k in ("partner", "lam", "cut", "shuffle") if k in params}

    my_share = staticmethod(ResidentSet.my_share)

    def make(self, index, params: dict, *, views, channels_last: bool = False, backend=None, check: bool = False):
        if self.pipe is None:
            raise RuntimeError("DaliDistilledSet.make before epoch_order")
        rows = self.hwc[index]
        if "shuffle" in params:
            rows = shuffle_patches(rows.permute(0, 3, 1, 2), params["shuffle"]).permute(0, 2, 3, 1).contiguous()
        self.pipe.feed_input("images", [rows[i] for i in range(rows.shape[0])] if self.device_id is not None
                             else [r.numpy() for r in rows.cpu()])
        outs = [to_torch(o, self.device_id).to(self.device) for o in self.pipe.run()]
        partner, lam, cut = params["partner"], params["lam"], params["cut"]
        mix, out_size = self.recipe.mix, self.recipe.out_size
        out = []
        for v, (_, _, dtype) in zip(outs, views):
            v = mix_batch(v, partner, lam, cut, mix).to(dtype)
            out.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
        return Batch(tuple(out), self.labels[index], partner, effective_lam(mix, lam, cut, out_size), index, params)
