"""Running a study (`hello-fast study NAME`): the paper's tables and figures, each cell a resumable unit.

A study (hello_fast/studies.py says what each is) is a list of variants (a name and config
overrides) x label sources x student seeds (x continual steps). Each variant has its own run directory, DIR/runs/<variant>; before its stages
run, every stage that another variant (or a `reuse` run) already finished with the same pipeline
fingerprint is hard-linked in, so a variant redoes exactly the stages its overrides change (the
Pipeline's fingerprints decide, nothing here keeps a second list). Then one student per cell trains
with `train_student`; its row is written atomically to DIR/cells/<id>.json, where the id carries a
hash of everything that determines the cell (its stages' fingerprints, the student options with
the cell's seed and architecture, the source, the continual step's classes). A rerun skips
finished cells; a killed cell resumes from its last epoch checkpoint in DIR/cells/<id>/.

Results: DIR/study.json ({"study", "rows": [{variant, source, arch, seed, step, top1_last,
top1_best, label_bytes}]}), DIR/study.md (mean ± s.d. over seeds beside the paper's figure) and
DIR/study.png (the accuracy-storage frontier for sources/ipc, accuracy per step for continual).

Continual (GDumb's protocol as SRe2L, RDED and HeLlO use it): the classes in an order drawn from
the student seed, split into `steps` groups; at step k a new student trains from scratch on the
distilled images of the classes seen so far, with one output per seen class and the source's soft
labels sliced to those classes' columns, and is evaluated on those classes' val images.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import statistics
from dataclasses import dataclass

import torch

from hello_fast import distributed
from hello_fast._io import read_json, write_bytes, write_json
from hello_fast._progress import log, progress
from hello_fast.config import Config, save_config, with_overrides
from hello_fast.data.distilled import load_distilled
from hello_fast.data.subset import class_subset
from hello_fast.data.validate import CACHE_NAME
from hello_fast.errors import HelloError
from hello_fast.labels import RestrictedLabels, label_source
from hello_fast.layout import distilled_stage
from hello_fast.pipeline import Pipeline, stage_order
from hello_fast.rundir import RunDir
from hello_fast.stages import student
from hello_fast.studies import STUDIES, Variant, paper_figure, paper_setting, plan


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _link_tree(src: str, dst: str) -> None:
    """A copy of a finished stage folder made of hard links (a real copy across filesystems): stages never write
    into a finished folder (a redo builds a new one in .partial), so the links are never written through."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


def _stage_order(pipe: Pipeline, sources, stages=()) -> list[str]:
    """The stages the sources' students read (and `stages`), with everything they read, in the pipeline's order."""
    needed, todo = set(), [s for source in sources for s in pipe.reads("student", source)] + list(stages)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += pipe.reads(stage)
    return [s for s in stage_order(pipe.cfg) if s in needed]


def link_finished_stages(pipe: Pipeline, stages, donors) -> list[str]:
    """Hard-link into pipe's run each of `stages` that a donor run finished with the same fingerprint (and the
    image check's cache); returns the stages linked. Rank 0 links, the other ranks wait."""
    linked = []
    if distributed.world().main:
        donors = [RunDir(d) for d in donors if os.path.realpath(d) != os.path.realpath(pipe.run.root)]
        with pipe.run.lock():
            cache = next((d.path(CACHE_NAME) for d in donors if os.path.isfile(d.path(CACHE_NAME))), None)
            if cache and not os.path.exists(pipe.run.path(CACHE_NAME)):
                shutil.copy2(cache, pipe.run.path(CACHE_NAME))
            for stage in stages:
                fp = pipe.fingerprint(stage)
                if pipe.run.is_current(stage, fp):
                    continue
                donor = next((d for d in donors if d.is_current(stage, fp)), None)
                if donor is not None:
                    shutil.rmtree(pipe.run.path(stage), ignore_errors=True)
                    _link_tree(donor.path(stage), pipe.run.path(stage))
                    linked.append(stage)
    distributed.barrier()
    return linked


def prepare_variant(cfg: Config, folder: str, donors, sources, device=None, stages=()) -> tuple[Pipeline, list[str]]:
    """The variant's run directory with every stage its sources' students read (and `stages`) finished and current:
    linked from a donor run that finished it with the same fingerprint, run here otherwise. Returns the Pipeline
    and the stages linked."""
    pipe = Pipeline(cfg, folder, device=device)
    order = _stage_order(pipe, sources, stages)
    linked = link_finished_stages(pipe, order, donors)
    if linked:
        log(f"study: {os.path.basename(folder)}: reusing finished {', '.join(linked)} (same fingerprints)")
    for stage in order:
        pipe.run_stage(stage)
    return pipe, linked


def _continual_steps(num_classes: int, steps: int, seed: int) -> list[list[int]]:
    """The classes seen by each step: a seeded class order cut into `steps` near-equal groups, accumulated."""
    if not 1 <= steps <= num_classes:
        raise HelloError(f"--steps must be between 1 and the class count ({num_classes}), got {steps}")
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    groups = torch.tensor_split(order, steps)
    return [torch.cat(groups[: k + 1]).tolist() for k in range(steps)]


