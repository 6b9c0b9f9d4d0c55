"""The `hello-fast` command (also `python -m hello_fast`): the pipeline's stages, artifact inspection, storage figures."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings

from hello_fast import config
from hello_fast.stages import STAGES

DISTILL_HELP = "run every stage in order (finished stages are skipped), then write results.json and report.md"
STUDY_HELP = "the paper's tables and figures: variants x label sources x seeds, resumable cells"
STATUS_HELP = ("say which stages (and which students) are current, stale (with the option or input that changed) or "
               "missing with these options, without running or writing anything")


def _description() -> str:
    stages = "\n".join(textwrap.fill(what, 100, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13)
                       for name, what in {**STAGES, "distill": DISTILL_HELP, "status": STATUS_HELP,
                                                                       "study": STUDY_HELP}.items())
    return f"""\
HeLlO dataset distillation with online soft labels: a LoRA-adapted CLIP projector replaces
gigabytes of stored soft labels with a ~3 MB label artifact.

Stages (each reads and writes one run directory; finished stages are skipped on a rerun):
{stages}

Start with `hello-fast distill` (the embedded digits default, a few minutes on a CPU).
"""


EPILOG = """\
examples:
  hello-fast distill                                  # embedded default: scikit-learn digits
  hello-fast distill --config imagenet1k-ipc10 --data /data/imagenet --out runs/in1k
  hello-fast status --out runs/in1k --set student.epochs=500   # what that change would redo, and why
  hello-fast student --out runs/digits --set student.loss=kl --set student.temperature=4
  hello-fast inspect runs/digits/projector/artifact.safetensors
  hello-fast storage --config imagenet1k-ipc10 --json
  hello-fast config --config imagenet1k-ipc10          # every key, its value and what it does
  hello-fast study sources --config digits --seeds 0 1  # every label source, mean ± s.d. over seeds
"""


# CLI flags that are aliases of `--set KEY=VALUE`: their choices and help come from the config's declaration.
# The run-wide ones go to every run command; a stage's own (a key of its config section) to it, distill and status.
_ALIASES = {"--device": "device", "--seed": "seed", "--loader": "data.loader", "--log-dir": "log_dir",
            "--log-steps": "log_steps"}
_STAGE_ALIASES = {"--augment": "student.augment", "--artifact": "student.artifact",
                  "--artifact-weights": "student.artifact_weights"}


def _aliases_of(command: str) -> dict:
    own = {flag: key for flag, key in _STAGE_ALIASES.items() if command in ("distill", "status", key.partition(".")[0])}
    return dict(_ALIASES, **own)


def _alias(g, flag: str, key: str) -> None:
    """One `--flag VALUE` standing for `--set KEY=VALUE`, typed and documented by the option's declaration."""
    o = config.option(key)
    dest = "alias:" + key
    help_text = f"{o.help} (= --set {key}=...)"
    if o.type_name() == "bool":
        g.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=f"{o.help} (= --set {key}=true)")
    elif o.choices:
        g.add_argument(flag, dest=dest, choices=o.choices, help=help_text)
    elif "int" in o.type_name().split(" | "):
        g.add_argument(flag, dest=dest, type=int, metavar="N", help=help_text)
    else:
        g.add_argument(flag, dest=dest, metavar="PATH" if o.meta["path"] else "VALUE", help=help_text)


def _common(p: argparse.ArgumentParser, aliases: dict, writes: bool = True) -> None:
    g = p.add_argument_group("run options")
    g.add_argument("--config", metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(config.preset_names())}) or a YAML file; "
                        "default: the run directory's config.yaml if there is one, else digits")
    g.add_argument("--data", metavar="DIR", help="your own ImageNet-style folder (train/<class>/*, val/<class>/*, or "
                   "<class>/*): it replaces the config's data and defines the classes (count, order, names)")
    g.add_argument("--out", metavar="RUN_DIR", help="the run directory (default: runs/<config name>)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set student.epochs=50 (repeatable; "
                        "`hello-fast config` lists every key)")
    if writes:
        g.add_argument("--force", action="store_true", help="redo the stage(s) even if finished with this config")
        g.add_argument("--quiet", action="store_true", help="no progress bars")
    for flag, key in aliases.items():
        _alias(g, flag, key)


