"""The one training engine: resume gives the uninterrupted run's weights, a NaN stops with the knob to turn, old
checkpoints are refused in one line, and every trainer of the package steps through it."""
from __future__ import annotations

import ast
import os

import pytest
import torch

from hello_fast.engine import Engine, every
from hello_fast.errors import HelloError

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(os.path.dirname(HERE), "hello_fast")


def _engine(folder, epochs=4, *, fail_in_epoch=None, lr=0.1, extra=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    w = torch.randn(5, 3)

    def loss(batch):
        x = batch
        return ((model(x) - x @ w) ** 2).mean(), x.shape[0]

    def batches(epoch):
        if epoch == fail_in_epoch:
            raise KeyboardInterrupt  # the process dies in the middle of this epoch
        return [torch.randn(8, 5) for _ in range(3)]  # drawn from the global generator, which a resume restores

    engine = Engine("toy", model, opt, device="cpu", epochs=epochs, loss=loss, knob="toy.lr", folder=str(folder),
                    checkpoint_every=1, scheduler=sched, extra=extra)
    return engine, batches, model


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights_and_history(tmp_path):
    whole, batches, model = _engine(tmp_path / "whole")
    whole.run(batches, evaluate=lambda: float(model.weight.detach().sum()), evaluate_at=every(2, 4))
    killed, batches, _ = _engine(tmp_path / "killed", fail_in_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        killed.run(batches, evaluate=lambda: 0.0, evaluate_at=every(2, 4))
    counts = {"n": 0}
    resumed, batches, model2 = _engine(tmp_path / "killed", extra=None)
    assert resumed.resumed and resumed.first_epoch == 3 and resumed.step_count == 6
    resumed.run(batches, evaluate=lambda: float(model2.weight.detach().sum()), evaluate_at=every(2, 4),
                after_epoch=lambda e, acc, s: counts.__setitem__("n", counts["n"] + 1))
    assert counts["n"] == 2  # epochs 3 and 4 only
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)
    assert [h["epoch"] for h in resumed.history] == [2, 4]
    assert resumed.history[-1]["top1"] == whole.history[-1]["top1"]
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_extra_state_comes_back_on_resume(tmp_path):
    kept = {"summary": {"a": 1}}
    engine, batches, _ = _engine(tmp_path, epochs=2, fail_in_epoch=2,
                                 extra={"summary": (lambda: kept["summary"], kept["summary"].update)})
    with pytest.raises(KeyboardInterrupt):
        engine.run(batches, after_epoch=lambda e, acc, s: kept["summary"].update(epoch=e))
    back = {}
    engine, _, _ = _engine(tmp_path, epochs=2, extra={"summary": (lambda: back, back.update)})
    assert back == {"a": 1, "epoch": 1}


def test_a_non_finite_loss_stops_the_run_naming_the_option(tmp_path):
    engine, batches, _ = _engine(tmp_path, lr=1e30)
    with pytest.raises(HelloError, match=r"toy: the loss became NaN or infinite in epoch \d.*Lower toy.lr"):
        engine.run(batches)


def test_a_checkpoint_of_an_older_loop_is_refused_in_one_line(tmp_path):
    from hello_fast.checkpoint import rng_state, save_checkpoint

    save_checkpoint(str(tmp_path / "checkpoint.pt"), {"epoch": 1, "model": {}, "rng": rng_state()})
    with pytest.raises(HelloError, match="older hello_fast.*lacks weights.*delete it"):
        _engine(tmp_path)


def _calls(path: str) -> set[str]:
    """Attribute names called in a module (x.backward() -> 'backward')."""
    tree = ast.parse(open(path).read())
    return {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


@pytest.mark.parametrize("module", ["stages/teachers.py", "stages/projector.py", "stages/student.py", "bench.py"])
def test_no_trainer_has_a_loop_of_its_own(module):
    """The teachers, projector, student and the benchmark's product loops step only through Engine.step: none calls
    backward or an optimiser's step itself (the benchmark's naive peers' loop is the one allowed copy)."""
    calls = _calls(os.path.join(PACKAGE, module))
    if module == "bench.py":
        src = open(os.path.join(PACKAGE, module)).read()
        # only _cpu_loop, the peers' loop that the product is compared with, steps an optimiser itself
        assert src.count(".backward()") == 1 and "def _cpu_loop" in src
        assert "engine.step(" in src and "student_engine(" in src
    else:
        assert "backward" not in calls and "zero_grad" not in calls, module
        assert "run" in calls  # engine.run


def test_the_benchmark_times_the_products_step(monkeypatch):
    """bench student-loop's fast and floor loops call Engine.step (the product's), not a copy of it."""
    import argparse

    from hello_fast import bench

    seen = []
    original = Engine.step

    def counting(self, batch):
        seen.append(self.name)
        return original(self, batch)

    monkeypatch.setattr(Engine, "step", counting)
    args = argparse.Namespace(device="cpu", classes=4, res=32, batch=8, student="resnet18", projector="hello-tiny-rn",
                              width=8, conv_rank=2, head_rank=2, capture=False, steps=1)
    s = bench._Setup(args)
    relabel = s.labeler("fast")
    bench._fast_loop(s, relabel, 1)
    bench._floor(s, relabel, 1)
    assert seen == ["student (projector)"] * 6  # 2 warm-up + 1 timed step, each loop
