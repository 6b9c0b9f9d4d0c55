"""The README's Relabeler example runs as written, in a plain torchvision loop on a distilled image folder."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "relabel_in_your_loop.py")


def test_example_trains_with_online_labels(tiny_run):
    run, _ = tiny_run
    out = subprocess.run([sys.executable, EXAMPLE, os.path.join(run, "projector", "artifact.safetensors"),
                          os.path.join(run, "select", "images"), "2"], capture_output=True, text=True,
                         env=dict(os.environ, HELLO_FAST_PROGRESS="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\S+)", out.stdout)]
    assert len(losses) == 2 and all(l == l and l >= 0 for l in losses)  # finite KL values


def test_readme_shows_the_example():
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = open(EXAMPLE).read()
    body = code.split('"""', 2)[2].strip()
    assert body in readme, "README's Relabeler example is out of date with examples/relabel_in_your_loop.py"
