"""Training logs: every training stage writes per-epoch (and per-step) scalars as CSV and TensorBoard events, read back here."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_sets
from test_resume import kill_when

from hello_fast.config import save_config
from hello_fast.logs import EPOCH_COLUMNS, TrainingLog

STAGES = {"teachers": 2, "projector": 1, "student/hard": 2, "student/teacher": 2, "student/projector": 2}  # epochs


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`hello-fast distill --log-dir LOGS --log-steps` on the tiny config: (logs folder, completed process)."""
    tmp = tmp_path_factory.mktemp("logs")
    config = tmp / "tiny.yaml"
    save_config(tiny_config(), str(config))
    logs = tmp / "logs"
    out = subprocess.run([sys.executable, "-m", "hello_fast", "distill", "--config", str(config), "--out", str(tmp / "run"),
                          "--device", "cpu", "--log-dir", str(logs), "--log-steps", "--quiet"],
                         capture_output=True, text=True)
    return logs, out


@pytest.mark.slow
def test_distill_writes_one_csv_row_per_epoch_and_tensorboard_events(cli_run):
    pytest.importorskip("tensorboard")
    logs, out = cli_run
    assert out.returncode == 0, out.stderr[-3000:]
    for stage, epochs in STAGES.items():
        rows = _rows(logs / stage / "epochs.csv")
        assert list(rows[0]) == list(EPOCH_COLUMNS)
        assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)), stage
        for r in rows:
            assert float(r["loss"]) >= 0 and float(r["lr"]) > 0 and float(r["img_per_s"]) > 0 and float(r["seconds"]) > 0
            assert 0 <= float(r["val_top1"]) <= 100  # every epoch of the tiny config is evaluated
        scalars = _scalars(logs / stage)
        for name in ("loss", "lr", "val_top1", "img_per_s"):
            assert [s for s, _ in scalars[f"epoch/{name}"]] == list(range(1, epochs + 1)), (stage, name)
        assert scalars["epoch/loss"][-1][1] == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
        steps = _rows(logs / stage / "steps.csv")
        assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1)) and len(steps) >= epochs
        assert {int(r["epoch"]) for r in steps} == set(range(1, epochs + 1))
        per_step = _scalars(logs / stage / "steps")
        assert len(per_step["step/loss"]) == len(steps) and len(per_step["step/lr"]) == len(steps)
        # the epoch's loss is the mean of its steps' losses
        last = [float(r["loss"]) for r in steps if int(r["epoch"]) == epochs]
        assert float(rows[-1]["loss"]) == pytest.approx(sum(last) / len(last), rel=1e-4)


def test_default_log_dir_is_inside_the_run(tiny_run):
    run, _ = tiny_run
    for stage, epochs in STAGES.items():
        folder = os.path.join(run, "logs", stage)
        assert len(_rows(os.path.join(folder, "epochs.csv"))) == epochs
        assert not os.path.exists(os.path.join(folder, "steps.csv"))  # per-step logs only on request
        if _has_tensorboard():
            assert any(n.startswith("events.out.tfevents.") for n in os.listdir(folder))