def build_parser() -> argparse.ArgumentParser:
    from hello_fast import __version__

    parser = argparse.ArgumentParser(prog="hello-fast", description=_description(), epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hello_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, what in {"distill": DISTILL_HELP, **STAGES}.items():
        p = sub.add_parser(name, help=what, description=what)
        _common(p, _aliases_of(name))
    p = sub.add_parser("status", help=STATUS_HELP, description=(
        "For each stage and each student (student/<label source>) of the run directory: current, stale with the "
        "option, data or input that changed, or missing; off for a stage the config turns off. It takes the same "
        "run options as the stages, so it says what a changed option would redo before redoing it. It reads the "
        "run directory and the data folder's listing only: it writes nothing, takes no lock and decodes no image."))
    _common(p, _aliases_of("status"), writes=False)
    p.add_argument("--json", action="store_true", help='print {"<stage or stage/unit>": {"state": "current"|"stale"|'
                   '"missing", "reason": str}} (stages the config turns off are left out)')
    p = sub.add_parser("inspect", help="print a label artifact's metadata and size, and validate it",
                       description="Print a label artifact's metadata and size, and validate it (format, checksum, "
                                   "shapes). Exits non-zero if the file is not a valid artifact.")
    p.add_argument("artifact", help="path to a label artifact (.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--classes", action="store_true", help="list every class name")
    p = sub.add_parser("storage", help="label storage of each scheme (HeLlO artifact, SRe2L labels, RDED teacher) for a preset",
                       description="The exact label storage, in bytes, of each scheme for a config: the projector's label "
                                   "artifact, SRe2L-style stored soft labels for every augmented image of every epoch "
                                   "(with the augmentation parameters) and their compressed forms (int8, int4, top-k, "
                                   "LPLD's pruned pool), and the RDED teacher network.")
    p.add_argument("--config", metavar="PRESET|FILE", default="digits", help="a preset or YAML file (default: digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--json", action="store_true", help="print JSON with keys artifact_bytes (configured dtype), artifact_bytes_fp16, "
                   "artifact_bytes_int8, backbone_bytes, sre2l_soft_label_bytes, stored_int8_label_bytes, "
                   "stored_int4_label_bytes, stored_topk_label_bytes, stored_pool_label_bytes, teacher_bytes")
    p = sub.add_parser("config", help="every config key of a preset or file: its value, type and what it does",
                       description="Print a config (a preset or YAML file, with --set overrides) as YAML with every key's "
                                   "type and help; keys marked result-neutral never make a finished stage stale.")
    p.add_argument("--config", metavar="PRESET|FILE", default="digits", help="a preset or YAML file (default: digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    _study_parser(sub)
    _bench_parser(sub)
    return parser


def _study_parser(sub) -> None:
    from hello_fast.studies import STUDIES

    p = sub.add_parser("study", help=STUDY_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run (or resume) a study: each variant's stages in DIR/runs/<variant> (stages another "
                                   "variant finished with the same fingerprint are reused), one student per cell "
                                   "(variant x source x arch x seed x step) in DIR/cells/<id>.json, then DIR/study.json, "
                                   "DIR/study.md (mean ± s.d. over seeds beside the paper's figures) and DIR/study.png.\n\n"
                                   "studies:\n" + "\n".join(f"  {k:<15} {v}" for k, v in STUDIES.items()))
    p.add_argument("study", choices=tuple(STUDIES), metavar="NAME", help=f"one of: {', '.join(STUDIES)}")
    g = p.add_argument_group("run options")
    g.add_argument("--config", metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(config.preset_names())}) or a YAML file; default: the study directory's "
                        "config.yaml if there is one, else digits")
    g.add_argument("--data", metavar="DIR", help="your own ImageNet-style folder: it replaces the config's data")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value for every variant (repeatable)")
    g.add_argument("--out", metavar="DIR", help="the study directory (default: runs/study-NAME-<config name>)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="N", help="student seeds (default 0 1 2)")
    g.add_argument("--steps", type=int, default=5, metavar="K", help="continual: class-incremental steps (default 5)")
    g.add_argument("--sources", nargs="+", metavar="SOURCE",
                   help="sources, archs, ipc, continual: the label sources to compare (default: every source)")
    g.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                   help="a finished run directory (e.g. a distill's) whose current stages the variants may reuse")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    for flag, key in _ALIASES.items():
        _alias(g, flag, key)


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
    spec = args.config
    if spec is None and args.out and os.path.isfile(os.path.join(args.out, "config.yaml")):
        spec = os.path.join(args.out, "config.yaml")
    overrides = list(args.overrides)
    for dest, value in vars(args).items():  # the flags, as the overrides they stand for (after --set)
        if dest.startswith("alias:") and value is not None:
            key = dest[len("alias:"):]
            overrides.append((key, os.path.abspath(value) if config.option(key).meta["path"] else value))
    return config.load_config(spec or "digits", overrides, data_root=os.path.abspath(args.data) if args.data else None)


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
    if args.command in ("distill", pipe.order()[-1]) and pipe.world.main:  # the last stage's results: the report
        from hello_fast.stages.report import results_table

        print(results_table(results))
        print(f"\nrun directory: {pipe.run.root} (results.json, report.md, accuracy_vs_storage.png)")
    if pipe.world.distributed:
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def _cmd_status(args) -> int:
    from hello_fast.pipeline import STATES, Pipeline

    cfg = _load_cfg(args)
    out = args.out or os.path.join("runs", cfg.name)
    states = Pipeline(cfg, out, device="cpu").status()
    if args.json:  # the stages the config turns off are left out
        print(json.dumps({name: st for name, st in states.items() if st["state"] in STATES}, indent=2))
        return 0
    width = max(map(len, states))
    print(f"run directory {os.path.abspath(out)} with config {cfg.name}:")
    for name, st in states.items():
        print(f"  {name:<{width}}  {st['state']:<7}" + (f"  {st['reason']}" if st["reason"] else "").rstrip())
    return 0


