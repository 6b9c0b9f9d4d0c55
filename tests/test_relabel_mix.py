"""RelabelMix: the same views and soft labels as the plain reference path, timm's Mixup semantics, and a timm loop that trains."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import gpu

from hello_fast import RelabelMix, RelabelMixLoss
from hello_fast.errors import HelloError
from hello_fast.models.clip import load_clip
from hello_fast.models.students import IMAGENET_MEAN, IMAGENET_STD
from hello_fast.ops import augment_mix_reference, soft_label_loss_reference
from hello_fast.ops.augment_mix import cutmix_box
from hello_fast.projector.model import build_projector
from hello_fast.relabel import Relabeler

MIXES = {  # RelabelMix options per mixing recipe
    "mixup": dict(mixup_alpha=1.0, cutmix_alpha=0.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "minmax": dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.7),
}


@pytest.fixture(scope="module")
def projector():
    """A tiny CLIP projector with non-zero LoRA adapters (5 classes, 32 px), unmerged fp32: the reference labeler."""
    g = torch.Generator().manual_seed(0)
    backbone = load_clip("hello-tiny-rn", None, 0)
    head = F.normalize(torch.randn(5, backbone.model.visual.output_dim, generator=g), dim=-1)
    p = build_projector(backbone, [f"c{i}" for i in range(5)], ["{}"], conv_rank=2, head_rank=3, head_weight=head)
    with torch.no_grad():
        for _, m in p.lora_modules():
            m.lora_b.normal_(std=0.05, generator=g)
    meta = {"class_names": [f"c{i}" for i in range(5)], "image_size": backbone.image_size,
            "mean": list(backbone.mean), "std": list(backbone.std)}
    return p.eval(), meta


def _teachers(seed=0, classes=5):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, classes)).eval() for _ in range(2)]


def _images(rng, B=6, H=40):
    return torch.randint(0, 256, (B, 3, H, H), dtype=torch.uint8, generator=rng)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("labeler", ["relabeler", "teachers"])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_same_views_and_labels_as_the_reference_path(projector, rng, mode, mix, labeler, device):
    """One RelabelMix call == drawn parameters -> augment_mix_reference -> the labeler on the mixed images."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    images = _images(rng)
    if labeler == "relabeler":
        proj, meta = projector
        lab = Relabeler(proj, meta, device=device)
        label_view = (tuple(meta["mean"]), tuple(meta["std"]), torch.float32)

        def reference_labels(view):
            with torch.no_grad():
                return proj(view)  # the caller's unmerged fp32 projector
    else:
        lab = [t.to(device) for t in _teachers()]
        label_view = (IMAGENET_MEAN, IMAGENET_STD, torch.float32)

        def reference_labels(view):
            with torch.no_grad():
                return sum(t.cpu()(view) for t in _teachers()) / 2
    options = dict(MIXES[mix], mode=mode, out_size=32, scale=(0.3, 1.0))
    rm = RelabelMix(lab, seed=seed, device=device, **options)
    x, soft = rm(images)
    params, kind = RelabelMix(lab, seed=seed, device=device, **options).draw(6, 40, 40, 32)
    student_view = (IMAGENET_MEAN, IMAGENET_STD, torch.float32)
    (ref_x, ref_label_view), lam = augment_mix_reference(images, torch.arange(6), **params, mode=kind, out_size=32,
                                                         views=[student_view, label_view])
    assert rm.kind == kind and torch.equal(rm.partner.cpu(), torch.arange(5, -1, -1))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and soft.shape == (6, 5) and soft.dtype == torch.float32
    assert torch.allclose(x.cpu(), ref_x, atol=2e-3), (x.cpu() - ref_x).abs().max()
    assert torch.allclose(rm.lam.cpu(), lam, atol=1e-6)
    tol = 5e-2 if device == "cuda" else 2e-3  # bf16 relabeler on a GPU
    want = reference_labels(ref_label_view)
    assert torch.allclose(soft.cpu(), want, rtol=tol, atol=tol), (soft.cpu() - want).abs().max()


