"""The run's results: results.json, a printed table, and report.md with a plot of accuracy against label storage."""
from __future__ import annotations

import os

from hello_fast._io import atomic_path, write_json
from hello_fast.storage import format_bytes

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "accuracy_vs_storage.png"


def results_table(results: dict) -> str:
    rows = [("label source", "top-1 last", "top-1 best", "label storage (bytes)")]
    for name, r in results["students"].items():
        rows.append((name, f"{r['top1_last']:.1f}%", f"{r['top1_best']:.1f}%", f"{r['label_bytes']:,} ({format_bytes(r['label_bytes'])})"))
    st = results.get("storage")
    if st:
        rows.append(("SRe2L stored labels", "-", "-", f"{st['sre2l_soft_label_bytes']:,} ({format_bytes(st['sre2l_soft_label_bytes'])})"))
        rows.append(("RDED teacher", "-", "-", f"{st['teacher_bytes']:,} ({format_bytes(st['teacher_bytes'])})"))
        if "backbone_bytes" in st:  # shared by every artifact: downloaded once (0 to ship for a seeded random init)
            once = "public, once" if st.get("backbone_downloaded") else "seeded, not shipped"
            what = "CLIP backbone" if st.get("backbone_kind", "clip") == "clip" else f"backbone {st['backbone'].split(' (')[0]}"
            rows.append((f"{what} ({once})", "-", "-", f"{st['backbone_bytes']:,} ({format_bytes(st['backbone_bytes'])})"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_title(cfg) -> str:
    """What the run distilled: the config's name, and the data folder's name when the data is a folder of the user's."""
    if cfg.data.source == "folder" and cfg.data.root:
        return f"{os.path.basename(os.path.normpath(cfg.data.root))} ({cfg.name} config)"
    return cfg.name


def _plot(results: dict, path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, r in results["students"].items():
        x = max(r["label_bytes"], 1)
        ax.scatter([x], [r["top1_best"]], s=50, label=f"{name} (best)")
        ax.scatter([x], [r["top1_last"]], s=25, marker="x", color="gray")
        ax.annotate(name, (x, r["top1_best"]), textcoords="offset points", xytext=(6, 4))
    st = results.get("storage")
    if st:
        ax.axvline(st["sre2l_soft_label_bytes"], color="red", ls="--", lw=1, label="SRe2L stored labels")
        ax.axvline(st["teacher_bytes"], color="orange", ls=":", lw=1, label="RDED teacher")
    ax.set_xscale("log")
    ax.set_xlabel("label storage (bytes, log scale)")
    ax.set_ylabel("student top-1 (%)")
    ax.set_title(f"{title or results['config']}: accuracy vs label storage (x: last epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(run, results: dict) -> None:
    write_json(run.path(RESULTS), results)
    title = results.get("title", results["config"])
    _plot(results, run.path(PLOT), title)
    lines = [
        f"# hello_fast run: {title}",
        "",
        "Students trained on the distilled images with each label source; label storage is what must be",
        "shipped with the images to reproduce the labels.",
        "",
        "```",
        results_table(results),
        "```",
        "",
        f"![accuracy vs label storage]({PLOT})",
        "",
    ]
    extra = results.get("stages", {})
    if "teachers" in extra:
        tops = ", ".join(f"epoch {e}: {a:.1f}%" for e, a in extra["teachers"].get("top1", {}).items())
        lines += [f"- weak teachers (val top-1): {tops}"]
    if "projector" in extra:
        p = extra["projector"]
        last = list(p.get("top1", {}).values())
        lines += [f"- projector: zero-shot {p.get('zero_shot_top1', 0):.1f}% -> trained {last[-1] if last else float('nan'):.1f}% val top-1; "
                  f"artifact {p.get('artifact_bytes', 0):,} bytes"]
    if "select" in extra:
        lines += [f"- distilled set: {extra['select'].get('images')} images by {extra['select'].get('method')}"]
    if "refine" in extra and extra["refine"]:
        r = extra["refine"]
        eq7 = f"loss {r['loss_first']:.5f} -> {r['loss_last']:.5f}" if r.get("loss_first") is not None else "no steps"
        bound = (f"; kept {r['refined_kept']}/{r['images']} refined images, PSNR vs selected {r['psnr']:.1f} dB "
                 f"(worst image {r['psnr_min']:.1f})" if "psnr" in r else "")
        lines += [f"- refine (Eq. 7): {eq7}{bound}"]
    images = results.get("images")
    if images:  # the image check of a folder data set (hello_fast.data.validate)
        how = (f"{images['checked']} checked at {images['files_per_second']:.0f} files/s" if images["checked"]
               else "verdicts from the cache")
        lines += [f"- image check ({images['mode']}): {images['files']} files, {images['left_out']} left out ({how})"]
        lines += [f"  - `{path}`: {reason}" for path, reason in list(images["bad_files"].items())[:50]]
        later = images.get("left_out_while_reading", [])
        if later:
            lines += [f"- left out by a loader while reading: {len(later)} (" + ", ".join(f"`{p}`" for p in later[:20]) + ")"]
    lines += ["", f"Distilled images: `{os.path.relpath(results.get('distilled_dir', ''), run.root)}/images/`", ""]
    with atomic_path(run.path(REPORT)) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(lines))
