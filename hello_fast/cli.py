"""The `hello-fast` command (also `python -m hello_fast`): the pipeline's stages, artifact inspection, storage figures."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

DESCRIPTION = """\
HeLlO dataset distillation with online soft labels: a LoRA-adapted CLIP projector replaces
gigabytes of stored soft labels with a ~3 MB label artifact.

Stages (each reads and writes one run directory; finished stages are skipped on a rerun):
  teachers   0: train one ResNet-18 and keep early checkpoints (the weak teachers)
  select     1: RDED patch selection with an observer, or a random real subset
  projector  2: train LoRA on a CLIP image tower + text-embedding head -> label artifact
  refine     3: (optional) update the distilled images within the projector (Eq. 7)
  student    4: train students with online labels (hard, teacher, projector) and evaluate
  distill    all of the above in order, then results.json and report.md

Start with `hello-fast distill` (the embedded digits default, a few minutes on a CPU).
"""

EPILOG = """\
examples:
  hello-fast distill                                  # embedded default: scikit-learn digits
  hello-fast distill --config imagenet1k-ipc10 --data /data/imagenet --out runs/in1k
  hello-fast student --out runs/digits --set student.loss=kl --set student.temperature=4
  hello-fast inspect runs/digits/projector/artifact.safetensors
  hello-fast storage --config imagenet1k-ipc10 --json
