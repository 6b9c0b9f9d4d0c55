"""`hello-fast study NAME`: the studies' variants, resumable cells, study.json/study.md, and continual learning's subsets."""
import json
import os

import pytest
import torch
from conftest import tiny_config, tiny_sets

from hello_fast import study as study_module
from hello_fast.config import load_config
from hello_fast.data.sources import FileImageSet, TensorImageSet
from hello_fast.data.subset import class_subset
from hello_fast.errors import HelloError
from hello_fast.labels import HardLabels, LabelSource, RestrictedLabels
from hello_fast.stages.teachers import trains_full
from hello_fast.studies import STUDIES, label_sources, paper_figure, plan
from hello_fast.study import _continual_steps, run_study

ROW_KEYS = {"variant", "source", "arch", "seed", "step", "top1_last", "top1_best", "label_bytes"}


def test_help_lists_every_study(cli_here):
    out = cli_here("study", "--help")
    assert out.returncode == 0
    for name in STUDIES:
        assert name in out.stdout


def test_the_sources_study_takes_every_source_the_config_accepts():
    cfg = load_config("digits")
    (base,) = plan("sources", cfg)
    assert base.sources == label_sources() and {"hard", "teacher", "projector", "stored"} <= set(base.sources)
    assert plan("sources", cfg, ["hard", "stored"])[0].sources == ("hard", "stored")
    with pytest.raises(HelloError, match="unknown label source 'soft'"):
        plan("sources", cfg, ["soft"])
    with pytest.raises(HelloError, match="study ranks fixes its label sources"):
        plan("ranks", cfg, ["hard"])
    with pytest.raises(HelloError, match="unknown study"):
        plan("tables", cfg)


def test_a_variants_sources_make_its_stages_what_they_need():
    """A study comparing rded trains the teachers on to a fully trained network (the rded source's teacher); one that
    does not compare it keeps the weak teachers' run short, and the default distill's fingerprints."""
    cfg = load_config("digits")
    (base,) = plan("sources", cfg)
    with_rded = study_module.variant_config(cfg, base)
    assert list(with_rded.student.label_sources) == list(base.sources) and trains_full(with_rded)
    (plain,) = plan("sources", cfg, ["hard", "projector"])
    assert not trains_full(study_module.variant_config(cfg, plain))


def test_variants_express_the_papers_rows():
    cfg = load_config("imagenet100-ipc10")
    windows = [v.name for v in plan("teacher-stages", cfg)]
    assert windows == ["1-41", "11-51", "21-61", "31-71", "41-81"]  # 51-91 is past the 90-epoch schedule
    assert [v.name for v in plan("ranks", cfg)] == ["conv4-head32", "conv8-head64", "conv12-head96", "conv16-head128"]
    assert [v.name for v in plan("ipc", cfg)] == ["ipc1", "ipc10", "ipc50"]
    assert [v.overrides for v in plan("archs", cfg)][0] == ("student.arch=resnet18",)
    ablation = {v.name: v for v in plan("ablation", load_config("imagenet1k-ipc10"))}
    assert ablation["zero-shot"].overrides[0] == "projector.epochs=0"
    assert "projector.mse_weight=0" in ablation["probe"].overrides and "projector.conv_rank=0" in ablation["probe"].overrides
    assert ablation["hard-labels"].sources == ("hard",)
    # every variant is a valid config, and the paper's figure sits beside the rows it has one for
    for name in STUDIES:
        for v in plan(name, cfg):
            study_module.with_overrides(cfg, v.overrides)
    in1k = load_config("imagenet1k-ipc10")
    assert paper_figure("sources", in1k, plan("sources", in1k)[0], 0, "projector", "resnet18") == "43.7 ± 0.1 (3.3MB)"
    assert paper_figure("ablation", in1k, ablation["probe"], 1, "projector", "resnet18").startswith("28.2 ± 0.2")
    assert paper_figure("archs", cfg, plan("archs", cfg)[4], 4, "rded", "swin_v2_t") == "18.0 ± 0.1"
    assert paper_figure("ranks", cfg, plan("ranks", cfg)[1], 1, "projector", "resnet18").startswith("48.9")


