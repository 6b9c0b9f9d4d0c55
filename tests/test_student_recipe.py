"""RDED's student recipe: ShufflePatches in the student loop, decay groups, the per-architecture learning rates, the
schedule and the paper presets' batch sizes."""
import dataclasses
import math
import os

import pytest
import torch
from conftest import tiny_config

from hello_fast.config import load_config
from hello_fast.data import schedule
from hello_fast.data.spec import AugmentRecipe
from hello_fast.data.sources import TensorImageSet, procedural_images
from hello_fast.labels import HardLabels
from hello_fast.models.students import ARCHS, RDED_LR, build_model, decay_groups, learning_rate
from hello_fast.ops import augment_mix_reference
from hello_fast.ops.augment_mix import shuffle_patches
from hello_fast.stages import student as st

PAPER_PRESETS = {"imagenet1k-ipc1": 20, "imagenet1k-ipc10": 100, "imagenet1k-ipc50": 200, "imagenet100-ipc1": 20,
                 "imagenet100-ipc10": 100, "imagenet100-ipc50": 200, "places365-ipc1": 20, "places365-ipc10": 100,
                 "places365-ipc50": 200}  # RDED's batch by IPC (x2 for 100 and 1,000 classes)


def _sets(size=32, per_class=8):
    images, labels = procedural_images(3, per_class, size, seed=4)
    val_x, val_y = procedural_images(3, 4, size, seed=5)
    return TensorImageSet(images, labels, ["a", "b", "c"]), TensorImageSet(val_x, val_y, ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------------------
# the learning-rate table


def test_rded_learning_rates_by_architecture():
    assert set(ARCHS) <= set(RDED_LR)  # every student has a rate
    want = {"resnet18": 1e-3, "mobilenet_v2": 2.5e-3, "efficientnet_b0": 2e-3, "vgg11": 5e-4, "swin_v2_t": 1e-4}
    for arch, lr in want.items():
        assert learning_rate(arch) == lr and learning_rate(arch, None) == lr
        assert learning_rate(arch, 0.02) == 0.02  # an explicit student.lr wins


def test_lr_null_means_the_tables_rate():
    cfg = load_config("imagenet1k-ipc10", ["student.arch=vgg11"])
    assert cfg.student.lr is None and learning_rate(cfg.student.arch, cfg.student.lr) == 5e-4
    cfg = load_config("imagenet1k-ipc10", ["student.arch=mobilenet_v2", "student.lr=0.004"])
    assert learning_rate(cfg.student.arch, cfg.student.lr) == 0.004
    cfg = load_config("digits", ["student.lr=null"])
    assert cfg.student.lr is None
    assert load_config("digits").student.lr == 0.005  # the default preset keeps its own rate


# ---------------------------------------------------------------------------------------------------------------
# decay groups


@pytest.mark.parametrize("arch, size", [("resnet18", 32), ("swin_v2_t", 32), ("mobilenet_v2", 64)])
def test_rded_decay_groups_leave_norms_and_biases_alone(arch, size):
    model = build_model(arch, 5, size)
    decayed, kept = decay_groups(model, 0.05, norms_and_biases=False)
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    ids = {id(p) for p in decayed["params"]}
    assert ids.isdisjoint(id(p) for p in kept["params"])
    assert len(decayed["params"]) + len(kept["params"]) == len(list(model.parameters()))
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            where = f"{name}.{pname}"
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and pname == "weight":
                assert id(p) in ids, f"{where} should decay"
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) or pname == "bias":
                assert id(p) not in ids, f"{where} should not decay"
    (everything,) = decay_groups(model, 0.05)
    assert len(everything["params"]) == len(list(model.parameters())) and everything["weight_decay"] == 0.05


