"""Shared fixtures: offline settings, a tiny procedural configuration, and one tiny finished run to inspect."""
from __future__ import annotations

import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests read the commands' stderr, so no progress output in it whatever the shell says; the commands
# the tests start inherit it (no test passes it again)
os.environ["HELLO_FAST_PROGRESS"] = "0"
try:  # without a GPU, Triton kernels are tested through the interpreter (set before triton is imported)
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import pytest  # noqa: E402
import torch  # noqa: E402

from hello_fast.cli import main as cli_main  # noqa: E402

TINY = [
    "data.source=procedural", "data.procedural_classes=3", "data.procedural_per_class=16", "data.image_size=32",
    "data.num_classes=3", "data.train_scale=[0.5,1.0]",
    "clip.templates=simple",
    "teachers.width=8", "teachers.keep_epochs=[1,2]", "teachers.batch_size=16", "teachers.lr=0.05",
    # RDED's own tiling and crop scale (the digits preset takes whole images): the tiny runs exercise the tiles
    "select.factor=2", "select.crop_scale=[0.08,1.0]",
    "select.ipc=2", "select.candidates_per_class=6", "select.crops_per_image=2", "select.batch_size=32",
    "projector.conv_rank=2", "projector.head_rank=3", "projector.epochs=1", "projector.batch_size=16",
    "refine.enabled=true", "refine.steps=2", "refine.batch_size=8",
    "student.width=8", "student.epochs=2", "student.batch_size=4", "student.eval_every=1",
]


def tiny_sets(*extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    """TINY and then `extra` as command-line arguments (`--set KEY=VALUE` pairs); TINY's items whose key starts
    with one of `drop` left out (a folder run drops ("data.source", "data.procedural", "data.num_classes"))."""
    items = [item for item in TINY if not item.startswith(tuple(drop))] + list(extra)
    return [arg for item in items for arg in ("--set", item)]


def tiny_config(*extra: str):
    from hello_fast.config import load_config

    cfg = load_config("digits", TINY + list(extra))
    cfg.name = "tiny"
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny distill run (procedural data): (run directory, results)."""
    from hello_fast.pipeline import Pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    results = Pipeline(tiny_config(), str(out), device="cpu").distill()
    return str(out), results


@pytest.fixture
def rng(request):
    """A fresh random generator; its seed is printed (shown with a failure) so the case can be replayed.

    HELLO_FAST_TEST_SEED=N replays one seed.
    """
    seed = int(os.environ.get("HELLO_FAST_TEST_SEED", torch.seed() % 2**31))
    print(f"{request.node.nodeid}: rng seed {seed} (replay: HELLO_FAST_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cli_here(capsys):
    """`hello-fast ARGS` in this process: cli_here(*args) -> CompletedProcess (exit status, stdout, stderr).

    No interpreter start-up (importing torch and torchvision: 3-7 s a call on a 2-core CPU); the
    same `main` as the console script. Tests keep one subprocess call for the user's own path.
    """
    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = cli_main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """GPU cases skip without CUDA (the `gpu` mark selects; a skipif object in its place selected nothing)."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)


gpu = pytest.mark.gpu  # `pytest -m gpu` selects these; without CUDA they skip (pytest_collection_modifyitems)


def triton_device():
    """Where Triton kernels run in this session: the GPU, or the CPU through the interpreter; None if neither."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
