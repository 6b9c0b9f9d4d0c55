"""The suite's tiers: SLOW cases get the `slow` mark, the `gpu` mark selects and skips without CUDA, and the fast tier refuses processes."""
import pathlib
import subprocess
import sys

import conftest
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
POPEN_INIT = subprocess.Popen.__init__  # before any case patches it


class _Item:
    """What the collection hook reads and writes of a pytest item."""

    def __init__(self, nodeid: str, *marks, fixtures=()):
        path, _, name = nodeid.partition("::")
        self.path, self.name, self.originalname = ROOT / path, name, name.split("[")[0]
        self.marks = [m.mark for m in marks]
        self.fixturenames = ["request", *fixtures]

    def get_closest_marker(self, name):
        return next((m for m in self.marks if m.name == name), None)

    def add_marker(self, marker):
        self.marks.append(marker.mark)

    def names(self) -> set[str]:
        return {m.name for m in self.marks}


def test_slow_marks_by_module_by_case_and_by_parameters():
    items = [_Item("tests/test_build.py::test_anything"),  # a whole module
             _Item("tests/test_stages.py::test_same_seed_same_result"),  # a case, every parameter
             _Item("tests/test_cli.py::test_help_explains[distill]"),
             _Item("tests/test_lora_linear.py::test_triton_forward_and_backward_match_float64[lead3-45-1271-128-True-False]"),
             _Item("tests/test_lora_linear.py::test_triton_forward_and_backward_match_float64[lead0-45-37-1-True-False]"),
             _Item("tests/test_config.py::test_anything"),
             _Item("tests/test_config.py::test_marked_in_its_file", pytest.mark.slow),
             _Item("tests/test_clip_loading.py::test_anything", fixtures=["tmp_path", "rn50"]),  # by fixture
             _Item("tests/test_clip_loading.py::test_anything", fixtures=["tmp_path"])]
    conftest.pytest_collection_modifyitems(None, items)
    conftest.pytest_collection_modifyitems(None, items)  # benchmarks' conftest runs the hook a second time
    assert [sorted(i.names()) for i in items] == [["slow"], ["slow"], ["slow"], ["slow"], [], [], ["slow"], ["slow"], []]


@pytest.mark.parametrize("cuda", [False, True])
def test_the_gpu_mark_selects_and_skips_without_cuda(monkeypatch, cuda):
    assert conftest.gpu.mark.name == "gpu"  # a mark `-m gpu` selects (a skipif object in its place selected nothing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    item = _Item("tests/test_lora_linear.py::test_on_the_gpu", conftest.gpu)
    conftest.pytest_collection_modifyitems(None, [item])
    assert item.names() == ({"gpu"} if cuda else {"gpu", "skip"})


def test_every_slow_entry_names_a_case_or_fixture_that_exists():
    """A renamed case or module would silently join the fast tier again."""
    stale = []
    for key in conftest.SLOW:
        module, _, case = key.partition("::")
        files = [p for p in (ROOT / "tests" / module, ROOT / "benchmarks" / module) if p.is_file()]
        if not files or (case and f"def {case.split('[')[0]}(" not in files[0].read_text()):
            stale.append(key)
    for name in conftest.SLOW_FIXTURES:
        if not any(f"def {name}(" in p.read_text() for p in (ROOT / "tests").glob("*.py")):
            stale.append(name)
    assert not stale, stale


def test_the_fast_tier_refuses_a_process_and_says_where_to_list_it(monkeypatch):
    conftest.refuse_processes("tests/test_x.py::test_y", monkeypatch)
    with pytest.raises(AssertionError, match=r"test_x.py::test_y starts a process .* list it in SLOW in tests/conftest.py"):
        subprocess.run([sys.executable, "-c", "pass"])
    monkeypatch.undo()
    assert subprocess.Popen.__init__ is POPEN_INIT