def _timm_mixup_with(monkeypatch, params, kind, mode, mix):
    """timm's own Mixup, its random draws replaced by RelabelMix's (lambda, kind, boxes); everything else is timm's."""
    mixup_mod = pytest.importorskip("timm.data.mixup")
    lam, cut = params["lam"].numpy().astype(np.float32), params["cut"].numpy()
    B = lam.shape[0]
    units = {"batch": [0], "pair": list(range(B // 2)), "elem": list(range(B))}[mode]
    use_cutmix = kind == "cutmix"
    boxes = iter([cut[i] for i in units if lam[i] != 1])

    def box(*args, **kwargs):
        t, left, b, r = next(boxes)
        return t, b, left, r

    monkeypatch.setattr(mixup_mod, "rand_bbox", box)
    monkeypatch.setattr(mixup_mod, "rand_bbox_minmax", box)
    monkeypatch.setattr(mixup_mod.Mixup, "_params_per_batch", lambda self: (float(lam[0]), use_cutmix))
    monkeypatch.setattr(mixup_mod.Mixup, "_params_per_elem",
                        lambda self, n: (lam[units][:n].copy(), np.full(n, use_cutmix)))
    return mixup_mod.Mixup(**{k: v for k, v in MIXES[mix].items()}, mode=mode, label_smoothing=0.0, num_classes=5)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixing_follows_timms_mixup(monkeypatch, rng, mode, mix):
    """With identity crops, RelabelMix's images and mixed targets are timm's Mixup's for the same lambdas and boxes."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    images, target = _images(rng, B=8, H=24), torch.randint(0, 5, (8,), generator=rng)
    # mean 0, std 1/255: the student's view is the mixed image on the 0-255 scale
    options = dict(MIXES[mix], mode=mode, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mean=(0, 0, 0), std=(1 / 255,) * 3)
    rm = RelabelMix(_teachers(), seed=seed, **options)
    shadow = RelabelMix(_teachers(), seed=seed, **options)  # the same generators: draws what rm draws
    for _ in range(3):  # a few batches: mixed and unmixed draws alike
        params, kind = shadow.draw(8, 24, 24)
        x, _soft = rm(images)
        with monkeypatch.context() as m:
            mixup = _timm_mixup_with(m, params, kind, mode, mix)
            x_timm, y_timm = mixup(images.float(), target)
        assert torch.allclose(x, x_timm, atol=1e-3), (x - x_timm).abs().max()
        assert torch.allclose(rm.mixed_target(target, 5), y_timm, atol=1e-6)


class _Scripted:
    """A stand-in for a numpy Generator whose `integers` returns scripted values, in call order."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, low, high=None, size=None):
        return np.asarray(self.values.pop(0))


@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)])
def test_boxes_follow_timms_rules(monkeypatch, rng, minmax):
    """For the same random integers, RelabelMix's CutMix boxes are timm's rand_bbox_minmax boxes, and the package's one box
    rule (augment_mix.cutmix_box, which the student loop draws with): timm's rand_bbox wherever the side is even (for
    odd sides current timm ends the box one pixel further, cy + (side + 1) // 2)."""
    mixup_mod = pytest.importorskip("timm.data.mixup")
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    r = np.random.default_rng(seed)
    S, n = 37, 64
    lam = r.uniform(0, 1, n)
    if minmax is None:
        scripted = [r.integers(0, S, n), r.integers(0, S, n)]  # centres y, x
    else:
        ch, cw = r.integers(int(S * 0.2), int(S * 0.8), n), r.integers(int(S * 0.2), int(S * 0.8), n)
        scripted = [ch, cw, r.integers(0, S - ch + 1), r.integers(0, S - cw + 1)]
    rm = RelabelMix(_teachers(), mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=minmax)
    rm._rng = _Scripted(scripted)
    ours = rm._boxes(n, lam, S)
    if minmax is None:  # timm draws one scalar box per call
        theirs = []
        for i in range(n):
            calls = iter([scripted[0][i], scripted[1][i]])
            monkeypatch.setattr(mixup_mod.np.random, "randint", lambda *a, **k: next(calls))
            theirs.append(mixup_mod.rand_bbox((3, S, S), lam[i]))
        yl, yh, xl, xh = np.array(theirs).T
        side = (S * np.sqrt(1.0 - lam)).astype(np.int64)
        assert np.array_equal(ours, np.stack(cutmix_box(scripted[0], scripted[1], side, S), 1))
        even = side % 2 == 0
        assert even.any() and (~even).any()
        assert np.array_equal(ours[even], np.stack([yl, xl, yh, xh], 1)[even])
    else:
        calls = iter(scripted)
        monkeypatch.setattr(mixup_mod.np.random, "randint", lambda *a, **k: next(calls))
        yl, yh, xl, xh = mixup_mod.rand_bbox_minmax((3, S, S), minmax, count=n)
        assert np.array_equal(ours, np.stack([yl, xl, yh, xh], 1))