def _has_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_resumed_stage_keeps_earlier_epochs_and_rewrites_the_rest(tmp_path, rng):
    pytest.importorskip("tensorboard")
    losses = torch.rand(4, generator=rng) + 0.1
    log = TrainingLog(str(tmp_path), steps=True)
    for epoch in (1, 2, 3):  # a run killed after epoch 3's row, before its checkpoint
        log.begin_epoch()
        log.step(losses[epoch - 1], 8, 0.1, epoch)
        log.end_epoch(epoch, val_top1=10.0 * epoch)
    log.close()
    log = TrainingLog(str(tmp_path), first_epoch=3, steps=True)  # resumed from the checkpoint of epoch 2
    for epoch in (3, 4):
        log.begin_epoch()
        log.step(losses[epoch - 1] * 2, 8, 0.05, epoch)
        log.end_epoch(epoch)
    log.close()
    rows = _rows(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [r["val_top1"] for r in rows] == ["10.0", "20.0", "", ""]
    assert float(rows[2]["loss"]) == pytest.approx(float(losses[2] * 2))
    loss = _scalars(tmp_path)["epoch/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4] and loss[2][1] == pytest.approx(float(losses[2] * 2))
    assert [int(r["step"]) for r in _rows(tmp_path / "steps.csv")] == [1, 2, 3, 4]
    assert [s for s, _ in _scalars(tmp_path / "steps")["step/loss"]] == [1, 2, 3, 4]
    old_events = {n for n in os.listdir(tmp_path) if n.startswith("events.out")}
    fresh = TrainingLog(str(tmp_path))  # a stage that starts again from epoch 1 starts its logs afresh
    fresh.close()
    assert _rows(tmp_path / "epochs.csv") == [] and not (tmp_path / "steps.csv").exists()
    assert old_events and not old_events & set(os.listdir(tmp_path)) and "epoch/loss" not in _scalars(tmp_path)


def _writer_uid(directory) -> int:
    """Open and close one SummaryWriter in `directory`; the process-wide writer count its file name carries."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    name = os.path.basename(writer.file_writer.event_writer._file_name)
    writer.close()
    return int(name.split(".")[-1])


def test_a_resume_whose_writer_count_gains_a_digit_still_purges(tmp_path):
    """Event files of one second sort by the writer count as text ("10" < "9"): the resumed file must still be read last."""
    pytest.importorskip("tensorboard")
    scratch = tmp_path / "scratch"
    uid = _writer_uid(scratch)
    while len(str(uid + 1)) == len(str(uid + 2)):  # the first log's writer gets the last count of this many digits
        uid = _writer_uid(scratch)
    log = TrainingLog(str(tmp_path / "log"))
    for epoch in (1, 2, 3):
        log.begin_epoch()
        log.step(torch.tensor(float(epoch)), 8, 0.1, epoch)
        log.end_epoch(epoch)
    log.close()
    log = TrainingLog(str(tmp_path / "log"), first_epoch=2)  # its writer's count has one digit more
    for epoch in (2, 3):
        log.begin_epoch()
        log.step(torch.tensor(10.0 * epoch), 8, 0.1, epoch)
        log.end_epoch(epoch)
    log.close()
    loss = _scalars(tmp_path / "log")["epoch/loss"]
    assert loss == [(1, 1.0), (2, 20.0), (3, 30.0)]


@pytest.mark.slow
def test_a_killed_stage_rerun_logs_each_epoch_once(tmp_path):
    """SIGKILL the teachers stage after a checkpoint, rerun: epochs.csv and TensorBoard hold epochs 1..6, each once."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hello_fast", "teachers", "--device", "cpu", "--out", str(out),
           *tiny_sets("teachers.keep_epochs=[1,2,3,4,5,6]")]
    assert kill_when(cmd, str(out / ".partial" / "teachers" / "checkpoint.pt")), "finished before it could be killed"
    partial = _rows(out / "logs" / "teachers" / "epochs.csv")
    assert partial and len(partial) < 6
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the checkpoint after epoch" in again.stderr
    rows = _rows(out / "logs" / "teachers" / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _scalars(out / "logs" / "teachers")["epoch/loss"]] == [1, 2, 3, 4, 5, 6]


def test_csv_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were absent
    log = TrainingLog(str(tmp_path))
    log.begin_epoch()
    log.step(torch.tensor(0.5), 4, 0.1)
    log.end_epoch(1)
    log.close()
    assert [r["loss"] for r in _rows(tmp_path / "epochs.csv")] == ["0.5"]
    assert os.listdir(tmp_path) == ["epochs.csv"]


def test_report_names_the_users_data_folder(tmp_path):
    """The report's and the plot's title name the data folder, not only the preset the config started from."""
    from hello_fast.rundir import RunDir
    from hello_fast.stages.report import REPORT, run_title, write_report

    cfg = tiny_config("data.source=folder", f"data.root={tmp_path / 'my_pets'}")
    run = RunDir(str(tmp_path))
    results = {"config": "tiny", "title": run_title(cfg),
               "students": {"hard": {"top1_last": 40.0, "top1_best": 41.0, "label_bytes": 48}},
               "distilled_dir": str(tmp_path / "select")}
    write_report(run, results)
    assert (tmp_path / REPORT).read_text().startswith("# hello_fast run: my_pets (tiny config)\n")
    assert run_title(tiny_config()) == "tiny"  # the config's own data: its name is the data's
