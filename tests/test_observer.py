"""select.observer: the last weak teacher, a fully trained teacher (RDED's observer), or the user's own checkpoint; RDED's tiling."""
import os

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from hello_fast.config import load_config
from hello_fast.errors import HelloError
from hello_fast.layout import observer_path
from hello_fast.models.students import build_model
from hello_fast.pipeline import Pipeline
from hello_fast.stages import select as sel


def test_observer_values_are_checked():
    assert load_config("digits", ["select.observer=/models/resnet18.pth"]).select.observer == "/models/resnet18.pth"
    assert load_config("digits", ["select.observer=last_weak"]).select.observer == "last_weak"
    with pytest.raises(HelloError, match="select.observer must be one of teacher, last_weak, full, projector.*checkpoint path"):
        load_config("digits", ["select.observer=strongest"])


def test_full_observer_trains_on_and_keeps_the_final_network(tmp_path):
    out = str(tmp_path / "full")
    cfg = tiny_config("select.observer=full", "teachers.epochs=3")
    pipe = Pipeline(cfg, out, device="cpu")
    # a weak-only teacher run is stale for a full observer: it must go on to teachers.epochs
    assert pipe.fingerprint("teachers") != Pipeline(tiny_config("teachers.epochs=3"), out, device="cpu").fingerprint("teachers")
    summary = pipe.run_stage("teachers")
    assert summary["checkpoints"] == ["epoch_001.safetensors", "epoch_002.safetensors"]  # the weak teachers, unchanged
    assert summary["observer"] == "epoch_003.safetensors" and set(summary["bytes"]) == {"1", "2"}
    assert 0 <= summary["observer_top1"] <= 100
    assert observer_path(pipe.run, full=True).endswith("epoch_003.safetensors")
    assert observer_path(pipe.run).endswith("epoch_002.safetensors")
    assert pipe.run_stage("select")["images"] == 6
    with pytest.raises(HelloError, match="before the last weak teacher"):
        Pipeline(tiny_config("select.observer=full", "teachers.epochs=1"), out, device="cpu").run_stage("teachers")


    weak_only = Pipeline(tiny_config(), str(tmp_path / "weak"), device="cpu")
    weak_only.run_stage("teachers")
    with pytest.raises(HelloError, match="kept no fully trained network"):
        observer_path(weak_only.run, full=True)


def _own_observer(seed):
    torch.manual_seed(seed)
    return build_model("resnet18", 3, 32, 8)  # teachers.arch at the tiny config's width and size


def test_your_own_checkpoint_as_the_observer(tmp_path):
    out = str(tmp_path / "own")  # no teachers stage needed
    model = _own_observer(1)
    path = str(tmp_path / "checkpoint.pth.tar")
    # as PyTorch's ImageNet example saves it: wrapped, with DistributedDataParallel's prefix, optimizer beside
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    cfg = tiny_config(f"select.observer={path}")
    observer = sel.make_observer(cfg, None, "cpu", 3)
    got = observer.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    pipe = Pipeline(cfg, out, device="cpu")
    assert pipe.run_stage("select")["images"] == 6
    fp = pipe.fingerprint("select")
    torch.save(_own_observer(2).state_dict(), path)  # other weights in the same file: the selection is stale
    assert Pipeline(cfg, out, device="cpu").fingerprint("select") != fp
    st = str(tmp_path / "observer.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    assert torch.equal(sel.make_observer(tiny_config(f"select.observer={st}"), None, "cpu", 3).model.fc.weight, model.fc.weight)


def test_a_wrong_checkpoint_is_named(tmp_path):
    path = str(tmp_path / "ten.pth")
    torch.manual_seed(0)
    torch.save(build_model("resnet18", 10, 32, 8).state_dict(), path)
    with pytest.raises(HelloError, match=r"fc.weight is \(10, 64\), resnet18 at 32 px needs \(3, 64\) \(the data has 3 classes\)"):
        sel.make_observer(tiny_config(f"select.observer={path}"), None, "cpu", 3)
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(HelloError, match="not a resnet18 state dict"):
        sel.make_observer(tiny_config(f"select.observer={path}"), None, "cpu", 3)
    with pytest.raises(HelloError, match="does not exist"):
        sel.make_observer(tiny_config(f"select.observer={tmp_path}/none.pth"), None, "cpu", 3)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(HelloError, match="not a plain tensor checkpoint"):
        sel.make_observer(tiny_config(f"select.observer={path}"), None, "cpu", 3)
    assert os.path.isfile(path)


def test_tiles_interleave_the_ranks_as_rdeds_mix_images():
    ipc, f, p = 3, 2, 4
    ranks = torch.arange(ipc * f * f)
    patches = ranks.view(-1, 1, 1, 1).expand(-1, 3, p, p).to(torch.uint8).contiguous()
    images = sel.tile_patches(patches, ipc, f)
    assert images.shape == (ipc, 3, f * p, f * p)
    for i in range(ipc):
        cells = [int(images[i, 0, r * p, c * p]) for r in range(f) for c in range(f)]  # row-major grid cells
        assert cells == [k * ipc + i for k in range(f * f)]  # image i: ranks i, ipc+i, 2 ipc+i, ...
        assert (images[i, :, :p, :p] == i).all()
    old = sel.tile_patches(patches, ipc, f, "consecutive")
    assert [int(old[0, 0, r * p, c * p]) for r in range(f) for c in range(f)] == [0, 1, 2, 3]
