"""What small images cost the student: selection and student settings compared over several student seeds.

Takes a run whose teachers and projector are finished; for each variant (a name and config
overrides) it redoes selection and refinement in its own run (the package's study code links the
finished stages whose fingerprints the variant leaves unchanged: hello_fast.study), then trains one
student per (label source, student seed). The student seed changes only the student's init and
its augmentation stream, so the spread between seeds is the noise that a single run hides.
Results: small_images_<config>[_<tag>].json/.csv (every student, and mean and spread per variant and source).

    python benchmarks/study_small_images.py --run runs/digits --seeds 0 1 2 \\
        --variant base --variant crop50 select.crop_scale=[0.5,1.0] --variant tile1 select.factor=1
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import RESULTS_DIR, write  # noqa: E402

from hello_fast.config import load_config  # noqa: E402
from hello_fast.pipeline import Pipeline  # noqa: E402
from hello_fast.rundir import RunDir  # noqa: E402
from hello_fast.study import prepare_variant, train_cell  # noqa: E402


def run_variant(base_run: str, work: str, name: str, overrides: list[str], sources, seeds, eval_every: int,
                reuse: tuple[str, ...] = ("teachers", "projector")) -> list[dict]:
    """One variant's students over `seeds`, in its own run under `work` that links `base_run`'s finished stages
    where their fingerprints match (hello_fast.study.prepare_variant); the `reuse` stages must match."""
    folder = os.path.join(work, name)
    shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(os.path.join(base_run, "config.yaml"), list(overrides) + [f"student.eval_every={eval_every}"])
    probe = Pipeline(cfg, folder, device="cpu")  # fingerprints only: it runs nothing
    for stage in reuse:  # reused, not retrained: the variant may change only the other stages
        if not RunDir(base_run).is_current(stage, probe.fingerprint(stage)):
            raise SystemExit(f"variant {name}: {overrides} changes the {stage} stage, which this study keeps")
    pipe, linked = prepare_variant(cfg, folder, [base_run], sources, device="cpu", stages=("select", "projector", "refine"))
    select = pipe.run.done("select")["summary"]
    projector = pipe.run.done("projector")["summary"]
    rows = []
    for source in sources:
        for seed in seeds:
            c = copy.deepcopy(cfg)
            c.seed = seed
            start = time.perf_counter()
            r = train_cell(pipe, c, source, tempfile.mkdtemp(dir=folder))
            rows.append({"variant": name, "overrides": " ".join(overrides), "source": source, "seed": seed,
                         "top1_last": round(r["top1_last"], 2), "top1_best": round(r["top1_best"], 2),
                         "mean_selected_ce": round(select.get("mean_selected_ce", float("nan")), 4),
                         "label_bytes": r["label_bytes"],
                         "projector_zero_shot_top1": projector.get("zero_shot_top1"),
                         "projector_top1": projector["top1"][max(projector["top1"], key=int)] if projector.get("top1") else None,
                         "projector_seconds": None if "projector" in linked else round(projector.get("seconds", 0.0), 1),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name} {source} seed {seed}: top-1 last {r['top1_last']:.1f}%, best {r['top1_best']:.1f}%", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["variant"], r["source"]) for r in rows):
        mine = [r for r in rows if (r["variant"], r["source"]) == key]
        last = [r["top1_last"] for r in mine]
        out.append({"variant": key[0], "source": key[1], "overrides": mine[0]["overrides"], "seeds": len(mine),
                    "top1_last_mean": round(statistics.mean(last), 2),
                    "top1_last_sd": round(statistics.stdev(last), 2) if len(last) > 1 else None,
                    "top1_best_mean": round(statistics.mean(r["top1_best"] for r in mine), 2),
                    "label_bytes": mine[0].get("label_bytes")})
    return out


def study_arguments(doc: str, kept: str, sources: list[str], prefix: str) -> argparse.ArgumentParser:
    """The command line every variants-over-student-seeds study takes (`kept`: the stages the run must have finished)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help=f"a run directory with finished {kept} stages")
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                   help="a variant: its name, then config overrides (repeatable)")
    p.add_argument("--sources", nargs="+", default=sources, help="label sources")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    p.add_argument("--eval-every", type=int, default=10, help="student epochs between evaluations (the last always)")
    p.add_argument("--work", default=None, help="where the variants' run copies go (default: a temporary folder)")
    p.add_argument("--tag", default="", help=f"results file name suffix: {prefix}_<config>_<tag>")
    p.add_argument("--out", default=RESULTS_DIR)
    return p


def main(argv=None) -> int:
    args = study_arguments(__doc__, "teachers and projector", ["hard", "projector"], "small_images").parse_args(argv)
    name = load_config(os.path.join(args.run, "config.yaml")).name
    work = args.work or tempfile.mkdtemp(prefix="small_images_")
    rows = []
    for variant in args.variant:
        rows += run_variant(args.run, work, variant[0], variant[1:], args.sources, args.seeds, args.eval_every)
        summary = summarise(rows)  # written after every variant: an interrupted study keeps what it measured
        write(f"small_images_{name}" + (f"_{args.tag}" if args.tag else ""), rows, {"run": os.path.abspath(args.run), "seeds": args.seeds, "summary": summary},
              args.out)
    for s in summary:
        sd = f" ± {s['top1_last_sd']:.1f}" if s["top1_last_sd"] is not None else ""
        print(f"{s['variant']:>12} {s['source']:>9}: top-1 last {s['top1_last_mean']:.1f}{sd} (best {s['top1_best_mean']:.1f}) "
              f"[{s['overrides'] or 'the config as it is'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