@dataclass(frozen=True)
class _Cell:
    variant: Variant
    source: str
    seed: int
    step: int | None = None
    classes: tuple[int, ...] | None = None


def _cell_id(pipe: Pipeline, cfg: Config, cell: _Cell) -> str:
    """A readable name and a hash of everything that determines the cell's result."""
    parts = [cell.source, json.dumps(cell.classes)]
    parts += [pipe.fingerprint(s) for s in pipe.reads("student", cell.source)]
    parts += [cfg.fingerprint(*student.STAGE.options), *student.STAGE.identity(cfg, cell.source)]
    step = "" if cell.step is None else f".step{cell.step}"
    return f"{cell.variant.name}.{cell.source}.{cfg.student.arch}.seed{cell.seed}{step}.{_hash(*parts)}"


def train_cell(pipe: Pipeline, cfg: Config, source: str, work: str, classes=None) -> dict:
    """One student on the variant's distilled images with `source` labels (`cfg`: the variant's config with the
    student's seed); `classes`: a continual step's seen classes. Returns train_student's result; resumes from `work`."""
    distilled = load_distilled(pipe.run.path(distilled_stage(cfg)))
    train_set, val_set = pipe.data()
    if classes is not None:
        distilled, val_set = class_subset(distilled, classes), class_subset(val_set, classes)
    # (the full train set: a projector's artifact is checked against every class of the data)
    labeler = label_source(source, cfg, pipe.run, distilled, work, pipe.device, train_set)
    if classes is not None:
        labeler = RestrictedLabels(labeler, classes)
    return student.train_student(cfg, distilled, val_set, labeler, pipe.device, work)


def _cell_row(study_dir: RunDir, pipe: Pipeline, vcfg: Config, cell: _Cell) -> dict:
    """The cell's row: read back when a finished cell left it, else its student trained (rank 0 writes the row)."""
    cfg = copy.deepcopy(vcfg)
    cfg.seed = cell.seed  # the student seed: its init and augmentation stream; the stages keep theirs
    cid = _cell_id(pipe, cfg, cell)
    path = study_dir.path("cells", cid + ".json")
    if os.path.isfile(path):
        return read_json(path)
    log(f"study: cell {cid}")
    work = study_dir.path("cells", cid)
    r = train_cell(pipe, cfg, cell.source, work, cell.classes)
    row = {"variant": cell.variant.name, "source": cell.source, "arch": cfg.student.arch, "seed": cell.seed,
           "step": cell.step, "top1_last": r["top1_last"], "top1_best": r["top1_best"], "label_bytes": r["label_bytes"]}
    if cell.classes is not None:
        row["classes"] = len(cell.classes)
    if distributed.world().main:
        write_json(path, row)
        shutil.rmtree(os.path.join(work, "labels"), ignore_errors=True)  # stored labels: gigabytes at scale
    distributed.barrier()
    return row


def variant_config(cfg: Config, variant: Variant) -> Config:
    """The study's config with the variant's overrides, and the variant's sources as its label_sources: what the
    stages do depends on them (listing rded makes the teachers stage keep its fully trained network)."""
    return with_overrides(cfg, list(variant.overrides) + [f"student.label_sources=[{','.join(variant.sources)}]"])


def run_study(name: str, cfg: Config, out: str, *, seeds=(0, 1, 2), steps: int = 5, sources=None, reuse=(),
              device=None) -> dict:
    """Run (or resume) study `name` over `cfg` into `out`; returns the study.json document.

    `sources`: the label sources to compare (studies that compare them; default every source); `steps`: the
    continual study's steps; `reuse`: finished run directories whose current stages the variants may link."""
    variants = plan(name, cfg, sources)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise HelloError("a study needs at least one seed (--seeds)")
    if name == "continual" and steps < 1:
        raise HelloError(f"--steps must be at least 1, got {steps}")
    per_seed = steps if name == "continual" else 1
    distributed.setup(device or cfg.device)  # under torchrun: join the group first, so that rank 0 alone locks and writes
    study_dir = RunDir(out)
    with study_dir.lock():
        if distributed.world().main:
            os.makedirs(study_dir.path("cells"), exist_ok=True)
            save_config(cfg, study_dir.path("config.yaml"))  # a rerun without --config goes on with this config
        rows = []
        folders = [study_dir.path("runs", v.name) for v in variants]
        bar = progress(desc=f"study {name}", total=sum(len(v.sources) for v in variants) * len(seeds) * per_seed,
                       unit="cell")
        with bar:
            for v, folder in zip(variants, folders):
                bar.set_postfix(variant=v.name)
                vcfg = variant_config(cfg, v)
                donors = [f for f in folders if f != folder] + list(reuse)
                pipe, _ = prepare_variant(vcfg, folder, donors, v.sources, device=device)
                cells = [_Cell(v, source, seed) for source in v.sources for seed in seeds]
                if name == "continual":
                    cells = [_Cell(v, c.source, c.seed, k + 1, tuple(seen)) for c in cells
                             for k, seen in enumerate(_continual_steps(pipe.data()[0].num_classes, steps, c.seed))]
                for cell in cells:
                    rows.append(_cell_row(study_dir, pipe, vcfg, cell))
                    bar.update(1)
        doc = {"study": name, "config": cfg.name, "paper_setting": paper_setting(name, cfg), "seeds": seeds, "rows": rows}
        if distributed.world().main:
            write_json(study_dir.path("study.json"), doc)
            write_bytes(study_dir.path("study.md"), study_table(doc, cfg, variants).encode(), "study table")
            plot_study(doc, study_dir.path("study.png"))
    return doc


