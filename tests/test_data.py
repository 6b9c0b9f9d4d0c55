"""The original image sets: digits, procedural images, ImageNet-style folders, and the deterministic loaders."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hello_fast.config import load_config
from hello_fast.data.loader import batches, eval_transform, random_resized_crop_box
from hello_fast.data.sources import digits_splits, folder_splits, load_splits, procedural_images
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
    import shutil

    shutil.rmtree(root / "val")
    train, val = folder_splits(str(root), 0.25, "skip")
    assert len(train) == 9 and len(val) == 3
    assert not set(train.files) & set(val.files)


def test_unreadable_image_is_skipped_with_its_name(tmp_path):
    root = _write_folder(tmp_path, per_class=3)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    train, _ = folder_splits(str(root), 0.2, "skip")
    with pytest.warns(RuntimeWarning, match="1.png"):
        got = [b for b in batches(train, size=16, batch_size=4, train=False)]
    assert sum(len(b[1]) for b in got) == len(train) - 1
    train_err, _ = folder_splits(str(root), 0.2, "error")
    with pytest.raises(HelloError, match="dog/1.png"):
        list(batches(train_err, size=16, batch_size=4, train=False))


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
    kw = dict(size=24, batch_size=64, train=True, seed=3, epoch=2)
    a = [b for b in batches(train, **kw)]
    b = [b for b in batches(train, num_workers=2, **kw)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    c = next(iter(batches(train, **dict(kw, epoch=3))))
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
