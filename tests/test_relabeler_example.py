"""The README's examples run as written on a distilled image folder: the Relabeler in a torchvision loop, RelabelMix in a timm loop."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {"torchvision": os.path.join(ROOT, "examples", "relabel_in_your_loop.py"),
            "timm": os.path.join(ROOT, "examples", "relabel_mix_timm.py")}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_trains_with_online_labels(tiny_run, example):
    if example == "timm":
        pytest.importorskip("timm")
    run, _ = tiny_run
    out = subprocess.run([sys.executable, EXAMPLES[example], os.path.join(run, "projector", "artifact.safetensors"),
                          os.path.join(run, "select", "images"), "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\S+)", out.stdout)]
    assert len(losses) == 2 and all(l == l and l >= 0 for l in losses)  # finite KL values


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_readme_shows_the_example(example):
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = open(EXAMPLES[example]).read()
    body = code.split('"""', 2)[2].strip()
    assert body in readme, f"README's {example} example is out of date with {os.path.relpath(EXAMPLES[example], ROOT)}"