def _cmd_study(args) -> int:
    from hello_fast import _progress
    from hello_fast.study import run_study, summarise

    if args.quiet:
        _progress.set_enabled(False)
    cfg = _load_cfg(args)
    out = args.out or os.path.join("runs", f"study-{args.study}-{cfg.name}")
    doc = run_study(args.study, cfg, out, seeds=args.seeds, steps=args.steps, sources=args.sources,
                    reuse=[os.path.abspath(r) for r in args.reuse])
    from hello_fast import distributed

    if distributed.world().main:
        for s in summarise(doc["rows"]):
            step = f" step {s['step']} ({s['classes']} classes)" if s["step"] is not None else ""
            print(f"{s['variant']:>16} {s['source']:>10} {s['arch']:>18}{step}: top-1 last {s['top1_last']}, "
                  f"best {s['top1_best']}; {s['label_bytes']:,} label bytes")
        print(f"\nstudy directory: {os.path.abspath(out)} (study.json, study.md, study.png)")
    if distributed.world().distributed:
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
    if b.get("kind") == "classifier":
        print(f"backbone        {b['model']} (image classifier), weights {b.get('pretrained') or 'published ImageNet weights'}, "
              f"sha256 {b['weights_sha256'][:16]}…")
    else:
        print(f"backbone        {b['model']}, weights {b.get('pretrained') or 'random init (seed ' + str(b.get('init_seed')) + ')'}, "
              f"{b.get('activation') or 'activation not recorded (format 1)'}, sha256 {b['weights_sha256'][:16]}…")
    print(f"head            {info['head_init']}" + (f" (stored: {info['stored_head']:,} values)" if info["stored_head"] else ""))
    print(f"classes         {info['num_classes']}: {', '.join(shown)}{' …' if len(shown) < len(names) else ''}")
    print(f"prompts         {info['templates']} templates")
    print(f"LoRA            {info['lora_layers']} layers; ranks conv {info['conv_rank']}, linear {info['linear_rank']}, head {info['head_rank']}; alpha {info['alpha']}; stored as {info['dtype']}")
    p = info["parameters"]
    print(f"parameters      {p['total']:,} (tower {p['tower']:,}, head {p['head']:,})")
    print(f"input           {info['image_size']} px, mean {info['mean']}, std {info['std']}")
    return 0


