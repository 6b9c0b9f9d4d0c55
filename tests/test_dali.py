"""The DALI pipelines against the torch path: a generated JPEG folder, CPU pipelines (GPU tier when CUDA is present)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import gpu, tiny_sets

pytest.importorskip("nvidia.dali")

from hello_fast.data import dali  # noqa: E402
from hello_fast.data.loader import batches  # noqa: E402
from hello_fast.data.sources import FileImageSet, procedural_images  # noqa: E402
from hello_fast.data.spec import AugmentRecipe, DataPass, rank_plan  # noqa: E402
from hello_fast.errors import HelloError  # noqa: E402
from hello_fast.ops.augment_mix import effective_lam  # noqa: E402


def _write_folder(root, classes=3, per_class=8, size=64, seed=1, sizes=True):
    """An ImageNet-style folder of JPEGs of varied sizes (portrait and landscape); class folders out of alphabetical creation order."""
    from PIL import Image

    images, labels = procedural_images(classes, per_class, size, seed=seed)
    names = [f"class_{c}" for c in range(classes)][::-1]
    for i, (img, label) in enumerate(zip(images, labels.tolist())):
        d = os.path.join(root, names[label])
        os.makedirs(d, exist_ok=True)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        if sizes:
            pil = pil.resize((size + 7 * (i % 5), size + 5 * (i % 4) - 4 * (i % 3)), Image.BILINEAR)
        pil.save(os.path.join(d, f"img_{i:03d}.jpg"), quality=95)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = _write_folder(str(tmp_path_factory.mktemp("jpegs")))
    files = _files_of(root)
    classes = sorted(os.listdir(root))
    labels = [classes.index(os.path.basename(os.path.dirname(f))) for f in files]
    return FileImageSet(files, labels, classes)


# batches()' keywords that belong to the DataPass, by their DataPass name
_PASS = {"size": "image_size", "scale": "scale", "ratio": "ratio", "flip": "flip", "eval_resize": "eval_resize",
         "num_workers": "workers", "sharded": "sharded"}


def _pass(loader, kw):
    """A DataPass from the pass keywords in `kw` (removed from it)."""
    return DataPass(loader=loader, **{_PASS[k]: kw.pop(k) for k in list(kw) if k in _PASS})


def _all(loader, images, **kw):
    out = list(batches(images, _pass(loader, kw), **kw))
    return torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out]), torch.cat([b[2] for b in out]), out


def test_train_batches_match_the_torch_path(folder):
    """Same batch count and sizes, dtype, image order and labels as torch; pixel statistics within tolerance."""
    kw = dict(size=32, batch_size=5, train=True, seed=7, epoch=3, scale=(0.3, 1.0))
    tx, tl, ti, tb = _all("torch", folder, **kw)
    dx, dl, di, db = _all("dali", folder, **kw)
    assert [b[0].shape for b in db] == [b[0].shape for b in tb]
    assert dx.dtype == torch.uint8 and dx.shape[1:] == (3, 32, 32)
    assert torch.equal(di, ti)  # the same per-(seed, epoch) order of images
    assert torch.equal(dl, tl) and torch.equal(dl, folder.labels[di])  # labels in the set's class order
    t, d = tx.float() / 255, dx.float() / 255
    assert torch.allclose(t.mean((0, 2, 3)), d.mean((0, 2, 3)), atol=0.03)
    assert torch.allclose(t.std((0, 2, 3)), d.std((0, 2, 3)), atol=0.03)
    # another epoch reorders; the same epoch repeats exactly (a resumed run sees the same batches)
    assert not torch.equal(_all("dali", folder, **{**kw, "epoch": 4})[2], di)
    assert torch.equal(_all("dali", folder, **kw)[0], dx)


def test_normalisation_in_the_pipeline(folder):
    """mean/std given: the pipeline's float output is ((x/255 - mean)/std) of its own uint8 output."""
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    files, idx = folder.files[:6], list(range(6))
    outs = []
    for m, s in ((None, None), (mean, std)):
        p = dali.train_pipeline(files, idx, batch_size=6, size=24, seed=5, mean=m, std=s)
        outs.append(dali.to_torch(p.run()[0], None))
    raw, norm = outs
    assert raw.dtype == torch.uint8 and norm.dtype == torch.float32
    want = (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size, resize", [(48, 55), (40, 40), (33, None), (70, 64)])
def test_eval_centre_crop_matches_torchvision(folder, size, resize):
    """Resize the shorter side + centre crop (zero-padded when the crop is larger): torchvision's geometry to the pixel."""
    tx, tl, ti, _ = _all("torch", folder, size=size, batch_size=7, train=False, eval_resize=resize)
    dx, dl, di, _ = _all("dali", folder, size=size, batch_size=7, train=False, eval_resize=resize)
    assert torch.equal(di, ti) and torch.equal(dl, tl)
    diff = (tx.float() - dx.float()).abs()
    assert diff.mean() < 0.6 and diff.max() <= 8, (diff.mean(), diff.max())


@pytest.mark.parametrize("train", [True, False])
def test_sharding_is_each_ranks_share_of_every_global_batch(folder, train, monkeypatch):
    """A sharded pass means the same for DALI as for the torch loader: each rank of a 3-way run reads its share of every
    global batch, in order, so the ranks' batches put together are the single process's batches."""
    from hello_fast import distributed

    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))
    single = rank_plan(order, 7, drop_last=False, sharded=True)  # one process: the global batches
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda r=rank: distributed.World(rank=r, size=3, local_rank=r))
        plan = rank_plan(order, 7, drop_last=False, sharded=True)
        b = dali.FolderBatches(folder, plan, DataPass(16, loader="dali", workers=1, sharded=True), train=train, seed=0,
                               device="cpu")
        got = [x[2].tolist() for x in b]
        assert got == plan and len(got) == len(b)
        shares.append(got)
        torch_batches = [x[2].tolist() for x in batches(folder, DataPass(16, loader="torch", sharded=True), train=train,
                                                        batch_size=7, indices=order, shuffle=False)]
        assert torch_batches == plan
    assert [sum((s[k] for s in shares), []) for k in range(len(single))] == single