def test_class_subset_keeps_the_classes_images_relabelled_in_order():
    images = torch.randint(0, 255, (8, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    full = TensorImageSet(images, labels, ["a", "b", "c", "d"])
    sub = class_subset(full, [2, 0])
    assert sub.class_names == ["c", "a"] and sub.num_classes == 2
    assert sub.labels.tolist() == [1, 0, 1, 0]  # images 0, 2, 4, 6: classes a, c, a, c
    assert torch.equal(sub.images, images[[0, 2, 4, 6]])
    files = FileImageSet([f"{i}.png" for i in range(8)], labels.tolist(), ["a", "b", "c", "d"])
    fsub = class_subset(files, [3])
    assert fsub.files == ["3.png", "7.png"] and fsub.labels.tolist() == [0, 0] and fsub.class_names == ["d"]
    for bad in ([], [0, 0], [4]):
        with pytest.raises(HelloError, match="class subset"):
            class_subset(full, bad)


class _Fixed(LabelSource):
    name = "teacher"
    mean = (0.5,)

    def __call__(self, batch):
        return torch.arange(12.0).reshape(3, 4)


def test_restricted_labels_slice_the_seen_classes_columns():
    wrapped = RestrictedLabels(_Fixed(), [3, 1])
    assert wrapped(None).tolist() == [[3.0, 1.0], [7.0, 5.0], [11.0, 9.0]]
    assert wrapped.name == "teacher" and wrapped.mean == (0.5,) and not wrapped.replays
    hard = RestrictedLabels(HardLabels(5), [0])
    assert hard(None) is None and hard.label_bytes == 40


def test_continual_steps_grow_by_a_seeded_class_order():
    steps = _continual_steps(10, 5, seed=0)
    assert [len(s) for s in steps] == [2, 4, 6, 8, 10] and sorted(steps[-1]) == list(range(10))
    assert all(a == b[: len(a)] for a, b in zip(steps, steps[1:]))  # each step adds classes to the last
    assert _continual_steps(10, 5, seed=0) == steps and _continual_steps(10, 5, seed=1) != steps
    with pytest.raises(HelloError, match="--steps must be between 1 and the class count"):
        _continual_steps(3, 4, seed=0)


def test_a_study_writes_its_table_and_a_killed_one_resumes_without_redoing_cells(tiny_run, tmp_path, cli_here, monkeypatch):
    run, _ = tiny_run
    out = tmp_path / "study"
    r = cli_here("study", "sources", *tiny_sets("student.epochs=1"), "--seeds", "0", "1", "--sources", "hard", "teacher",
                 "--reuse", run, "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "study.json").read_text())
    assert doc["study"] == "sources"
    assert [(row["source"], row["seed"]) for row in doc["rows"]] == [("hard", 0), ("hard", 1), ("teacher", 0), ("teacher", 1)]
    assert all(set(row) == ROW_KEYS and row["step"] is None and row["arch"] == "resnet18" for row in doc["rows"])
    assert all(row["label_bytes"] > 0 for row in doc["rows"])
    table = (out / "study.md").read_text()
    assert "| base | hard | resnet18 |" in table and " ± " in table and (out / "study.png").stat().st_size > 0
    assert not os.path.exists(out / "runs" / "base" / "select" / ".partial")
    # the stages came from the finished run: no stage ran again
    assert os.path.samefile(out / "runs" / "base" / "select" / "done.json", os.path.join(run, "select", "done.json"))

    # killed after every cell finished: a rerun trains nothing and gives the same rows
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3].name)
        return real(*args, **kwargs)

    real = study_module.student.train_student
    monkeypatch.setattr(study_module.student, "train_student", counting)
    cfg = load_config(str(out / "config.yaml"))
    again = run_study("sources", cfg, str(out), seeds=[0, 1], sources=["hard", "teacher"], device="cpu")
    assert calls == [] and again["rows"] == doc["rows"]
    # killed with one cell unfinished: exactly that one trains
    cells = sorted(p for p in (out / "cells").glob("*.json"))
    cells[0].unlink()
    again = run_study("sources", cfg, str(out), seeds=[0, 1], sources=["hard", "teacher"], device="cpu")
    assert len(calls) == 1 and len(again["rows"]) == 4
    # another student seed is another cell; the same seed with other student options is too
    run_study("sources", cfg, str(out), seeds=[2], sources=["hard"], device="cpu")
    assert len(calls) == 2


def test_continual_trains_each_step_on_the_seen_classes_only(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    seen = []

    def fake(cfg, distilled, val_set, source, device, out_dir, **kw):
        seen.append((distilled.num_classes, sorted(set(distilled.labels.tolist())), sorted(set(val_set.labels.tolist())),
                     val_set.class_names, source.name, type(source).__name__))
        return {"top1_last": 50.0, "top1_best": 60.0, "label_bytes": source.label_bytes, "history": []}

    monkeypatch.setattr(study_module.student, "train_student", fake)
    cfg = tiny_config()
    doc = run_study("continual", cfg, str(tmp_path / "c"), seeds=[0], steps=3, sources=["hard", "projector"],
                    reuse=[run], device="cpu")
    assert [(r["source"], r["step"], r["classes"]) for r in doc["rows"]] == [
        ("hard", 1, 1), ("hard", 2, 2), ("hard", 3, 3), ("projector", 1, 1), ("projector", 2, 2), ("projector", 3, 3)]
    order = _continual_steps(3, 3, seed=0)
    names = json.loads((tmp_path / "c" / "runs" / "base" / "select" / "distilled.json").read_text())["class_names"]
    for classes, (n, train_labels, val_labels, val_names, _, kind) in zip(order * 2, seen):
        # the student has one output per seen class; it trains and is evaluated on those classes' images only
        assert n == len(classes) and train_labels == list(range(n)) and val_labels == list(range(n))
        assert val_names == [names[c] for c in classes] and kind == "RestrictedLabels"
    assert "| base | projector | resnet18 | 3 | 3 |" in (tmp_path / "c" / "study.md").read_text()


def test_the_ablations_options_zero_shot_and_a_ce_probe(tiny_run, tmp_path, monkeypatch):
    """projector.epochs=0 writes the untrained (zero-shot) artifact; projector.mse_weight=0 ignores the teachers."""
    from safetensors.torch import load_file

    from hello_fast.layout import artifact_path
    from hello_fast.stages import projector as projector_stage

    run, _ = tiny_run
    pipe, linked = study_module.prepare_variant(tiny_config("projector.epochs=0", "refine.enabled=false"),
                                                str(tmp_path / "zero"), [run], ["projector"], device="cpu")
    assert linked == ["teachers", "select"]  # only the projector changed
    summary = pipe.run.done("projector")["summary"]
    assert summary["top1"] == {} and summary["zero_shot_top1"] >= 0
    tensors = load_file(artifact_path(pipe.run))
    assert tensors and all(not t.any() for k, t in tensors.items() if "lora_b" in k)  # LoRA starts at zero

    def artifact(folder):
        p, _ = study_module.prepare_variant(tiny_config("projector.mse_weight=0", "refine.enabled=false"),
                                            str(tmp_path / folder), [run], ["projector"], device="cpu")
        return load_file(artifact_path(p.run))

    probe = artifact("probe")
    monkeypatch.setattr(projector_stage, "mean_teacher_logits", lambda teachers, x: torch.full((len(x), 3), 1e3))
    other_teachers = artifact("probe_other_teachers")
    assert probe.keys() == other_teachers.keys()
    assert all(torch.equal(probe[k], other_teachers[k]) for k in probe)
