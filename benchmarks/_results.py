"""Writing benchmark results: every file carries the device, library versions and date it was measured with."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict:
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = "cuda"
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    from hello_fast import __version__
    from hello_fast.ops import extension_status

    env["hello_fast"] = __version__
    env["extension"] = extension_status()
    return env


def write(name: str, rows: list[dict], extra: dict | None = None, out_dir: str = RESULTS_DIR) -> tuple[str, str]:
    """Write rows to <name>.json (with the environment) and <name>.csv; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    doc = {"benchmark": name, "environment": env, **(extra or {}), "rows": rows}
    jpath = os.path.join(out_dir, f"{name}.json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    cpath = os.path.join(out_dir, f"{name}.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["device_name", "torch", "date"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "device_name": env["device_name"], "torch": env["torch"], "date": env["date"]})
    return jpath, cpath