def _broken_folder(tmp_path):
    root = _write_folder(str(tmp_path / "data"), per_class=5, size=40)
    victim = os.path.join(root, "class_1", sorted(os.listdir(os.path.join(root, "class_1")))[2])
    with open(victim, "rb") as f:
        data = f.read()
    with open(victim, "wb") as f:
        f.write(data[: len(data) // 3])  # truncated mid-scan
    return root, victim


def _files_of(root):
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)


def test_a_corrupt_jpeg_is_named_and_skipped(tmp_path):
    root, victim = _broken_folder(tmp_path)
    files = _files_of(root)
    train = FileImageSet(files, [int("class_1" in f) for f in files], ["other", "class_1"])
    bad = files.index(victim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, labels, index, out = _all("dali", train, size=16, batch_size=4, train=True, seed=0)
    named = [str(w.message) for w in caught if victim in str(w.message)]
    assert len(named) == 1 and bad not in index.tolist()
    assert len(index) == len(train) and [len(b[2]) for b in out] == [4, 4, 4, 3]  # its slot went to another image
    assert torch.equal(labels, train.labels[index])
    # later epochs leave it out from the start, without another warning; evaluation drops it
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _, _, index2, _ = _all("dali", train, size=16, batch_size=4, train=True, seed=0, epoch=2)
        _, _, index3, _ = _all("dali", train, size=16, batch_size=4, train=False)
    assert not [w for w in again if victim in str(w.message)] and bad not in index2.tolist()
    assert sorted(index3.tolist()) == [i for i in range(len(files)) if i != bad]


def test_a_corrupt_jpeg_stops_the_pass_when_asked(tmp_path):
    root, victim = _broken_folder(tmp_path)
    files = _files_of(root)
    images = FileImageSet(files, [0] * len(files), ["x"], on_bad_image="error")
    with pytest.raises(HelloError, match=os.path.basename(victim)):
        _all("dali", images, size=16, batch_size=4, train=False)


def test_a_file_the_check_passes_but_dali_cannot_decode_is_found_by_halving(tmp_path):
    """The recovery path for what the image check cannot foresee: GIF bytes under a .jpg name (PIL reads them, DALI
    does not, and DALI's error names no file) are found by halving the suspect batches through DALI's decoder."""
    from PIL import Image

    from hello_fast.data.validate import image_error

    root = _write_folder(str(tmp_path / "data"), classes=2, per_class=6, size=32)
    files = _files_of(root)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    victim = files[int(torch.randint(0, len(files), (1,), generator=torch.Generator().manual_seed(seed)))]
    Image.open(victim).convert("RGB").save(victim, format="GIF")
    assert image_error(victim) is None  # a readable image: the check keeps it (the torch loader reads it)
    assert dali.undecodable(files) == [files.index(victim)], seed
    images = FileImageSet(files, [int("class_1" in f) for f in files], ["class_0", "class_1"])
    named = []
    for train in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, labels, index, _ = _all("dali", images, size=16, batch_size=4, train=train, seed=seed)
        named.append(sum(victim in str(w.message) for w in caught))
        assert files.index(victim) not in index.tolist(), seed
        assert torch.equal(labels, images.labels[index])
        assert len(index) == len(files) - (not train)  # training: its slot taken by another image; evaluation: dropped
    assert named == [1, 0] and images.bad == {files.index(victim)}  # named once, then left out quietly


def test_loader_choice_is_checked(folder):
    from hello_fast.data.loader import resolve_loader
    from hello_fast.data.sources import TensorImageSet

    mem = TensorImageSet(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2), ["a"])
    assert resolve_loader("auto", folder) == "dali" and resolve_loader("auto", mem) == "torch"
    with pytest.raises(HelloError, match="--loader torch"):
        resolve_loader("dali", mem)
    gif = FileImageSet([folder.files[0][:-4] + ".gif"], [0], ["a"])
    assert resolve_loader("auto", gif) == "torch"
    with pytest.raises(HelloError, match=r"\.gif"):
        list(batches(gif, DataPass(8, loader="dali"), batch_size=1, train=False))


def test_mixing_after_normalisation_is_augment_mix_semantics(rng):
    """augment_mix's mix step on normalised views (the DALI backend's order) equals normalising augment_mix's mixed
    output (CutMix box, Mixup weights)."""
    from hello_fast.ops import augment_mix, sample_augment_params
    from hello_fast.ops.augment_mix import mix_batch

    src = torch.randint(0, 256, (6, 3, 20, 23), dtype=torch.uint8, generator=rng)
    index = torch.randperm(6, generator=rng)[:5]
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    for mode in ("cutmix", "mixup", "none"):
        p = sample_augment_params(index, 20, 23, out_size=17, mode=mode, generator=rng)
        want, lam = augment_mix(src, index, **p, mode=mode, out_size=17, views=[(mean, std, torch.float32)], backend="torch")
        plain, _ = augment_mix(src, index, **{**p, "partner": torch.arange(5)}, mode="none", out_size=17,
                               views=[(mean, std, torch.float32)], backend="torch")
        got = mix_batch(plain[0], p["partner"], p["lam"], p["cut"], mode)
        torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(effective_lam(mode, p["lam"], p["cut"], 17), lam, atol=1e-6, rtol=0)


def test_dali_distilled_set_batches():
    """The student-loop DALI backend: both views at the right shape and statistics, labels and lam_eff; epochs repeat from the seed."""
    from hello_fast.data.resident import ResidentSet
    from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD

    images, labels = procedural_images(4, 5, 24)
    clip = ((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))
    views = [(IMAGENET_MEAN, IMAGENET_STD, torch.float32), (*clip, torch.float32)]

    def epoch(seed):
        s = dali.DaliDistilledSet(images, labels, "cpu", AugmentRecipe(16), seed, batch_size=8, views=views)
        out = []
        for index in s.epoch_order(8):
            out.append(s.make(index, s.draw(index), views=views))
        return out

    a, b = epoch(3), epoch(3)
    assert [x.views[0].shape[0] for x in a] == [8, 8, 4]
    for x, y in zip(a, b):
        assert torch.equal(x.views[0], y.views[0]) and torch.equal(x.index, y.index)
        assert torch.equal(x.hard, labels[x.index]) and x.views[1].shape == (x.index.numel(), 3, 16, 16)
        assert ((x.lam > 0) & (x.lam <= 1)).all()
        # the two views are the same pixels under two normalisations
        m0, s0 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        m1, s1 = torch.tensor(clip[0]).view(1, 3, 1, 1), torch.tensor(clip[1]).view(1, 3, 1, 1)
        torch.testing.assert_close(x.views[0] * s0 + m0, x.views[1] * s1 + m1, atol=1e-4, rtol=0)
    # pixel statistics match the resident path's (same crops rule, different draws)
    plain = AugmentRecipe(16, mix="none")
    r = ResidentSet(images, labels, "cpu", plain, seed=3)
    ref = []
    for _ in range(6):
        for index in r.epoch_order(8):
            ref.append(r.make(index, r.draw(index), views=views).views[0])
    s = dali.DaliDistilledSet(images, labels, "cpu", plain, 0, batch_size=8, views=views)
    got = []
    for _ in range(6):
        for index in s.epoch_order(8):
            got.append(s.make(index, s.draw(index), views=views).views[0])
    ref, got = torch.cat(ref), torch.cat(got)
    assert torch.allclose(ref.mean((0, 2, 3)), got.mean((0, 2, 3)), atol=0.08)
    assert torch.allclose(ref.std((0, 2, 3)), got.std((0, 2, 3)), atol=0.08)


def test_student_trains_with_the_dali_backend(tmp_path):
    """student.augment=dali: the student learns like the fused path does on the same small data."""
    from conftest import tiny_config

    from hello_fast.data.sources import TensorImageSet
    from hello_fast.labels import HardLabels
    from hello_fast.stages.student import train_student

    images, labels = procedural_images(3, 12, 32, seed=4)
    val_x, val_y = procedural_images(3, 10, 32, seed=5)
    distilled = TensorImageSet(images, labels, ["a", "b", "c"])
    val = TensorImageSet(val_x, val_y, ["a", "b", "c"])
    results = {}
    for augment in ("fused", "dali"):
        cfg = tiny_config("student.epochs=8", "student.batch_size=9", "student.width=16", "student.lr=0.003",
                          "student.eval_every=2", f"student.augment={augment}")
        out = tmp_path / augment
        out.mkdir()
        results[augment] = train_student(cfg, distilled, val, HardLabels(len(distilled)), torch.device("cpu"), str(out))
    assert results["fused"]["top1_best"] > 60 and results["dali"]["top1_best"] > 60  # chance: 33%
    assert abs(results["dali"]["top1_best"] - results["fused"]["top1_best"]) <= 25


def test_distill_on_a_folder_with_the_dali_loader(tmp_path):
    """`hello-fast distill --data DIR --loader dali --device cpu` runs end to end and says which loader it used."""
    root = str(tmp_path / "data")
    for split, seed in (("train", 1), ("val", 2)):
        _write_folder(os.path.join(root, split), per_class=8 if split == "train" else 3, size=40, seed=seed)
    args = [sys.executable, "-m", "hello_fast", "distill", "--data", root, "--loader", "dali", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--quiet", *tiny_sets(drop=("data.source", "data.procedural"))]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loader: dali" in out.stderr
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert set(results["students"]) == {"hard", "teacher", "projector"}
    cfg = open(tmp_path / "run" / "config.yaml").read()
    assert "loader: dali" in cfg
    assert results["stages"]["teachers"]["top1"]  # the teachers were evaluated on the DALI eval pipeline


# -- GPU tier: the mixed (nvJPEG) decoder and GPU operators ------------------------------------------------------------


@gpu
def test_gpu_pipelines_match_the_cpu_ones(folder):
    tx, tl, ti, _ = _all("dali", folder, size=40, batch_size=7, train=False)
    gx, gl, gi, _ = _all("dali", folder, size=40, batch_size=7, train=False, device="cuda")
    assert gx.is_cuda and torch.equal(gi.cpu(), ti) and torch.equal(gl.cpu(), tl)
    assert (gx.cpu().float() - tx.float()).abs().mean() < 1.5  # nvJPEG vs libjpeg-turbo IDCT
    x, _, idx, _ = _all("dali", folder, size=32, batch_size=5, train=True, seed=1, device="cuda")
    assert x.is_cuda and x.shape == (len(folder), 3, 32, 32) and sorted(idx.tolist()) == list(range(len(folder)))


@gpu
def test_gpu_dali_distilled_set():
    images, labels = procedural_images(3, 4, 24)
    views = [((0.5,) * 3, (0.25,) * 3, torch.bfloat16)]
    s = dali.DaliDistilledSet(images, labels, "cuda", AugmentRecipe(16, mix="mixup"), 0, batch_size=6, views=views)
    for index in s.epoch_order(6):
        b = s.make(index, s.draw(index), views=views)
        assert b.views[0].is_cuda and b.views[0].dtype == torch.bfloat16 and np.isfinite(b.views[0].float().cpu().numpy()).all()