def test_draws_follow_timms_probabilities(rng):
    """prob, switch_prob, pair symmetry, one lambda per batch, minmax box sizes: over many draws."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    lab = _teachers()
    rm = RelabelMix(lab, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.3, switch_prob=0.25, mode="elem", seed=seed)
    draws = [rm.draw(16, 32, 32) for _ in range(400)]
    mixed = np.mean([float((p["lam"] != 1).float().mean()) for p, k in draws if k != "none"])
    cutmix = np.mean([k == "cutmix" for p, k in draws])
    assert abs(mixed - 0.3) < 0.03 and abs(cutmix - 0.25) < 0.07
    pair = RelabelMix(lab, mixup_alpha=0.0, cutmix_alpha=1.0, mode="pair", seed=seed)
    for p, k in (pair.draw(10, 32, 32) for _ in range(20)):
        assert torch.equal(p["lam"], p["lam"].flip(0)) and torch.equal(p["cut"], p["cut"].flip(0)) and k == "cutmix"
    batch = RelabelMix(lab, mixup_alpha=1.0, mode="batch", seed=seed)
    for p, k in (batch.draw(7, 32, 32) for _ in range(20)):
        assert (p["lam"] == p["lam"][0]).all() and k == "mixup"
    mm = RelabelMix(lab, mixup_alpha=0.0, cutmix_minmax=(0.25, 0.75), mode="elem", seed=seed)
    for p, k in (mm.draw(16, 40, 40, 40) for _ in range(20)):
        t, left, b, r = p["cut"].unbind(1)
        assert ((b - t >= 10) & (b - t < 30) & (r - left >= 10) & (r - left < 30)).all()
        assert ((t >= 0) & (left >= 0) & (b <= 40) & (r <= 40)).all()
    never = RelabelMix(lab, mixup_alpha=1.0, prob=0.0, seed=seed)
    assert all(k == "none" and (p["lam"] == 1).all() for p, k in (never.draw(4, 32, 32) for _ in range(10)))


def test_inputs_and_errors(rng):
    lab = _teachers()
    images = _images(rng, B=4, H=32)
    a = RelabelMix(lab, cutmix_alpha=1.0, seed=3)
    b = RelabelMix(lab, cutmix_alpha=1.0, seed=3)
    xa, sa = a(images)
    xb, sb = b(images.float() / 255)  # float in [0, 1]: the same images
    assert torch.equal(xa, xb) and torch.equal(sa, sb)
    with pytest.raises(HelloError, match=r"float images must lie in \[0, 1\]"):
        a(images.float())
    with pytest.raises(HelloError, match="expected images"):
        a(images[0])
    with pytest.raises(HelloError, match="even batch"):
        RelabelMix(lab, mode="pair")(images[:3])
    with pytest.raises(HelloError, match="out_size"):
        a(torch.zeros(2, 3, 20, 30, dtype=torch.uint8))
    with pytest.raises(HelloError, match="mode must be one of"):
        RelabelMix(lab, mode="elements")
    with pytest.raises(HelloError, match="labeler must be"):
        RelabelMix(42)
    with pytest.raises(HelloError, match="prob"):
        RelabelMix(lab, prob=1.5)
    x, soft = RelabelMix(lab, out_size=16, mixup_alpha=0.0)(torch.zeros(2, 3, 20, 30, dtype=torch.uint8))
    assert x.shape == (2, 3, 16, 16) and soft.shape == (2, 5)


def test_probabilities_and_the_loss(rng):
    """temperature=T gives softmax(logits / T); the loss on them equals the loss on the logits; beta mixes the hard CE."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    lab = _teachers()
    images, target = _images(rng, B=6, H=32), torch.randint(0, 5, (6,), generator=rng)
    logits_mix = RelabelMix(lab, cutmix_alpha=1.0, mode="elem", seed=seed)
    probs_mix = RelabelMix(lab, cutmix_alpha=1.0, mode="elem", seed=seed, temperature=4.0)
    x, logits = logits_mix(images)
    x2, probs = probs_mix(images)
    assert torch.equal(x, x2) and torch.allclose(probs, torch.softmax(logits / 4, 1), atol=1e-6)
    student = torch.randn(6, 5, generator=rng, requires_grad=True)
    on_logits = RelabelMixLoss(logits_mix, mode="kl", temperature=4.0, beta=0.3)(student, logits, target)
    on_probs = RelabelMixLoss(probs_mix, mode="kl", beta=0.3)(student, probs, target)
    want = soft_label_loss_reference(student, logits, target, logits_mix.partner, logits_mix.lam, mode="kl",
                                     temperature=4.0, beta=0.3)
    assert torch.allclose(on_logits, want, rtol=1e-5, atol=1e-6) and torch.allclose(on_probs, want, rtol=1e-4, atol=1e-5)
    g = torch.autograd.grad(on_probs, student)[0]
    assert torch.allclose(g, torch.autograd.grad(want, student)[0], rtol=1e-3, atol=1e-6)
    mse = RelabelMixLoss(logits_mix, mode="mse")(student, logits)
    assert torch.allclose(mse, F.mse_loss(student, logits), rtol=1e-5)
    with pytest.raises(HelloError, match="mse compares logits"):
        RelabelMixLoss(probs_mix, mode="mse")
    with pytest.raises(HelloError, match="needs the hard labels"):
        RelabelMixLoss(logits_mix, beta=0.1)(student, logits)
    with pytest.raises(HelloError, match="would not match"):
        RelabelMixLoss(probs_mix, mode="kl", temperature=2.0)


