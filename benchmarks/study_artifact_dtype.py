"""Students trained on fp32, fp16 and int8 label artifacts: accuracy per student seed, and how far the labels moved.

Takes a finished run (its distilled images and projector artifact), writes the artifact in each
dtype, and trains one projector-labelled student per (dtype, seed) with the run's config; the
student seed changes the student's init and its augmentation stream, not the distilled set or the
artifact. Also measures the labels themselves on the same augmented batches: the largest logit
difference from fp32 and the share of argmax agreement. Results: artifact_dtype_<config>.json/.csv.

    python benchmarks/study_artifact_dtype.py --run runs/digits --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import RESULTS_DIR, write  # noqa: E402

from hello_fast.config import load_config  # noqa: E402
from hello_fast.data.distilled import load_distilled  # noqa: E402
from hello_fast.data.schedule import resident_set, views_for  # noqa: E402
from hello_fast.data.sources import load_splits  # noqa: E402
from hello_fast.labels import label_source  # noqa: E402
from hello_fast.layout import artifact_path, distilled_stage  # noqa: E402
from hello_fast.projector.artifact import convert_artifact  # noqa: E402
from hello_fast.rundir import RunDir  # noqa: E402
from hello_fast.stages.student import train_student  # noqa: E402

DTYPES = ("fp32", "fp16", "int8")


@torch.no_grad()
def label_drift(cfg, distilled, sources: dict, epochs: int = 10) -> dict:
    """Each dtype's labels against fp32's on the same augmented batches (`epochs` of the student's schedule):
    the largest |logit difference| and the share of argmax agreement (%)."""
    res = resident_set(cfg, distilled, "cpu")
    views = views_for(sources["fp32"], torch.device("cpu"), True)
    out = {d: {"max_abs_logit_diff": 0.0, "agree": 0, "n": 0} for d in DTYPES}
    for index in [i for _ in range(epochs) for i in res.epoch_order(cfg.student.batch_size)]:
        batch = res.make(index, res.draw(index), views=views)
        ref = sources["fp32"](batch)
        for d in DTYPES:
            got = sources[d](batch)
            out[d]["max_abs_logit_diff"] = max(out[d]["max_abs_logit_diff"], float((got - ref).abs().max()))
            out[d]["agree"] += int((got.argmax(1) == ref.argmax(1)).sum())
            out[d]["n"] += ref.shape[0]
    return {d: {"max_abs_logit_diff": v["max_abs_logit_diff"], "argmax_agree_pct": 100.0 * v["agree"] / v["n"]}
            for d, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run directory (select/refine and projector done)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="student seeds (none: only the labels' drift)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the run's config)")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)

    run = RunDir(args.run)
    base = load_config(run.path("config.yaml"))
    if args.epochs is not None:
        base.student.epochs = args.epochs
    distilled = load_distilled(run.path(distilled_stage(base)))
    train_set, val_set = load_splits(base.data, base.clip.class_names)
    tmp = tempfile.mkdtemp(prefix="artifact_dtype_")
    paths = {}
    for d in DTYPES:
        paths[d] = os.path.join(tmp, f"artifact_{d}.safetensors")
        convert_artifact(artifact_path(run), paths[d], d)
    rows = []
    for seed in args.seeds:
        for d in DTYPES:
            cfg = _with_artifact(base, paths[d])
            cfg.seed = seed
            source = label_source("projector", cfg, run, distilled, tmp, "cpu", train_set)
            out_dir = tempfile.mkdtemp(dir=tmp)
            r = train_student(cfg, distilled, val_set, source, torch.device("cpu"), out_dir)
            rows.append({"dtype": d, "seed": seed, "artifact_bytes": os.path.getsize(paths[d]),
                         "top1_last": round(r["top1_last"], 2), "top1_best": round(r["top1_best"], 2)})
            print(f"{d} seed {seed}: top-1 last {r['top1_last']:.1f}%, best {r['top1_best']:.1f}%", flush=True)
    sources = {d: label_source("projector", _with_artifact(base, paths[d]), run, distilled, tmp, "cpu", train_set)
               for d in DTYPES}
    drift = label_drift(base, distilled, sources)
    summary = {}
    for d in DTYPES:
        mine = [r for r in rows if r["dtype"] == d]
        summary[d] = {"artifact_bytes": os.path.getsize(paths[d]), **drift[d]}
        for k in ("top1_last", "top1_best") if mine else ():
            summary[d][f"{k}_mean"] = round(statistics.mean(r[k] for r in mine), 2)
            ref = {r["seed"]: r[k] for r in rows if r["dtype"] == "fp32"}
            summary[d][f"{k}_mean_diff_vs_fp32"] = round(statistics.mean(r[k] - ref[r["seed"]] for r in mine), 2)
    write(f"artifact_dtype_{base.name}", rows, {"run": os.path.abspath(args.run), "seeds": args.seeds,
                                                 "student_epochs": base.student.epochs, "summary": summary}, args.out)
    for d, s in summary.items():
        students = (f"top-1 last {s['top1_last_mean']:.2f} ({s['top1_last_mean_diff_vs_fp32']:+.2f} vs fp32), best "
                    f"{s['top1_best_mean']:.2f} ({s['top1_best_mean_diff_vs_fp32']:+.2f}); " if rows else "")
        print(f"{d}: {s['artifact_bytes']:,} B; {students}labels: max |diff| {s['max_abs_logit_diff']:.4f}, "
              f"argmax agree {s['argmax_agree_pct']:.1f}%")
    return 0


def _with_artifact(cfg, path):
    cfg = copy.deepcopy(cfg)
    cfg.student.artifact = path
    return cfg


if __name__ == "__main__":
    sys.exit(main())