def _mean_sd(values) -> str:
    values = list(values)
    m = statistics.mean(values)
    return f"{m:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (variant, source, arch, step) in row order: mean and s.d. of top-1 over the seeds."""
    out = []
    for key in dict.fromkeys((r["variant"], r["source"], r["arch"], r["step"]) for r in rows):
        mine = [r for r in rows if (r["variant"], r["source"], r["arch"], r["step"]) == key]
        last, best = [r["top1_last"] for r in mine], [r["top1_best"] for r in mine]
        out.append({"variant": key[0], "source": key[1], "arch": key[2], "step": key[3], "seeds": len(mine),
                    "top1_last": _mean_sd(last), "top1_best": _mean_sd(best),
                    "top1_last_mean": statistics.mean(last),
                    "top1_last_sd": statistics.stdev(last) if len(last) > 1 else 0.0,
                    "label_bytes": int(statistics.mean(r["label_bytes"] for r in mine)),
                    "classes": mine[0].get("classes")})
    return out


def study_table(doc: dict, cfg: Config, variants: list[Variant]) -> str:
    """study.md: one line per variant x source (x arch, x step), mean ± s.d. over seeds, the paper's figure beside."""
    by_name = {v.name: (i, v) for i, v in enumerate(variants)}
    step = doc["study"] == "continual"
    lines = [f"# Study {doc['study']}: {cfg.name}, seeds {', '.join(map(str, doc['seeds']))}", "",
             STUDIES[doc["study"]] + ".", "",
             "| variant | source | arch |" + (" step | classes |" if step else "")
             + " top-1 last (%) | top-1 best (%) | label bytes | paper: " + doc["paper_setting"] + " |",
             "|---|---|---|" + ("---|---|" if step else "") + "---:|---:|---:|---|"]
    for s in summarise(doc["rows"]):
        i, v = by_name[s["variant"]]
        fig = paper_figure(doc["study"], cfg, v, i, s["source"], s["arch"]) or "–"
        lines.append(f"| {s['variant']} | {s['source']} | {s['arch']} |" + (f" {s['step']} | {s['classes']} |" if step else "")
                     + f" {s['top1_last']} | {s['top1_best']} | {s['label_bytes']:,} | {fig} |")
    lines += ["", "Variants (config overrides over the study's config):", ""]
    lines += [f"- {v.name}: {' '.join(v.overrides) or 'the config as it is'}" for v in variants]
    if doc["study"] in ("sources", "ipc"):
        lines += ["", "The paper's stored-label figures are SRe2L's, on SRe2L's own images; rded is RDED's."]
    return "\n".join(lines) + "\n"


def plot_study(doc: dict, path: str) -> None:
    """sources/ipc: top-1 against label bytes (log x); continual: top-1 against classes seen; others: bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(doc["rows"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    if doc["study"] in ("sources", "ipc", "continual"):
        for source in dict.fromkeys(s["source"] for s in summary):
            mine = [s for s in summary if s["source"] == source]
            x = [s["classes"] if doc["study"] == "continual" else max(s["label_bytes"], 1) for s in mine]
            ax.errorbar(x, [s["top1_last_mean"] for s in mine], yerr=[s["top1_last_sd"] for s in mine], marker="o",
                        capsize=3, label=source, linestyle="-" if len(mine) > 1 else "none")
            if doc["study"] == "ipc":
                for xi, s in zip(x, mine):
                    ax.annotate(s["variant"], (xi, s["top1_last_mean"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        if doc["study"] == "continual":
            ax.set_xlabel("classes seen")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("label storage (bytes, log scale)")
        ax.legend(fontsize=8)
    else:
        names = [f"{s['variant']}\n{s['source']}" for s in summary]
        ax.bar(range(len(summary)), [s["top1_last_mean"] for s in summary], yerr=[s["top1_last_sd"] for s in summary],
               capsize=3)
        ax.set_xticks(range(len(summary)), names, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("student top-1, last epoch (%)")
    ax.set_title(f"study {doc['study']}: {doc['config']} ({len(doc['seeds'])} seed{'s' if len(doc['seeds']) > 1 else ''})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
