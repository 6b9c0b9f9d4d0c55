"""The baseline label sources: RDED's teacher with its own loss, and stored labels quantised, top-k sparsified or pooled."""
import math
import os
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from hello_fast.data.distilled import load_distilled
from hello_fast.errors import HelloError
from hello_fast.labels import (
    RDED_TEMPERATURE,
    STORED,
    HardLabels,
    RdedLabels,
    StoredLabels,
    dequantize_logits,
    expand_top_k,
    label_source,
    loss_settings,
    quantize_logits,
    top_k_logits,
)
from hello_fast.layout import observer_path
from hello_fast.models.students import build_model
from hello_fast.pipeline import Pipeline
from hello_fast.stages import student as st
from hello_fast.storage import label_payload_bytes, network_bytes, storage_report, teacher_bytes


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("classes", [1, 7, 10, 1001])
def test_quantised_logits_come_back_within_half_a_step(rng, bits, classes):
    x = torch.randn(33, classes, generator=rng) * torch.rand(33, 1, generator=rng) * 20
    x[3] = 0  # an all-zero row stays zero
    q, scale = quantize_logits(x, bits)
    assert scale.dtype == torch.float32 and scale.shape == (33,)
    assert q.shape == (33, classes if bits == 8 else math.ceil(classes / 2))
    assert q.element_size() == 1
    y = dequantize_logits(q, scale, bits, classes)
    assert y.shape == x.shape
    assert ((y - x).abs() <= scale[:, None] / 2 + 1e-5).all()
    assert torch.equal(y[3], torch.zeros(classes))
    qmax = 2 ** (bits - 1) - 1
    assert torch.allclose(scale[torch.arange(33) != 3], x.abs().amax(1)[torch.arange(33) != 3] / qmax)


def test_top_k_keeps_exactly_the_k_largest_and_the_dropped_mass(rng):
    x = torch.randn(20, 12, generator=rng) * 4
    values, indices, fill = top_k_logits(x, 3)
    assert values.dtype == fill.dtype == torch.float16 and indices.dtype == torch.int16 and values.shape == (20, 3)
    assert torch.equal(indices.long().sort(1).values, x.topk(3, 1).indices.sort(1).values)
    y = expand_top_k(values, indices, fill, 12)
    kept = torch.zeros_like(x, dtype=torch.bool).scatter(1, indices.long(), True)
    assert torch.allclose(y[kept], x[kept], atol=1e-2, rtol=1e-3)  # fp16
    assert (y[~kept].view(20, 9) == fill.float()[:, None]).all()
    assert (fill.float() <= values.float().amin(1)).all()  # no dropped class outranks a kept one
    # softmax at T=1 gives the dropped classes together the probability they had
    p_true, p_back = x.softmax(1), y.softmax(1)
    assert torch.allclose(p_back[~kept].view(20, 9).sum(1), p_true[~kept].view(20, 9).sum(1), atol=5e-3)
    with pytest.raises(HelloError, match="stored_topk"):
        top_k_logits(x, 12)


def test_rded_brings_its_own_loss_whatever_the_student_loss_says():
    cfg = tiny_config("student.loss=mse", "student.temperature=4", "student.beta=0.5")
    rded = RdedLabels(build_model("resnet18", 3, 32, 8), "cutmix", fast=False)
    assert loss_settings(rded, cfg.student) == {"mode": "kl", "temperature": 20.0, "beta": 0.0}
    assert RdedLabels(build_model("resnet18", 3, 32, 8), "mixup", fast=False).temperature == RDED_TEMPERATURE["mixup"] == 4
    assert loss_settings(HardLabels(6), cfg.student) == {"mode": "mse", "temperature": 4.0, "beta": 1.0}
    assert rded.label_bytes == teacher_bytes("resnet18", 3, 32, 8)


def test_rded_without_a_full_observer_says_what_to_run(tiny_run, tmp_path):
    run_dir = tiny_run[0]
    cfg = tiny_config()
    pipe = Pipeline(cfg, run_dir, device="cpu")
    distilled = load_distilled(os.path.join(run_dir, "refine"))
    with pytest.raises(HelloError, match=r"rded in student.label_sources.*hello-fast teachers --out"):
        label_source("rded", cfg, pipe.run, distilled, str(tmp_path), "cpu", pipe.data()[0])
    # listing rded makes the teachers stage keep the fully trained network: its fingerprint moves
    rded = Pipeline(tiny_config("student.label_sources=[rded]", "teachers.epochs=3"), run_dir, device="cpu")
    assert rded.fingerprint("teachers") != pipe.fingerprint("teachers")
    assert "teachers" in rded.reads("student", "rded")


SOURCES = ["rded", "stored", "stored_int8", "stored_int4", "stored_topk", "stored_pool"]


