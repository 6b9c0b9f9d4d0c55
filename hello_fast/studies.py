"""What each study is: its variants (config overrides over the study's config) and the paper's figures beside them.

The running of a study (its run directories, cells, tables and plots) is hello_fast/study.py; this
module reads only the config, so the command line lists the studies without loading torch.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

from hello_fast.config import Config, StudentArch, option
from hello_fast.errors import HelloError

STUDIES = {
    "sources": "every label source on the same distilled images (Table 1; the accuracy-storage frontier)",
    "archs": "every student architecture x label sources (Table 2)",
    "ablation": "Table 3: zero-shot head, CE linear probe, + weak teachers, + conv LoRA, + text init, + image update; "
                "hard labels",
    "teacher-stages": "windows of weak-teacher epochs (Table 4 right)",
    "ranks": "LoRA ranks: the config's conv and head ranks x 0.5, 1, 1.5, 2 (Table 4 left)",
    "ipc": "IPC 1, 10, 50 for every label source (Table 1's rows; image/label scaling)",
    "continual": "class-incremental learning, GDumb's protocol, --steps K (Fig. 2)",
}
IPCS = (1, 10, 50)
RANK_SCALES = (0.5, 1.0, 1.5, 2.0)
TEACHER_WINDOWS = 6  # Table 4 right: 1-41, 11-51, ..., 51-91


def label_sources() -> tuple[str, ...]:
    """Every label source the config accepts (student.label_sources' declared choices)."""
    return typing.get_args(typing.get_args(option("student.label_sources").hint)[0])


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # config overrides (--set syntax): the stages they change get their own run
    sources: tuple[str, ...]  # its students' label sources


# -- the paper's figures (HeLlO, ResNet-18 students unless said; mean ± s.d.) ----------------------------------
_T1 = {  # Table 1: SRe2L's stored labels (on SRe2L's own images), RDED's teacher, HeLlO's projector; extra storage
    "ImageNet-100": {1: ("3.0 ± 0.3", "8.1 ± 0.3", "12.5 ± 0.2"), 10: ("9.5 ± 0.4", "36.0 ± 0.3", "48.9 ± 0.1"),
                     50: ("27.0 ± 0.4", "61.6 ± 0.1", "69.4 ± 0.1"),
                     "bytes": (("6.9MB", "64.8MB", "324.2MB"), "42.8MB", "2.6MB")},
    "Places365": {1: ("1.4 ± 0.2", "5.0 ± 0.1", "7.1 ± 0.1"), 10: ("9.5 ± 0.1", "29.2 ± 0.1", "33.4 ± 0.3"),
                  50: ("31.3 ± 0.1", "44.0 ± 0.1", "41.2 ± 0.1"),
                  "bytes": (("79.3MB", "790.4MB", "3950.6MB"), "43.4MB", "3.0MB")},
    "ImageNet-1K": {1: ("0.1 ± 0.1", "6.6 ± 0.2", "12.9 ± 0.3"), 10: ("21.3 ± 0.6", "42.0 ± 0.1", "43.7 ± 0.1"),
                    50: ("46.8 ± 0.2", "56.5 ± 0.1", "52.2 ± 0.1"),
                    "bytes": (("579.8MB", "5798.3MB", "28990.8MB"), "44.7MB", "3.3MB")},
}
_T2_ARCHS = ("shufflenet_v2_x1_0", "mobilenet_v2", "efficientnet_b0", "swin_v2_t", "vgg11")
_T2 = {  # Table 2, IPC 10: (RDED, HeLlO) per architecture
    "ImageNet-100": (("27.7 ± 0.6", "35.7 ± 0.3", "37.9 ± 0.1", "18.0 ± 0.1", "21.2 ± 0.4"),
                     ("32.7 ± 0.8", "40.6 ± 0.8", "47.0 ± 0.1", "24.2 ± 0.3", "27.6 ± 0.1")),
    "Places365": (("18.1 ± 0.7", "21.0 ± 0.5", "26.3 ± 0.1", "14.0 ± 0.2", "12.8 ± 0.1"),
                  ("22.1 ± 0.6", "27.3 ± 0.2", "31.9 ± 0.3", "18.1 ± 0.3", "17.7 ± 0.3")),
    "ImageNet-1K": (("23.3 ± 0.1", "34.4 ± 0.2", "42.8 ± 0.5", "17.8 ± 0.1", "22.7 ± 0.1"),
                    ("26.5 ± 0.2", "38.1 ± 0.5", "44.4 ± 0.2", "29.5 ± 0.1", "24.2 ± 0.3")),
}
_T3 = {"probe": "28.2 ± 0.2 (1.0M params)", "probe+teachers": "30.1 ± 0.1 (1.0M)", "lora": "43.5 ± 0.1 (1.5M)",
       "text-init": "43.6 ± 0.1 (0.8M)", "image-update": "43.7 ± 0.1 (0.8M)"}  # ImageNet-1K, IPC 10
_T4_RANKS = {"ImageNet-100": ("45.4 ± 0.2 (0.3M)", "48.9 ± 0.1 (0.6M)", "49.7 ± 0.1 (0.9M)", "49.8 ± 0.2 (1.2M)"),
             "ImageNet-1K": ("38.8 ± 0.1 (0.4M)", "43.7 ± 0.1 (0.8M)", "44.2 ± 0.1 (1.2M)", "44.4 ± 0.1 (1.6M)")}
_T4_WINDOWS = {"ImageNet-100": ("48.9 ± 0.1", "47.5 ± 0.1", "45.5 ± 0.1", "44.2 ± 0.1", "43.9 ± 0.7", "41.5 ± 0.4"),
               "ImageNet-1K": ("42.3 ± 0.1", "43.7 ± 0.1", "42.1 ± 0.1", "41.2 ± 0.1", "40.6 ± 0.1", "39.7 ± 0.3")}


def _dataset(cfg: Config) -> str | None:
    """The paper's dataset a config's name says it is (the presets' names), else None."""
    for prefix, name in (("imagenet100", "ImageNet-100"), ("places365", "Places365"), ("imagenet1k", "ImageNet-1K")):
        if cfg.name.startswith(prefix):
            return name
    return None


def paper_setting(study: str, cfg: Config) -> str:
    """The paper setting whose figures the study's table shows: the config's dataset, else ImageNet-1K's (for scale)."""
    ds = _dataset(cfg)
    if study == "ablation":
        return "ImageNet-1K, IPC 10" + ("" if ds == "ImageNet-1K" else "; not this data")
    if study in ("ranks", "teacher-stages"):
        return f"{ds if ds in _T4_RANKS else 'ImageNet-1K'}, IPC 10" + ("" if ds in _T4_RANKS else "; not this data")
    if study == "continual":
        return "Fig. 2 (ImageNet-100, IPC 10) gives curves, no numbers"
    ipc = "1/10/50" if study == "ipc" else str(cfg.select.ipc)
    return f"{ds or 'ImageNet-1K'}, IPC {ipc}" + ("" if ds else "; not this data")


def paper_figure(study: str, cfg: Config, variant: Variant, index: int, source: str, arch: str) -> str:
    """The paper's figure for one table row, or "" where the paper has none."""
    ds = _dataset(cfg) or "ImageNet-1K"
    col = {"stored": 0, "rded": 1, "projector": 2}.get(source)
    ipc = int(variant.name[3:]) if study == "ipc" else cfg.select.ipc
    if study in ("sources", "ipc", "archs") and col is not None:
        if study == "archs" and arch != "resnet18":
            if arch not in _T2_ARCHS or source == "stored" or ipc != 10:
                return ""
            return _T2[ds][col - 1][_T2_ARCHS.index(arch)]
        if ipc not in _T1[ds]:
            return ""
        size = _T1[ds]["bytes"][col]
        size = size[IPCS.index(ipc)] if isinstance(size, tuple) else size
        return f"{_T1[ds][ipc][col]} ({size})"
    if study in ("sources", "ipc") and source == "hard" and ds == "ImageNet-1K" and ipc == 10:
        return "15.2 (RDED's hard labels, quoted in Sec. 1)"
    if study == "ablation":
        return _T3.get(variant.name, "")
    table = {"ranks": _T4_RANKS, "teacher-stages": _T4_WINDOWS}.get(study)
    if table is not None:
        figures = table.get(ds if ds in table else "ImageNet-1K")
        return figures[index] if index < len(figures) else ""
    return ""


# -- the studies' variants -------------------------------------------------------------------------------------
def _teacher_windows(cfg: Config) -> list[list[int]]:
    """The config's weak-teacher window slid later in steps of two strides (Table 4 right: 1-41, 11-51, ...),
    starting as early as epoch 1 allows; none goes past teachers.epochs, the length of the teachers' LR schedule
    (the paper's 51-91 needs teachers.epochs >= 91)."""
    keep = sorted(set(cfg.teachers.keep_epochs))
    stride = keep[1] - keep[0] if len(keep) > 1 else 1
    shift = 2 * stride
    while keep[0] - shift >= 1:
        keep = [e - shift for e in keep]
    windows = [[e + k * shift for e in keep] for k in range(TEACHER_WINDOWS)]
    return [w for w in windows if w[-1] <= cfg.teachers.epochs]


def plan(study: str, cfg: Config, sources: list[str] | None = None) -> list[Variant]:
    """The study's variants, in table order. `sources`: the label sources of the studies that compare them."""
    if study not in STUDIES:
        raise HelloError(f"unknown study {study!r}; studies: {', '.join(STUDIES)}")
    compares = study in ("sources", "archs", "ipc", "continual")
    if sources is not None and not compares:
        raise HelloError(f"study {study} fixes its label sources; --sources is for sources, archs, ipc and continual")
    valid = label_sources()
    chosen = tuple(sources) if sources else valid
    bad = [s for s in chosen if s not in valid]
    if bad:
        raise HelloError(f"unknown label source {bad[0]!r}; sources: {', '.join(valid)}")
    if study in ("sources", "continual"):
        return [Variant("base", (), chosen)]
    if study == "archs":
        return [Variant(a, (f"student.arch={a}",), chosen) for a in typing.get_args(StudentArch)]
    if study == "ipc":
        return [Variant(f"ipc{n}", (f"select.ipc={n}",), chosen) for n in IPCS]
    if study == "ablation":
        no_refine = ("refine.enabled=false",)
        probe = ("projector.conv_rank=0", "projector.head_init=random")
        return [Variant("zero-shot", ("projector.epochs=0",) + no_refine, ("projector",)),
                Variant("probe", probe + ("projector.mse_weight=0",) + no_refine, ("projector",)),
                Variant("probe+teachers", probe + no_refine, ("projector",)),
                Variant("lora", ("projector.head_init=random",) + no_refine, ("projector",)),
                Variant("text-init", no_refine, ("projector",)),
                Variant("image-update", ("refine.enabled=true",), ("projector",)),
                Variant("hard-labels", ("refine.enabled=true",), ("hard",))]
    if study == "ranks":
        pc = cfg.projector
        out = []
        for s in RANK_SCALES:
            conv, head = round(pc.conv_rank * s), max(1, round(pc.head_rank * s))
            out.append(Variant(f"conv{conv}-head{head}", (f"projector.conv_rank={conv}", f"projector.head_rank={head}"),
                               ("projector",)))
        return out
    return [Variant(f"{w[0]}-{w[-1]}", (f"teachers.keep_epochs=[{','.join(map(str, w))}]",), ("projector",))
            for w in _teacher_windows(cfg)]