def test_under_torch_compile(projector, rng):
    """torch.compile (aot_eager) of a step that calls RelabelMix: the same views and labels as eager."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    proj, meta = projector
    images = _images(rng, B=4, H=32)
    torch._dynamo.reset()
    outs = {}
    for name in ("eager", "compiled"):
        rm = RelabelMix(Relabeler(proj, meta, device="cpu"), cutmix_alpha=1.0, mixup_alpha=0.5, mode="elem", seed=seed)
        fn = rm if name == "eager" else torch.compile(rm, backend="aot_eager")
        outs[name] = [fn(images) for _ in range(2)], rm.lam.clone()
    for (xe, se), (xc, sc) in zip(outs["eager"][0], outs["compiled"][0]):
        assert torch.allclose(xe, xc, atol=1e-6) and torch.allclose(se, sc, rtol=1e-4, atol=1e-4)
    assert torch.equal(outs["eager"][1], outs["compiled"][1])


@pytest.mark.slow
def test_a_timm_loop_trains_with_it(rng):
    """timm's create_model + RelabelMix + RelabelMixLoss: the loss falls over a few steps on a tiny set."""
    timm = pytest.importorskip("timm")
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print(f"seed {seed}")
    torch.manual_seed(seed)
    # a labeler a small network can learn within a few steps: logits linear in each image's mean colour
    labeler = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    with torch.no_grad():
        labeler[2].weight.mul_(4)
    colours = torch.randint(0, 256, (16, 3, 1, 1), generator=rng)
    data = (colours + torch.randint(-30, 30, (16, 3, 36, 36), generator=rng)).clamp(0, 255).to(torch.uint8)
    rm = RelabelMix(labeler, mixup_alpha=0.0, cutmix_alpha=1.0, out_size=32, seed=seed)
    with torch.no_grad():
        labels = rm(data)[1].argmax(1)
    criterion = RelabelMixLoss(rm, mode="mse", beta=0.1)
    name = "test_resnet" if "test_resnet" in timm.list_models() else "resnet10t"
    model = timm.create_model(name, num_classes=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        idx = torch.randperm(16, generator=rng)[:8]
        x, soft = rm(data[idx])
        loss = criterion(model(x), soft, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print([round(v, 3) for v in losses])
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_from_a_finished_run(tiny_run, rng):
    """from_run: the run's label artifact and its weak teachers both label a batch of its distilled images."""
    run, _ = tiny_run
    images = _images(rng, B=4, H=32)
    for source in ("projector", "teacher"):
        rm = RelabelMix.from_run(run, source, device="cpu", cutmix_alpha=1.0, seed=1)
        x, soft = rm(images)
        assert x.shape == (4, 3, 32, 32) and soft.shape == (4, 3) and torch.isfinite(soft).all()
    assert RelabelMix.from_run(run, "projector", device="cpu").num_classes == 3
    with pytest.raises(HelloError, match="source must be"):
        RelabelMix.from_run(run, "stored")


@pytest.mark.slow
def test_throughput_benchmark_writes_results(tmp_path):
    """benchmarks/bench_relabel_mix.py --quick: both loops timed in one run, the ratio written with the environment."""
    pytest.importorskip("timm")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_relabel_mix.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "relabel_mix_cpu_quick.json").read_text())
    assert {"date", "torch", "device_name"} <= set(doc["environment"]) and set(doc["loops"]) == {"relabel_mix", "timm_mixup"}
    (row,) = doc["rows"]
    assert row["relabel_mix_img_per_s"] > 0 and row["timm_mixup_img_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["relabel_mix_img_per_s"] / row["timm_mixup_img_per_s"], rel=0.02)