@pytest.fixture(scope="module")
def sources_run(tmp_path_factory):
    """A tiny run whose students use every baseline source, with the loss settings each student loop received."""
    out = str(tmp_path_factory.mktemp("sources"))
    cfg = tiny_config(f"student.label_sources=[{','.join(SOURCES)}]", "teachers.epochs=3", "refine.enabled=false",
                      "student.stored_topk=2", "student.stored_pool_fraction=0.25", "student.epochs=2",
                      "student.batch_size=3")
    seen = []
    original = st.soft_label_loss

    def recording(*args, **kwargs):
        seen.append((kwargs["mode"], kwargs["temperature"], kwargs["beta"]))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(st, "soft_label_loss", recording)
        results = Pipeline(cfg, out, device="cpu").distill()
    return cfg, out, results, seen


@pytest.mark.slow
def test_every_baseline_source_trains_a_student_with_exact_bytes(sources_run):
    cfg, out, results, seen = sources_run
    students = results["students"]
    assert set(students) == set(SOURCES)
    for name in SOURCES:
        assert 0 <= students[name]["top1_last"] <= 100 and math.isfinite(students[name]["top1_best"]), name
    # rded: the fully trained network (teachers.epochs) labels, with RDED's loss, and ships as its safetensors bytes
    run = Pipeline(cfg, out, device="cpu").run
    assert run.done("teachers")["summary"]["observer"] == "epoch_003.safetensors"
    assert students["rded"]["label_bytes"] == teacher_bytes("resnet18", 3, 32, 8)
    assert ("kl", 20.0, 0.0) in seen and ("mse", 4.0, 0.1) in seen  # rded's own loss beside the student.loss of the others
    images, C, epochs = 6, 3, 2
    per_crop = {"stored": label_payload_bytes("fp16", C), "stored_int8": C * 1 + 4, "stored_int4": 2 + 4,
                "stored_topk": 2 * (2 + 2) + 2, "stored_pool": label_payload_bytes("fp16", C)}
    assert per_crop["stored"] == C * 2
    for name in STORED:
        folder = os.path.join(out, "student", name, "labels")
        stored = StoredLabels(folder, "cpu")
        files = [load_file(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
        payload_keys = (".logits", ".q", ".scale", ".values", ".indices", ".fill")
        params = sum(t.numel() * t.element_size() for d in files for k, t in d.items() if k != "steps" and not k.endswith(payload_keys))
        crops = epochs * images if name != "stored_pool" else stored.index["pool"]["kept"] * 3
        assert stored.payload_bytes == crops * per_crop[name], name
        assert stored.param_bytes == params > 0
        assert students[name]["label_bytes"] == stored.payload_bytes + stored.param_bytes
    # the pool: 25 % of the schedule's 4 batches are kept, and every epoch replays only them, each with its own label
    pool = StoredLabels(os.path.join(out, "student", "stored_pool", "labels"), "cpu")
    assert pool.index["pool"] == {"kept": 1, "steps_per_epoch": 2}
    kept = load_file(os.path.join(out, "student", "stored_pool", "labels", StoredLabels.POOL))
    for epoch in (1, 2):
        steps = list(pool.epoch(epoch))
        assert len(steps) == 2
        for index, params, logits in steps:
            assert torch.equal(index, kept["0.index"]) and torch.equal(params["crop"], kept["0.crop"])
            assert torch.equal(logits, kept["0.logits"].float())


@pytest.mark.slow
def test_the_pool_cycles_through_every_kept_batch(sources_run, tmp_path):
    cfg, out, _, _ = sources_run
    folder = str(tmp_path / "labels")
    shutil.copytree(os.path.join(out, "student", "stored_pool", "labels"), folder)
    pool = StoredLabels(folder, "cpu")
    pool.index["pool"] = {"kept": 3, "steps_per_epoch": 5}  # the replay rule alone: a pool smaller than an epoch
    for epoch in (1, 2, 3):
        order = pool.pool_order(epoch)
        assert len(order) == 5 and set(order[:3]) == {0, 1, 2} and set(order) <= {0, 1, 2}
    assert pool.pool_order(1) == pool.pool_order(1)


def test_storage_lists_every_baseline(cli_here):
    out = cli_here("storage", "--set", "student.stored_topk=3")
    assert out.returncode == 0
    for line in ("stored_int8", "stored_int4", "top-3 per crop (stored_topk)", "LPLD pool, 0.1 of batches (stored_pool)"):
        assert line in out.stdout
    cfg = tiny_config("student.stored_topk=2", "student.stored_pool_fraction=0.5")
    r = storage_report(cfg, 3, ["a", "b", "c"])
    crops = cfg.student.epochs * 6
    params = r["sre2l_soft_label_bytes"] - crops * 3 * 2
    assert r["stored_int8_label_bytes"] == params + crops * (3 + 4)
    assert r["stored_int4_label_bytes"] == params + crops * (2 + 4)
    assert r["stored_topk_label_bytes"] == params + crops * (2 * 4 + 2)
    assert r["stored_pool_label_bytes"] == r["sre2l_soft_label_bytes"] // 2
    assert r["teacher_bytes"] == network_bytes(build_model("resnet18", 3, 32, 8))


def test_layout_says_when_a_run_has_no_teachers(tmp_path):
    from hello_fast.rundir import RunDir

    with pytest.raises(HelloError, match="no finished teachers stage"):
        observer_path(RunDir(str(tmp_path)), full=True)