def test_adamw_decays_only_the_weight_matrices():
    """With zero gradients AdamW's step is the decay alone: conv/linear weights shrink, BatchNorm and biases do not."""
    model = build_model("resnet18", 4, 32, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(decay_groups(model, 0.5, norms_and_biases=False), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if ("weight" in n and p.dim() > 1) else 1.0
        assert torch.allclose(p, before[n] * factor), n
    assert torch.allclose(model.bn1.weight, before["bn1.weight"]) and torch.allclose(model.fc.bias, before["fc.bias"])


# ---------------------------------------------------------------------------------------------------------------
# the schedule


def test_rded_schedule_falls_to_half():
    E = 300
    assert st._lr_factor("rded", 0, 1, 0, E) == 1.0
    assert math.isclose(st._lr_factor("rded", 0, 1, 150, E), 0.5 * (1 + math.cos(math.pi / 4)))
    assert math.isclose(st._lr_factor("rded", 0, 1, E, E), 0.5)
    assert math.isclose(st._lr_factor("cosine", 100, 100, E, E), 0.0, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# ShufflePatches in the student loop


def test_the_loop_draws_shuffle_patches_per_image_and_both_loops_apply_it(rng):
    distilled, _ = _sets(size=30)  # 30 px: a factor of 4 leaves a remainder
    cfg = tiny_config("student.shuffle_patches=true", "select.factor=4", "student.batch_size=5")
    recipe = dataclasses.replace(AugmentRecipe.from_config(cfg), out_size=30)
    assert recipe.shuffle_factor == 4 and schedule.schedule_of(cfg, len(distilled))["shuffle_factor"] == 4
    views = [((0.0,) * 3, (1 / 255,) * 3, torch.float32)]
    got = {}
    for loop in ("fast", "plain"):
        res = schedule.resident_set(cfg, distilled, "cpu", recipe)
        index = res.epoch_order(5)[0]
        p = res.draw(index)
        assert p["shuffle"].shape == (5, 2, 4)
        batch = res.make(index, p, views=views, backend=None if loop == "fast" else "torch")
        # the reference on explicitly shuffled images: the crops are crops of the shuffled image
        shuffled = shuffle_patches(distilled.images[index], p["shuffle"])
        unshuffled = {k: v for k, v in p.items() if k != "shuffle"}
        want, _ = augment_mix_reference(shuffled, torch.arange(5), **unshuffled, mode="cutmix", out_size=30, views=views)
        assert (batch.views[0] - want[0]).abs().max() <= 2e-3
        got[loop] = batch.views[0]
    assert torch.allclose(got["fast"], got["plain"], atol=2e-3)  # the same stream drawn both ways
    off = tiny_config("select.factor=4")
    assert "shuffle" not in schedule.resident_set(off, distilled, "cpu").draw(index)


@pytest.mark.slow
def test_student_trains_with_the_recipe_and_uses_its_groups_and_rate(tmp_path, monkeypatch):
    """The paper presets' recipe on small data: ShufflePatches, RDED's groups, the table's rate and schedule; the
    student still learns (chance: 33%)."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    distilled, val = _sets(per_class=12)
    cfg = tiny_config("student.epochs=4", "student.batch_size=9", "student.width=16", "student.lr=null",
                      "student.eval_every=2", "student.shuffle_patches=true", "student.schedule=rded",
                      "student.decay_norms_and_biases=false")
    result = st.train_student(cfg, distilled, val, HardLabels(len(distilled)), torch.device("cpu"), str(tmp_path))
    (opt,) = made
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.student.weight_decay, 0.0]
    last = 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 8))  # RDED's resnet18 rate at epoch 4 of 4
    assert all(math.isclose(g["lr"], last) for g in opt.param_groups)
    assert result["top1_best"] > 55, result["history"]


def test_stored_labels_replay_the_shuffle(tiny_run, tmp_path):
    from hello_fast.data.distilled import load_distilled
    from hello_fast.errors import HelloError
    from hello_fast.labels import label_source
    from hello_fast.pipeline import Pipeline

    run_dir = tiny_run[0]
    cfg = tiny_config("student.epochs=1", "student.shuffle_patches=true")
    distilled = load_distilled(os.path.join(run_dir, "refine"))
    pipe = Pipeline(cfg, run_dir, device="cpu")
    stored = label_source("stored", cfg, pipe.run, distilled, str(tmp_path), torch.device("cpu"), pipe.data()[0])
    res = schedule.resident_set(cfg, distilled, "cpu")
    for (index, params, _), idx in zip(stored.epoch(1), res.epoch_order(cfg.student.batch_size)):
        p = res.draw(idx)
        assert torch.equal(index, idx) and torch.equal(params["shuffle"], p["shuffle"])
    with pytest.raises(HelloError, match="shuffle_factor"):
        stored.check_schedule(schedule.schedule_of(tiny_config("student.epochs=1"), len(distilled)))


def test_dali_backend_crops_the_shuffled_images():
    from hello_fast.data import dali

    if not dali.available():
        pytest.skip("NVIDIA DALI is not installed")
    images, labels = procedural_images(3, 4, 24)
    views = [((0.5,) * 3, (0.25,) * 3, torch.float32)]
    s = dali.DaliDistilledSet(images, labels, "cpu", AugmentRecipe(16, shuffle_factor=2), 0, batch_size=6, views=views)
    index = s.epoch_order(6)[0]
    p = s.draw(index)
    fed = []
    feed = s.pipe.feed_input
    s.pipe.feed_input = lambda name, data: (fed.append(data), feed(name, data))[1]
    batch = s.make(index, p, views=views)
    want = shuffle_patches(images[index], p["shuffle"]).permute(0, 2, 3, 1)
    assert p["shuffle"].shape == (6, 2, 2) and torch.equal(torch.stack([torch.from_numpy(x) for x in fed[0]]), want)
    assert batch.views[0].shape == (6, 3, 16, 16) and torch.isfinite(batch.views[0]).all()


# ---------------------------------------------------------------------------------------------------------------
# the presets


@pytest.mark.parametrize("name, batch", PAPER_PRESETS.items())
def test_paper_presets_use_rdeds_recipe(name, batch):
    cfg = load_config(name)
    sc = cfg.student
    assert sc.shuffle_patches and AugmentRecipe.from_config(cfg).shuffle_factor == cfg.select.factor == 2
    assert sc.schedule == "rded" and not sc.decay_norms_and_biases
    assert sc.lr is None and learning_rate(sc.arch, sc.lr) == RDED_LR[sc.arch]
    assert sc.scale == [1 / cfg.select.factor, 1.0]
    assert sc.batch_size == batch


def test_the_default_preset_keeps_its_recipe():
    sc = load_config("digits").student
    assert not sc.shuffle_patches and sc.schedule == "cosine" and sc.decay_norms_and_biases and sc.lr == 0.005
