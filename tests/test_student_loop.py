"""The fast student loop and the Relabeler: same results as the plain PyTorch loop, labels from every source."""
import os
import shutil

import pytest
import torch
from conftest import tiny_config

from hello_fast.data import schedule
from hello_fast.data.distilled import load_distilled
from hello_fast.data.spec import AugmentRecipe
from hello_fast.errors import HelloError
from hello_fast.labels import label_source
from hello_fast.ops import augment_mix_reference
from hello_fast.pipeline import Pipeline
from hello_fast.projector.artifact import load_projector
from hello_fast.relabel import Relabeler
from hello_fast.rundir import RunDir
from hello_fast.stages import student as st


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run[0]


def _artifact(run_dir):
    return os.path.join(run_dir, "projector", "artifact.safetensors")


def test_relabeler_equals_the_unmerged_projector(run_dir, rng):
    relabel = Relabeler.from_artifact(_artifact(run_dir), device="cpu")
    projector, _ = load_projector(_artifact(run_dir))
    with torch.no_grad():
        for _, m in projector.lora_modules():  # make the adapters matter
            m.lora_b.normal_(generator=rng)
        relabel = Relabeler(load_projector(_artifact(run_dir))[0], relabel.meta, device="cpu")
        relabel.projector.unmerge()
        relabel.projector.load_lora_state_dict(projector.lora_state_dict())
        relabel.projector.merge()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=rng)
    x = relabel.normalize(images)
    with torch.no_grad():
        want = projector(x)
    got = relabel(x)
    assert got.dtype == torch.float32 and got.shape == (5, 3)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert relabel.num_classes == 3 and relabel.image_size == 32 and relabel.class_names[0] == "pattern 0"
    with pytest.raises(HelloError, match="CLIP-normalised float"):
        relabel(images)


def test_relabeler_leaves_the_callers_projector_unchanged(run_dir, rng):
    """Relabeler(projector, ...) merges and casts its own copy: the caller's weights, dtypes, flags stay."""
    projector, meta = load_projector(_artifact(run_dir))
    with torch.no_grad():
        for _, m in projector.lora_modules():  # non-zero adapters: a merge would change the base weights
            m.lora_b.normal_(generator=rng)
    projector.train()
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    grads = {n: p.requires_grad for n, p in projector.named_parameters()}
    relabel = Relabeler(projector, meta, device="cpu", dtype=torch.bfloat16)
    assert relabel.projector is not projector and all(m.merged for _, m in relabel.projector.lora_modules())
    after = projector.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert not any(m.merged for _, m in projector.lora_modules())
    assert projector.training and {n: p.requires_grad for n, p in projector.named_parameters()} == grads
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=rng)
    x = relabel.normalize(images)
    with torch.no_grad():
        want = projector.eval()(x)  # the caller's projector still computes the unmerged fp32 labels
    assert torch.allclose(relabel(x), want, rtol=5e-2, atol=5e-2)  # bf16 copy


