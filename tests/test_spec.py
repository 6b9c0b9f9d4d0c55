"""The data-pass and augmentation specs: built once from the config, one sharding rule, one crop and box rule, and
stored-label replay keyed on every field of the recipe."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_config

from hello_fast import RelabelMix, distributed
from hello_fast.data import schedule
from hello_fast.data.loader import batches, random_resized_crop_box
from hello_fast.data.resident import ResidentSet
from hello_fast.data.sources import TensorImageSet, procedural_images
from hello_fast.data.spec import AugmentRecipe, DataPass, dali_threads, rank_plan
from hello_fast.errors import HelloError
from hello_fast.labels import StoredLabels
from hello_fast.ops import sample_augment_params
from hello_fast.ops.augment_mix import crop_fallback, cutmix_box
from hello_fast.stages.select import crops_pass


def test_specs_are_built_from_the_config():
    cfg = tiny_config("data.num_workers=3", "data.eval_resize=40", "student.mix=mixup", "student.mix_alpha=0.4",
                      "student.scale=[0.3,0.9]", "student.shuffle_patches=true", "select.factor=2")
    p = DataPass.from_config(cfg, sharded=True)
    assert (p.image_size, p.loader, p.workers, p.eval_resize, p.scale, p.flip, p.sharded) == (
        32, cfg.data.loader, 3, 40, (0.5, 1.0), cfg.data.flip, True)
    assert p.threads == 3 == dali_threads(3) and dali_threads(0) >= 1
    r = AugmentRecipe.from_config(cfg)
    assert (r.out_size, r.scale, r.ratio, r.flip, r.mix, r.alpha, r.shuffle_factor) == (
        32, (0.3, 0.9), (3 / 4, 4 / 3), cfg.data.flip, "mixup", 0.4, 2)
    assert AugmentRecipe.from_config(tiny_config()).shuffle_factor == 1  # no ShufflePatches unless asked
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mix = "none"


@pytest.mark.parametrize("bad, message", [
    (dict(out_size=0), "out_size"), (dict(scale=(0.8, 0.2)), "scale"), (dict(scale=(0.5, 1.5)), "scale"),
    (dict(mix="cutout"), "mix"), (dict(alpha=0), "alpha"), (dict(shuffle_factor=0), "shuffle_factor"),
])
def test_a_bad_recipe_is_refused_in_one_line(bad, message):
    with pytest.raises(HelloError, match=message):
        AugmentRecipe(**{"out_size": 16, **bad})


def test_a_bad_data_pass_is_refused():
    with pytest.raises(HelloError, match="loader"):
        DataPass(16, loader="opencv")
    with pytest.raises(HelloError, match="ratio"):
        DataPass(16, ratio=(2.0, 1.0))


def test_a_sharded_pass_is_each_ranks_share_of_every_global_batch(monkeypatch):
    """Three ranks' torch batches put together are exactly the single process's batches, in order."""
    images, labels = procedural_images(3, 7, 12)
    data = TensorImageSet(images, labels, ["a", "b", "c"])
    kw = dict(train=True, batch_size=5, seed=2, epoch=1)
    single = list(batches(data, DataPass(8, sharded=True), **kw))
    assert [len(b[2]) for b in single] == [5, 5, 5, 5, 1]
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda r=rank: distributed.World(rank=r, size=3, local_rank=r))
        shares.append(list(batches(data, DataPass(8, sharded=True), **kw)))
        assert shares[-1] and len(list(batches(data, DataPass(8), **kw))) == 5  # unsharded: every rank reads all
    # training: the last global batch has 1 row for 3 ranks, so every rank skips it (DDP steps all ranks together)
    assert [len(s) for s in shares] == [4, 4, 4]
    for k, whole in enumerate(single[:4]):
        parts = [s[k] for s in shares]
        assert torch.equal(torch.cat([p[2] for p in parts]), whole[2])
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])  # same crops on every rank
    # evaluation: no row is lost; the rank that has the last row reads it alone
    order = torch.arange(21)
    eval_shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda r=rank: distributed.World(rank=r, size=3, local_rank=r))
        eval_shares.append(rank_plan(order, 5, drop_last=False, sharded=True))
    assert sorted(i for plan in eval_shares for b in plan for i in b) == list(range(21))
    # still rank 2 of 3: its one row of each full batch; drop_last drops the short last batch
    assert rank_plan(torch.arange(11), 5, drop_last=True, sharded=True) == [[4], [9]]


def test_the_loader_and_the_student_loop_share_the_crop_rule():
    """An impossible crop scale falls back to the same centre crop in the per-sample loader and the batched draw."""
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(10, 100, (1.0, 1.0), (1.0, 1.0), g) == crop_fallback(10, 100, (1.0, 1.0)) == (0, 45, 10, 10)
    p = sample_augment_params(torch.arange(3), 10, 100, out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), mode="none",
                              generator=g)
    assert p["crop"].tolist() == [[0, 45, 10, 10]] * 3


def _interior_sides(cuts: torch.Tensor, lams: torch.Tensor, size: int):
    """(box height, box width, side from lam) of the boxes that the clipping left whole."""
    cuts, side = cuts.long(), (size * torch.sqrt(1 - lams.double())).long()
    inside = (cuts[:, 0] > 0) & (cuts[:, 1] > 0) & (cuts[:, 2] < size) & (cuts[:, 3] < size) & (side > 0)
    return (cuts[:, 2] - cuts[:, 0])[inside], (cuts[:, 3] - cuts[:, 1])[inside], side[inside]


def test_relabel_mix_and_the_student_loop_draw_boxes_by_one_rule():
    """Unclipped CutMix boxes have sides 2 * (side // 2) around their centre in both the student loop's draw and a
    RelabelMix made from the same recipe (one rule: cutmix_box), never the odd side of current timm."""
    S = 33
    recipe = AugmentRecipe(S, mix="cutmix", alpha=1.0, flip=False)
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    rm = RelabelMix.from_recipe(teacher, recipe, seed=1)
    assert (rm.cutmix_alpha, rm.mixup_alpha, rm.hflip, rm.out_size, rm.scale) == (1.0, 0.0, 0.0, S, recipe.scale)
    drawn = [rm.draw(2, 40, 40) for _ in range(300)]
    assert {kind for _, kind in drawn} == {"cutmix"}
    relabel = _interior_sides(torch.stack([p["cut"][0] for p, _ in drawn]), torch.stack([p["lam"][0] for p, _ in drawn]), S)
    res = ResidentSet(procedural_images(2, 2, 40)[0], torch.zeros(4, dtype=torch.long), "cpu", recipe, seed=3)
    params = [res.draw(torch.arange(4)) for _ in range(300)]
    loop = _interior_sides(torch.stack([p["cut"][0] for p in params]), torch.stack([p["lam"][0] for p in params]), S)
    for h, w, side in (relabel, loop):
        assert len(side) > 20 and (side % 2 == 1).any()  # odd sides were drawn
        assert torch.equal(h, w) and (h % 2 == 0).all() and ((h - side).abs() <= 1).all()
    assert cutmix_box(np.array([10]), np.array([10]), np.array([7]), S) == (7, 7, 13, 13)
    with pytest.raises(HelloError, match="ShufflePatches"):
        RelabelMix.from_recipe(teacher, AugmentRecipe(S, shuffle_factor=2))
    with pytest.raises(HelloError, match="scale"):
        RelabelMix.from_recipe(teacher, recipe, scale=(0.2, 1.0))


def _stored(tmp_path, cfg, recipe, images, labels):
    res = ResidentSet(images, labels, "cpu", recipe, seed=schedule.resident_seed(cfg))
    labeler = lambda batch: torch.zeros(len(batch.index), 3)  # noqa: E731 (labels do not matter here)
    views = [((0.5,) * 3, (0.25,) * 3, torch.float32)]
    description = {"source": "stored", "schedule": schedule.schedule_of(cfg, len(images), recipe), "encoding": "fp16",
                   "top_k": None, "pool_fraction": None}
    return StoredLabels.write(str(tmp_path), res, labeler, description, views=views)


def test_a_field_added_to_the_recipe_makes_replay_refuse_the_labels_written_before(tmp_path):
    cfg = tiny_config("student.epochs=1")
    images, labels = procedural_images(3, 4, 20)
    recipe = AugmentRecipe.from_config(cfg)
    stored = _stored(tmp_path, cfg, recipe, images, labels)
    assert set(dataclasses.asdict(recipe)) <= set(stored.schedule)
    stored.check_schedule(schedule.schedule_of(cfg, len(images)))  # the same recipe: replay is fine

    @dataclasses.dataclass(frozen=True)
    class Cutout(AugmentRecipe):  # a new augmentation option, at its neutral default
        erase_prob: float = 0.0

    grown = schedule.schedule_of(cfg, len(images), Cutout(**dataclasses.asdict(recipe)))
    assert not StoredLabels.complete(str(tmp_path), {"schedule": grown})
    with pytest.raises(HelloError, match="erase_prob"):
        stored.check_schedule(grown)
    changed = schedule.schedule_of(cfg, len(images), dataclasses.replace(recipe, ratio=(0.5, 2.0)))
    with pytest.raises(HelloError, match="ratio"):
        stored.check_schedule(changed)


def test_selection_reads_its_crops_through_the_loader():
    """RDED's scoring pass is a DataPass: square crops at 1/factor size, no flip, on the torch loader."""
    cfg = tiny_config("select.factor=4", "select.crop_scale=[0.2,0.6]")
    images, labels = procedural_images(3, 2, 32)
    data = TensorImageSet(images, labels, ["a", "b", "c"])
    p = crops_pass(cfg, data)
    assert (p.image_size, p.scale, p.ratio, p.flip, p.loader) == (8, (0.2, 0.6), (1.0, 1.0), False, "torch")
    crops, _, index = next(iter(batches(data, p, train=True, batch_size=6, shuffle=False, crops=3)))
    assert crops.shape == (6, 3, 3, 8, 8) and index.tolist() == list(range(6))