def _cmd_config(args) -> int:
    print(config.describe(config.load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_storage(args) -> int:
    from hello_fast.storage import format_bytes, storage_report

    cfg = config.load_config(args.config, args.overrides)
    r = storage_report(cfg)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"label storage for {r['config']}: {r['num_classes']} classes, {r['distilled_images']} distilled images, "
          f"{r['student_epochs']} student epochs")
    rows = [(f"HeLlO label artifact ({r['artifact_dtype']})", r["artifact_bytes"]),
            *[(f"  same in {d}", r[f"artifact_bytes_{d}"]) for d in ("fp32", "fp16", "int8") if d != r["artifact_dtype"]],
            ("SRe2L stored soft labels", r["sre2l_soft_label_bytes"]),
            ("  same, int8 per crop (stored_int8)", r["stored_int8_label_bytes"]),
            ("  same, int4 per crop (stored_int4)", r["stored_int4_label_bytes"]),
            (f"  same, top-{r['stored_topk']} per crop (stored_topk)", r["stored_topk_label_bytes"]),
            (f"  LPLD pool, {r['stored_pool_fraction']:g} of batches (stored_pool)", r["stored_pool_label_bytes"]),
            ("RDED teacher (ResNet-18)", r["teacher_bytes"]),
            (f"{'CLIP backbone' if r['backbone_kind'] == 'clip' else 'backbone'}, {r['backbone']}", r["backbone_bytes"])]
    width = max(36, *(len(name) for name, _ in rows))
    for name, n in rows:
        print(f"  {name:<{width}} {n:>16,} bytes  {format_bytes(n):>14}")
    ratio = r["sre2l_soft_label_bytes"] / r["artifact_bytes"]
    if ratio >= 1:
        print(f"  the artifact is {ratio:,.0f}x smaller than the stored labels ({100 / ratio:.4f}%)")
    else:
        print(f"  the artifact is {1 / ratio:,.1f}x larger than the stored labels: too few images and epochs for a "
              f"projector to pay off in bytes")
    what = (f"the CLIP backbone (both towers, {r['backbone_bytes_per_weight']} bytes a weight; image tower alone "
            f"{format_bytes(r['backbone_image_tower_bytes'])})" if r["backbone_kind"] == "clip" else
            f"the backbone (its feature layers, {r['backbone_bytes_per_weight']} bytes a weight)")
    print(f"  {what} is "
          + ("public: downloaded once and shared by every artifact" if r["backbone_downloaded"]
             else "a seeded random init here: rebuilt from the seed, nothing to download"))
    if r["head_init"] == "prototypes":
        print("  the artifact stores the prototype head (classes x features) beside the LoRA tensors")
    if not r["artifact_metadata_exact"]:
        print("  (artifact metadata counted with placeholder class names: the data's names may differ by a few bytes)")
    return 0


def main(argv=None) -> int:
    from hello_fast._io import os_error_line
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
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "study":
            return _cmd_study(args)
        if args.command == "bench":
            if args.bench is None:
                parser.parse_args(["bench", "--help"])
            from hello_fast.bench import main_bench

            return main_bench(args)
        return _cmd_stage(args)
    except HelloError as e:
        print(f"hello-fast: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a refusal no caller named (a distilled image, a plot): still one line, if the user can fix it
        line = os_error_line(e)
        if line is None:
            raise
        print(f"hello-fast: error: {line}", file=sys.stderr)
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