def test_bench_baselines_build_their_own_labelers():
    """`bench student-loop`: after the fast loop's Relabeler exists, the naive loop still gets the unmerged fp32 projector."""
    import argparse

    from hello_fast import bench

    args = argparse.Namespace(student="resnet18", projector="hello-tiny-rn", batch=4, res=32, classes=5, conv_rank=2,
                              head_rank=3, width=8, capture=False, device="cpu")
    s = bench._Setup(args)
    with torch.no_grad():
        for _, m in s.projector.lora_modules():
            m.lora_b.normal_(std=0.5)
    reference = {k: v.clone() for k, v in s.projector.state_dict().items()}
    fast = s.labeler("fast")
    naive = s.labeler("naive")
    assert fast.relabel.projector is not s.projector and naive is not s.projector
    assert all(torch.equal(s.projector.state_dict()[k], v) for k, v in reference.items())
    assert not any(m.merged for _, m in naive.lora_modules())
    assert all(p.dtype == torch.float32 for p in naive.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        unmerged = naive(x)
    merged = fast.relabel(x)
    assert torch.allclose(merged, unmerged, rtol=1e-3, atol=1e-3)  # the same function, two implementations
    assert s.labeler("teacher") is not s.labeler("teacher")


def test_relabeler_refuses_other_backbone_weights(run_dir, tmp_path):
    from hello_fast.models.clip import load_clip

    weights = tmp_path / "other.pt"
    torch.save(load_clip("hello-tiny-rn", init_seed=3).model.state_dict(), weights)
    with pytest.raises(HelloError, match="trained on backbone"):
        Relabeler.from_artifact(_artifact(run_dir), backbone_weights=str(weights), device="cpu")


def test_resident_set_draws_every_image_once_per_epoch(run_dir):
    cfg = tiny_config()
    distilled = load_distilled(os.path.join(run_dir, "refine"))
    res = schedule.resident_set(cfg, distilled, "cpu")
    order = res.epoch_order(4)
    assert sorted(torch.cat(order).tolist()) == list(range(len(distilled)))
    p = res.draw(order[0])
    views = [((0.5,) * 3, (0.25,) * 3, torch.float32)]
    batch = res.make(order[0], p, views=views)
    ref, lam = augment_mix_reference(distilled.images, order[0], **p, mode="cutmix", out_size=32, views=views)
    assert torch.allclose(batch.views[0], ref[0], atol=2e-3) and torch.allclose(batch.lam, lam)
    assert torch.equal(batch.hard, distilled.labels[order[0]])
    again = schedule.resident_set(cfg, distilled, "cpu")  # same seed: same stream
    assert all(torch.equal(a, b) for a, b in zip(again.epoch_order(4), order))


def _sources(run_dir, cfg, distilled, fast, out):
    pipe = Pipeline(cfg, run_dir, device="cpu")
    return {name: label_source(name, cfg, pipe.run, distilled, out, "cpu", pipe.data()[0])
            for name in ("hard", "teacher", "projector")}


def test_label_sources(run_dir, tmp_path):
    cfg = tiny_config()
    distilled = load_distilled(os.path.join(run_dir, "refine"))
    srcs = _sources(run_dir, cfg, distilled, True, str(tmp_path))
    res = schedule.resident_set(cfg, distilled, "cpu", AugmentRecipe(32, mix="mixup"))
    index = res.epoch_order(4)[0]
    views = schedule.views_for(srcs["projector"], torch.device("cpu"), True)
    batch = res.make(index, res.draw(index), views=views)
    assert srcs["hard"](batch) is None and srcs["hard"].label_bytes == 6 * 8
    teacher = srcs["teacher"](batch)
    from hello_fast.layout import load_teachers
    from hello_fast.models.students import mean_teacher_logits

    assert torch.allclose(teacher, mean_teacher_logits(load_teachers(Pipeline(cfg, run_dir).run, "cpu"), batch.views[0]))
    proj = srcs["projector"](batch)
    assert proj.shape == (len(index), 3) and torch.isfinite(proj).all()
    assert srcs["projector"].label_bytes == os.path.getsize(_artifact(run_dir))


def test_stored_labels_replay_the_teachers_schedule(run_dir, tmp_path):
    cfg = tiny_config("student.epochs=2")
    distilled = load_distilled(os.path.join(run_dir, "refine"))
    pipe = Pipeline(cfg, run_dir, device="cpu")
    stored = label_source("stored", pipe.cfg, pipe.run, distilled, str(tmp_path), "cpu", pipe.data()[0])
    from safetensors.torch import load_file

    tensors = [t for f in (tmp_path / "labels").glob("*.safetensors") for k, t in load_file(f).items() if k != "steps"]
    assert stored.label_bytes == sum(t.numel() * t.element_size() for t in tensors)  # every stored tensor, no headers
    teacher = label_source("teacher", pipe.cfg, pipe.run, distilled, str(tmp_path), "cpu", pipe.data()[0])
    res = schedule.resident_set(cfg, distilled, "cpu")
    views = schedule.views_for(teacher, torch.device("cpu"), True)
    for epoch in (1, 2):  # the replayed batches are the ones a live loop would draw, with the teachers' labels
        live = res.epoch_order(cfg.student.batch_size)
        for (index, params, logits), idx in zip(stored.epoch(epoch), live):
            assert torch.equal(index, idx)
            p = res.draw(idx)
            assert all(torch.equal(params[k], p[k]) for k in p)
            batch = res.make(idx, p, views=views)
            assert torch.allclose(logits, teacher(batch), atol=2e-2, rtol=2e-3)  # fp16 storage
    with pytest.raises(HelloError, match="another schedule"):
        stored.check_schedule(schedule.schedule_of(tiny_config("student.batch_size=5"), len(distilled)))


@pytest.mark.parametrize("source", ["projector", "teacher", "hard"])
def test_fast_and_plain_steps_compute_the_same_thing(run_dir, tmp_path, source):
    """The same drawn batch through both loops: views, labels, loss and gradient agree to float tolerance."""
    from hello_fast.models.students import build_model

    cfg = tiny_config()
    distilled = load_distilled(os.path.join(run_dir, "refine"))
    grads, losses, targets = {}, {}, {}
    for loop in ("fast", "plain"):
        cfg.student.loop = loop
        pipe = Pipeline(cfg, run_dir, device="cpu")
        src = label_source(source, cfg, pipe.run, distilled, str(tmp_path), "cpu", pipe.data()[0])
        res = schedule.resident_set(cfg, distilled, "cpu")
        steps = st.EpochBatches(cfg, res, src, schedule.views_for(src, torch.device("cpu"), loop == "fast"), 1, loop == "fast",
                          torch.device("cpu"), overlap=False)
        batch, target = next(iter(steps))
        torch.manual_seed(0)
        model = build_model("resnet18", 3, 32, 8)
        loss_fn = st.soft_label_loss if loop == "fast" else st.soft_label_loss_reference
        loss = loss_fn(model(batch.views[0]).float(), target, batch.hard, batch.partner, batch.lam, mode="kl",
                       temperature=4.0, beta=1.0 if source == "hard" else 0.1)
        grads[loop] = torch.autograd.grad(loss, list(model.parameters()))
        losses[loop], targets[loop] = loss.item(), target
    assert abs(losses["fast"] - losses["plain"]) <= 1e-4 * max(1.0, abs(losses["plain"]))
    if source != "hard":
        assert torch.allclose(targets["fast"], targets["plain"], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads["fast"], grads["plain"]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_fast_and_plain_loops_reach_the_same_results(tmp_path):
    """A few epochs both ways on learnable data: the same accuracy within randomness, both well above chance."""
    cfg = tiny_config("data.procedural_per_class=40", "teachers.keep_epochs=[6]", "teachers.width=16",
                      "teachers.batch_size=8", "teachers.lr=0.01", "select.ipc=4", "refine.enabled=false",
                      "student.label_sources=[teacher]", "student.epochs=15", "student.batch_size=6")
    out = str(tmp_path / "run")
    fast = Pipeline(cfg, out, device="cpu").distill()["students"]["teacher"]
    plain = Pipeline(tiny_config("data.procedural_per_class=40", "teachers.keep_epochs=[6]", "teachers.width=16",
                                 "teachers.batch_size=8", "teachers.lr=0.01", "select.ipc=4", "refine.enabled=false",
                                 "student.label_sources=[teacher]", "student.epochs=15", "student.batch_size=6",
                                 "student.loop=plain"), out, device="cpu").run_stage("student")["students"]["teacher"]
    assert fast["top1_best"] > 50 and plain["top1_best"] > 50  # chance: 33%
    assert abs(fast["top1_best"] - plain["top1_best"]) <= 25


def test_stored_source_in_the_pipeline(run_dir, tmp_path):
    out = str(tmp_path / "stored")
    shutil.copytree(run_dir, out)
    res = Pipeline(tiny_config("student.label_sources=[teacher,stored]"), out, device="cpu").run_stage("student")
    s = res["students"]
    assert s["stored"]["label_bytes"] > 0
    # the same crops, the same teachers, labels stored in fp16: the two students' per-epoch curves match to one
    # val image (11.1 points of the 9) wherever fp16 rounding flips a near-tie
    curves = {k: [h["top1"] for h in RunDir(out).done(f"student/{k}")["summary"]["history"]] for k in ("stored", "teacher")}
    assert len(curves["stored"]) == len(curves["teacher"]) > 0
    assert max(abs(a - b) for a, b in zip(curves["stored"], curves["teacher"])) <= 100 / 9 + 1e-6, curves
    assert os.path.isfile(os.path.join(out, "student", "stored", "labels", "stored_labels.json"))
