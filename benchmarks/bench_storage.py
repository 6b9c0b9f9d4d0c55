"""Label storage of each scheme for the paper's presets (exact bytes), against the paper's Table 1.

    python benchmarks/bench_storage.py [--out DIR]

Writes results/storage.json and results/storage.csv. Storage does not depend on the device.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _results  # noqa: E402

# the paper's Table 1 "Actual Extra Storage" at IPC 10 (MB = MiB), HeLlO / SRe2L / RDED
PAPER = {
    "imagenet1k-ipc10": {"artifact": 3.3, "sre2l": 5798.3, "teacher": 44.7},
    "imagenet100-ipc10": {"artifact": 2.6, "sre2l": 64.8, "teacher": 42.8},
    "places365-ipc10": {"artifact": 3.0, "sre2l": 790.4, "teacher": 43.4},
}


def main(argv=None) -> int:
    from hello_fast.config import load_config
    from hello_fast.storage import MIB, storage_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=_results.RESULTS_DIR, help="results folder")
    args = ap.parse_args(argv)
    rows = []
    for preset in ("imagenet1k-ipc10", "imagenet100-ipc10", "places365-ipc10", "digits"):
        r = storage_report(load_config(preset))
        row = {
            "preset": preset,
            "classes": r["num_classes"],
            "artifact_bytes": r["artifact_bytes"],
            "artifact_lora_parameters": r["artifact_lora_parameters"],
            "sre2l_soft_label_bytes": r["sre2l_soft_label_bytes"],
            "teacher_bytes": r["teacher_bytes"],
            "sre2l_over_artifact": round(r["sre2l_soft_label_bytes"] / r["artifact_bytes"], 1),
        }
        if preset in PAPER:
            p = PAPER[preset]
            row.update({
                "paper_artifact_mib": p["artifact"], "artifact_mib": round(r["artifact_bytes"] / MIB, 2),
                "paper_sre2l_mib": p["sre2l"], "sre2l_mib": round(r["sre2l_soft_label_bytes"] / MIB, 1),
                "paper_teacher_mib": p["teacher"], "teacher_mib": round(r["teacher_bytes"] / MIB, 1),
            })
        rows.append(row)
        print(f"{preset:<18} artifact {row['artifact_bytes']:>10,} B   SRe2L {row['sre2l_soft_label_bytes']:>14,} B   "
              f"teacher {row['teacher_bytes']:>11,} B   SRe2L/artifact {row['sre2l_over_artifact']:,}x")
    paths = _results.write("storage", rows, out_dir=args.out)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
