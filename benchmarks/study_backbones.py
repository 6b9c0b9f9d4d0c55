"""Projector backbones compared over student seeds: does a real prior (EfficientNet-Lite0's ImageNet weights) label better than a random CLIP?

Takes a run whose teachers and selection are finished; for each variant (a name and projector
overrides) it trains the projector on the same weak teachers in its own run (the package's study
code links the finished stages the variant leaves unchanged: hello_fast.study), refines the same
selected images with it, and trains one student per (label source, student seed).
Results: backbones_<config>[_<tag>].json/.csv (every student with its label bytes, the projector's
zero-shot and final val top-1 and its training time; mean and spread per variant and source).

    python benchmarks/study_backbones.py --run runs/mnist5k --seeds 0 1 2 \\
        --variant clip_random \\
        --variant lite0_prototypes projector.backbone=efficientnet_lite0 projector.head_init=prototypes
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write  # noqa: E402
from study_small_images import run_variant, study_arguments, summarise  # noqa: E402

from hello_fast.config import load_config  # noqa: E402


def main(argv=None) -> int:
    args = study_arguments(__doc__, "teachers and select", ["hard", "teacher", "projector"], "backbones").parse_args(argv)
    name = load_config(os.path.join(args.run, "config.yaml")).name
    work = args.work or tempfile.mkdtemp(prefix="backbones_")
    rows = []
    for variant in args.variant:
        rows += run_variant(args.run, work, variant[0], variant[1:], args.sources, args.seeds, args.eval_every,
                            reuse=("teachers", "select"))
        summary = summarise(rows)  # written after every variant: an interrupted study keeps what it measured
        projectors = {r["variant"]: {k: r[k] for k in ("projector_zero_shot_top1", "projector_top1", "projector_seconds")}
                      for r in rows}
        write(f"backbones_{name}" + (f"_{args.tag}" if args.tag else ""), rows,
              {"run": os.path.abspath(args.run), "seeds": args.seeds, "summary": summary, "projectors": projectors},
              args.out)
    for s in summary:
        sd = f" ± {s['top1_last_sd']:.1f}" if s["top1_last_sd"] is not None else ""
        print(f"{s['variant']:>18} {s['source']:>9}: top-1 last {s['top1_last_mean']:.1f}{sd} (best {s['top1_best_mean']:.1f}), "
              f"{s['label_bytes']:,} label bytes [{s['overrides'] or 'the config as it is'}]")
    for v, pr in projectors.items():
        print(f"{v:>18} projector: zero-shot {pr['projector_zero_shot_top1']}, trained {pr['projector_top1']} % val top-1, "
              f"{pr['projector_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