"""

STAGE_HELP = {
    "distill": "run every stage in order (finished stages are skipped), then write results.json and report.md",
    "teachers": "stage 0: train a ResNet-18 on the original set and keep its early-epoch checkpoints (weak teachers)",
    "select": "stage 1: choose the distilled images: RDED patch selection (observer: teacher or projector) or random",
    "projector": "stage 2: train LoRA on CLIP (tower convs + text-embedding head) against the weak teachers; write the label artifact",
    "refine": "stage 3 (optional): update the distilled images by Eq. 7 within the projector",
    "student": "stage 4: train a student per label source on the distilled images, with labels made online; evaluate",
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run options")
    g.add_argument("--config", metavar="PRESET|FILE",
                   help="a preset (digits, imagenet1k-ipc10, imagenet100-ipc10, places365-ipc10) or a YAML file; "
                        "default: the run directory's config.yaml if there is one, else digits")
    g.add_argument("--data", metavar="DIR", help="an ImageNet-style folder (train/<class>/*, val/<class>/*): overrides the config's data")
    g.add_argument("--out", metavar="RUN_DIR", help="the run directory (default: runs/<config name>)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to compute (default: the config's, auto)")
    g.add_argument("--loader", choices=("auto", "dali", "torch"),
                   help="how passes over an image folder decode and augment: dali (NVIDIA DALI, on the GPU when "
                        "computing there, else its CPU pipeline), torch (torchvision in DataLoader workers), auto "
                        "(default: dali when installed and the data are files)")
    g.add_argument("--seed", type=int, help="the random seed (same seed, same result)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set student.epochs=50 (repeatable)")
    g.add_argument("--force", action="store_true", help="redo the stage(s) even if finished with this config")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from hello_fast import __version__

    parser = argparse.ArgumentParser(prog="hello-fast", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hello_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ("distill", "teachers", "select", "projector", "refine", "student"):
        p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name])
        _common(p)
        if name in ("distill", "student"):
            p.add_argument("--augment", choices=("fused", "dali"),
                           help="how the student loop augments the distilled set: fused (resident uint8 set and "
                                "the augment_mix kernel, default) or dali (a DALI pipeline, CutMix/Mixup after)")
            g = p.add_argument_group("labels from another artifact")
            g.add_argument("--artifact", metavar="FILE", help="label the projector students with this label artifact "
                           "instead of the run's own (its class count must match the data)")
            g.add_argument("--artifact-weights", metavar="FILE", help="a local CLIP checkpoint for that artifact's "
                           "backbone, when its recorded weights are not in the cache here (the sha256 must match)")
    p = sub.add_parser("inspect", help="print a label artifact's metadata and size, and validate it",
                       description="Print a label artifact's metadata and size, and validate it (format, checksum, "
                                   "shapes). Exits non-zero if the file is not a valid artifact.")
    p.add_argument("artifact", help="path to a label artifact (.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--classes", action="store_true", help="list every class name")
    p = sub.add_parser("storage", help="label storage of each scheme (HeLlO artifact, SRe2L labels, RDED teacher) for a preset",
                       description="The exact label storage, in bytes, of each scheme for a config: the projector's label "
                                   "artifact, SRe2L-style stored soft labels for every augmented image of every epoch "
                                   "(with the augmentation parameters), and the RDED teacher network.")
    p.add_argument("--config", metavar="PRESET|FILE", default="digits", help="a preset or YAML file (default: digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--json", action="store_true", help="print JSON with keys artifact_bytes, sre2l_soft_label_bytes, teacher_bytes")
    _bench_parser(sub)
    return parser


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: student-loop", description="Benchmarks of the training loop.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    q = bsub.add_parser(
        "student-loop", help="images/s of the student loop with each label scheme",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Images per second of the student loop with each way of getting labels: fast (this package), "
                    "fast_teacher, naive (plain PyTorch HeLlO), rded_teacher, stored (SRe2L-style), floor (the student "
                    "step alone), plus the projector's forward time and the labeling overhead. Writes "
                    "student_loop_<device>.json with device, torch and date.")
    q.add_argument("--student", default="resnet18", help="student architecture (default resnet18)")
    q.add_argument("--projector", default="RN50", help="open_clip model of the projector (random weights: speed only)")
    q.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    q.add_argument("--res", type=int, default=224, help="training resolution (default 224)")
    q.add_argument("--steps", type=int, default=20, help="timed steps per loop, median (default 20)")
    q.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    q.add_argument("--conv-rank", type=int, default=8, help="projector LoRA rank on the convs (default 8)")
    q.add_argument("--head-rank", type=int, default=128, help="projector LoRA rank on the head (default 128)")
    q.add_argument("--width", type=int, default=None, help="ResNet-18 base width (small-image variant)")
    q.add_argument("--capture", action="store_true", help="replay the relabeler's forward as a CUDA graph")
    q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    q.add_argument("--quick", action="store_true",
                   help="a CPU-sized run: ResNet-18 width 16 at 32 px, the tiny CLIP, batch 32, 10 classes, 4 steps")
    q.add_argument("--out", default=None, help="results folder (default benchmarks/results if it exists, else .)")


def _load_cfg(args):
    from hello_fast.config import load_config

    spec = args.config
    if spec is None and args.out and os.path.isfile(os.path.join(args.out, "config.yaml")):
        spec = os.path.join(args.out, "config.yaml")
    cfg = load_config(spec or "digits", args.overrides, seed=args.seed, device=args.device)
    if args.data:
        cfg.data.source = "folder"
        cfg.data.root = args.data
    if getattr(args, "loader", None):
        cfg.data.loader = args.loader
    if getattr(args, "augment", None):
        cfg.student.augment = args.augment
    if getattr(args, "artifact", None):
        cfg.student.artifact = os.path.abspath(args.artifact)
    if getattr(args, "artifact_weights", None):
        cfg.student.artifact_weights = os.path.abspath(args.artifact_weights)
    return cfg


def _cmd_stage(args) -> int:
    from hello_fast import _progress
    from hello_fast.pipeline import Pipeline

    if args.quiet:
        _progress.set_enabled(False)
    cfg = _load_cfg(args)
    out = args.out or os.path.join("runs", cfg.name)
    pipe = Pipeline(cfg, out, force=args.force)
    if args.command == "distill":
        results = pipe.distill()
    else:
        results = pipe.run_stage(args.command)
    if args.command in ("distill", "student") and pipe.world.main:
        from hello_fast.stages.report import results_table

        print(results_table(results))
        print(f"\nrun directory: {pipe.run.root} (results.json, report.md, accuracy_vs_storage.png)")
    if pipe.world.distributed:
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def _cmd_inspect(args) -> int:
    from hello_fast.projector.artifact import describe
    from hello_fast.storage import format_bytes

    info = describe(args.artifact)
    if args.json:
        if not args.classes:
            info = dict(info, class_names=info["class_names"][:10] + (["..."] if info["num_classes"] > 10 else []))
        print(json.dumps(info, indent=2))
        return 0
    b = info["backbone"]
    names = info["class_names"]
    shown = names if args.classes else names[:8]
    print(f"label artifact  {info['path']}  (valid)")
    print(f"size            {info['bytes']:,} bytes ({format_bytes(info['bytes'])})")
    print(f"format          version {info['format_version']}, {info['created_by']}")
    print(f"backbone        {b['model']}, weights {b.get('pretrained') or 'random init (seed ' + str(b.get('init_seed')) + ')'}, sha256 {b['weights_sha256'][:16]}…")
    print(f"classes         {info['num_classes']}: {', '.join(shown)}{' …' if len(shown) < len(names) else ''}")
    print(f"prompts         {info['templates']} templates")
    print(f"LoRA            {info['lora_layers']} layers; ranks conv {info['conv_rank']}, linear {info['linear_rank']}, head {info['head_rank']}; alpha {info['alpha']}")
    p = info["parameters"]
    print(f"parameters      {p['total']:,} (tower {p['tower']:,}, head {p['head']:,})")
    print(f"input           {info['image_size']} px, mean {info['mean']}, std {info['std']}")
    return 0


def _cmd_storage(args) -> int:
    from hello_fast.config import load_config
    from hello_fast.storage import format_bytes, storage_report

    cfg = load_config(args.config, args.overrides)
    r = storage_report(cfg)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"label storage for {r['config']}: {r['num_classes']} classes, {r['distilled_images']} distilled images, "
          f"{r['student_epochs']} student epochs")
    rows = [("HeLlO label artifact (LoRA)", r["artifact_bytes"]),
            ("SRe2L stored soft labels", r["sre2l_soft_label_bytes"]),
            ("RDED teacher (ResNet-18)", r["teacher_bytes"])]
    for name, n in rows:
        print(f"  {name:<30} {n:>16,} bytes  {format_bytes(n):>14}")
    ratio = r["sre2l_soft_label_bytes"] / r["artifact_bytes"]
    print(f"  the artifact is {ratio:,.0f}x smaller than the stored labels ({100 / ratio:.4f}%)")
    if not r["artifact_metadata_exact"]:
        print("  (artifact metadata counted with placeholder class names: the data's names may differ by a few bytes)")
    return 0


def main(argv=None) -> int:
    from hello_fast.errors import HelloError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.filterwarnings("default", category=RuntimeWarning)
    try:
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "storage":
            return _cmd_storage(args)
        if args.command == "bench":
            if args.bench is None:
                parser.parse_args(["bench", "--help"])
            from hello_fast.bench import main_bench

            return main_bench(args)
        return _cmd_stage(args)
    except HelloError as e:
        print(f"hello-fast: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hello-fast: interrupted; finished stages are kept, run the same command again to go on", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    """The message of a HelloError, also when a DataLoader worker wrapped it in its traceback."""
    text = str(e).strip()
    marker = "HelloError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
