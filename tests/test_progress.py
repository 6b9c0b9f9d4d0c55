"""Progress output: plain lines (one per epoch, one per tenth of a long loop) where stderr is a file, bars in a terminal."""
import io
import re

import pytest

from hello_fast import _progress
from hello_fast._progress import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setattr(_progress, "_enabled", True)  # the suite runs with HELLO_FAST_PROGRESS=0
    monkeypatch.delenv("HELLO_FAST_PROGRESS", raising=False)


def _student_like(file, epochs=3, batches=40):
    """The student stage's shape: an epoch bar with a postfix, a batch bar inside each epoch."""
    bar = progress(range(1, epochs + 1), desc="student (hard)", unit="epoch", file=file)
    for epoch in bar:
        for _ in progress(range(batches), desc=f"epoch {epoch}", unit="batch", disable_below=20, file=file):
            pass
        bar.set_postfix(top1=f"{50 + epoch:.1f}")


def test_a_log_file_gets_one_line_per_epoch_with_the_figures():
    out = io.StringIO()
    _student_like(out)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 3, lines  # the short batch loops write nothing of their own
    for epoch, line in enumerate(lines, 1):
        assert line.startswith(f"student (hard): {epoch}/3 epoch ({100 * epoch // 3}%) [")
        assert re.search(r"\d\d:\d\d elapsed, \d\d:\d\d left, [\d.]+ (epoch/s|s/epoch)\]", line), line
        assert line.endswith(f"top1={50 + epoch:.1f}")  # the postfix set in that epoch's body


def test_a_long_loop_writes_a_line_per_tenth(monkeypatch):
    monkeypatch.setattr(_progress, "LONG_SECONDS", 0.0)  # every loop counts as long
    out = io.StringIO()
    for _ in progress(range(57), desc="select: scoring crops", unit="batch", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert [int(re.search(r": (\d+)/57 ", l).group(1)) for l in lines] == [6, 12, 18, 23, 29, 35, 40, 46, 52, 57]
    assert lines[-1].startswith("select: scoring crops: 57/57 batch (100%) [")


def test_updates_without_an_iterable_and_a_loop_that_turns_long_late(monkeypatch):
    """`update(n)` (the image check's pool); lines start at the first tenth reached after LONG_SECONDS."""
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0, 43.0])  # start, then one reading per update
    monkeypatch.setattr(_progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    with progress(total=600, desc="checking images", unit="file", file=out) as bar:
        for _ in range(6):
            bar.update(100)
    lines = out.getvalue().splitlines()
    assert [l.split(" [")[0] for l in lines] == [f"checking images: {n}/600 file ({100 * n // 600}%)" for n in (300, 400, 500, 600)]
    assert lines[0].endswith("[00:40 elapsed, 00:40 left, 7.50 file/s]")


def test_a_terminal_gets_the_bars():
    out = _Terminal()
    _student_like(out)
    text = out.getvalue()
    assert "\r" in text and "student (hard)" in text and "top1=53.0" in text  # tqdm redraws in place


@pytest.mark.parametrize("forced, bars", [("bars", True), ("lines", False)])
def test_the_environment_can_choose(monkeypatch, forced, bars):
    monkeypatch.setenv("HELLO_FAST_PROGRESS", forced)
    out = io.StringIO() if bars else _Terminal()
    _student_like(out, epochs=2)
    text = out.getvalue()
    assert ("\r" in text) == bars
    if not bars:
        assert [l.split(" [")[0] for l in text.splitlines()] == ["student (hard): 1/2 epoch (50%)", "student (hard): 2/2 epoch (100%)"]


def test_disabled_or_another_rank_writes_nothing(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(_progress, "_enabled", False)
    _student_like(out)
    monkeypatch.setattr(_progress, "_enabled", True)
    monkeypatch.setenv("RANK", "1")
    _student_like(out)
    assert out.getvalue() == ""
