"""The README's first command: `hello-fast distill` on the embedded default (digits), within 5 minutes on a CPU."""
import json
import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_distill_on_the_embedded_default(tmp_path):
    env = dict(os.environ, HELLO_FAST_PROGRESS="0")
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "hello_fast", "distill", "--device", "cpu"], cwd=tmp_path,
                         capture_output=True, text=True, env=env)
    elapsed = time.time() - start
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"hello-fast distill (digits) took {elapsed:.0f} s\n{out.stdout}")
    assert elapsed < 300, f"the default run took {elapsed:.0f} s (budget: 5 minutes)"
    run = tmp_path / "runs" / "digits"
    results = json.loads((run / "results.json").read_text())
    s = results["students"]
    for line in ("hard", "teacher", "projector", "SRe2L stored labels"):
        assert line in out.stdout
    # the paper's point, on real digits: the ~0.2 MB artifact labels far better than hard labels
    assert s["projector"]["top1_best"] > s["hard"]["top1_best"] + 10
    assert s["projector"]["label_bytes"] < s["teacher"]["label_bytes"] / 10
    assert len(list((run / "refine" / "images").rglob("*.png"))) == 100
    assert (run / "report.md").is_file() and (run / "accuracy_vs_storage.png").is_file()
