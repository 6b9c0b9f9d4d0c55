"""Loaders that never run code and fail cleanly: malicious pickles refused; fuzzed artifacts, checkpoints, configs."""
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hello_fast.checkpoint import load_checkpoint, save_checkpoint
from hello_fast.config import Config, load_config
from hello_fast.errors import HelloError
from hello_fast.projector.artifact import read_artifact

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_malicious_pickle_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        pickle.dump({"epoch": 1, "model": _Evil(marker)}, f)
    with pytest.raises(HelloError, match="refusing to load"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_malicious_resume_checkpoint_stops_the_cli_cleanly(tiny_run, tmp_path):
    """A poisoned checkpoint where a resume would find it: one-line error, nothing executed."""
    import shutil


    run, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(os.path.join(run, "teachers"), out / "teachers")
    shutil.copy(os.path.join(run, "config.yaml"), out / "config.yaml")
    from hello_fast.config import load_config as lc
    from hello_fast.pipeline import Pipeline

    fp = Pipeline(lc(str(out / "config.yaml")), str(out), device="cpu").fingerprint("projector")
    partial = out / ".partial" / "projector"
    partial.mkdir(parents=True)
    (partial / ".fingerprint").write_text(fp)
    marker = tmp_path / "pwned"
    with open(partial / "checkpoint.pt", "wb") as f:
        pickle.dump({"epoch": 1, "x": _Evil(marker)}, f)
    res = subprocess.run([sys.executable, "-m", "hello_fast", "projector", "--out", str(out), "--device", "cpu"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "refusing to load" in res.stderr
    assert not marker.exists()


def test_checkpoint_round_trip(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1, "top1": 50.0}]})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(4.0))


@pytest.fixture(scope="module")
def artifact_bytes(tiny_run):
    with open(os.path.join(tiny_run[0], "projector", "artifact.safetensors"), "rb") as f:
        return f.read()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzzed_bytes_as_artifact(tmp_path, data):
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    with pytest.raises(HelloError):
        read_artifact(str(path))


@pytest.fixture(scope="module")
def artifact_tensors(tiny_run):
    tensors, _ = read_artifact(os.path.join(tiny_run[0], "projector", "artifact.safetensors"))
    return tensors


@FUZZ
@given(cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8))
@example(cut=None, flips=[(-1, 1)])  # the last byte: the last tensor's data (the header comes first)
@example(cut=None, flips=[])
def test_mutated_artifacts_fail_cleanly_or_load_the_original(tmp_path, artifact_bytes, artifact_tensors, cut, flips):
    """Truncated or bit-flipped artifacts: a HelloError, or (a mutation that only touched the header's padding,
    flips that cancel) exactly the original tensors; never different labels."""
    data = bytearray(artifact_bytes if cut is None else artifact_bytes[: cut % (len(artifact_bytes) + 1)])
    for pos, x in flips:
        if data:
            data[pos % len(data)] ^= x
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(data))
    try:
        tensors, _ = read_artifact(str(path))
    except HelloError:
        assert flips or cut is not None, "the untouched artifact does not load"
        return
    assert sorted(tensors) == sorted(artifact_tensors)
    changed = [k for k in tensors if not torch.equal(tensors[k], artifact_tensors[k])]
    assert not changed, f"a mutated artifact loaded with other values in {changed}"


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzzed_bytes_as_checkpoint(tmp_path, data):
    path = tmp_path / "c.pt"
    path.write_bytes(data)
    with pytest.raises(HelloError):
        load_checkpoint(str(path))


_CHECKPOINT = {"epoch": 1, "model": {"w": torch.arange(6.0)}}


def _tensor_data_offset() -> int:
    """Where the checkpoint's tensor bytes sit in its file (save_checkpoint writes what torch.save writes)."""
    buffer = io.BytesIO()
    torch.save(_CHECKPOINT, buffer)
    return buffer.getvalue().index(_CHECKPOINT["model"]["w"].numpy().tobytes())


def _is_the_checkpoint(state) -> bool:
    return (set(state) == set(_CHECKPOINT) and state["epoch"] == 1 and set(state["model"]) == {"w"}
            and torch.equal(state["model"]["w"], _CHECKPOINT["model"]["w"]))


@FUZZ
@given(cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10**5)),
       flips=st.lists(st.tuples(st.integers(0, 10**5), st.integers(1, 255)), max_size=6))
@example(cut=None, flips=[])
@example(cut=None, flips=[(_tensor_data_offset() + 4, 1)])  # 1.0 becomes 1.0000001: only a checksum sees it
def test_mutated_checkpoints_fail_cleanly_or_load_the_original(tmp_path, cut, flips):
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), _CHECKPOINT)
    data = bytearray(good.read_bytes())
    data = data if cut is None else data[: cut % (len(data) + 1)]
    for pos, x in flips:
        if data:
            data[pos % len(data)] ^= x
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    try:
        state = load_checkpoint(str(bad))
    except HelloError:
        assert flips or cut is not None, "the untouched checkpoint does not load"
        return
    assert _is_the_checkpoint(state), f"a mutated checkpoint loaded as {state}"


def test_every_bit_flip_of_a_checkpoint_is_refused_or_harmless(tmp_path):
    """Each of the file's bits flipped in turn: HelloError, or the original (a timestamp, an unused field).
    torch.load alone loaded 30 of one flip per byte as other values and let one AssertionError out."""
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), _CHECKPOINT)
    data = good.read_bytes()
    bad, wrong = tmp_path / "bad.pt", []
    for pos in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            bad.write_bytes(bytes(flipped))
            try:
                if not _is_the_checkpoint(load_checkpoint(str(bad))):
                    wrong.append((pos, bit))
            except HelloError:
                pass
    assert not wrong, f"{len(wrong)} flips (byte, bit) loaded as other values: {wrong[:10]}"


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzzed_yaml_text_as_config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        assert isinstance(load_config(str(path)), Config)
    except HelloError:
        pass


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)
_sections = st.sampled_from(["data", "clip", "teachers", "select", "projector", "refine", "student", "seed", "device", "base", "name"])
_keys = st.sampled_from(["image_size", "epochs", "scale", "train_scale", "crop_scale", "label_sources", "keep_epochs", "lr",
                         "source", "templates", "ipc", "factor", "loss", "mix", "batch_size", "num_classes", "pretrained"])


@FUZZ
@given(doc=st.dictionaries(_sections, st.one_of(_values, st.dictionaries(_keys, _values, max_size=4)), max_size=5))
def test_fuzzed_config_structures(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        assert isinstance(load_config(str(path)), Config)
    except HelloError:
        pass


def _typed_sections():
    import dataclasses

    from hello_fast import config as C

    fields = {s: [f.name for f in dataclasses.fields(cls)] for s, cls in
              [("data", C.DataConfig), ("clip", C.ClipConfig), ("teachers", C.TeachersConfig), ("select", C.SelectConfig),
               ("projector", C.ProjectorConfig), ("refine", C.RefineConfig), ("student", C.StudentConfig)]}
    return st.sampled_from(sorted(fields)).flatmap(
        lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(fields[s]), _values, max_size=3)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_typed_sections(), max_size=3))
def test_fuzzed_values_of_real_keys(tmp_path, items):
    """Every real key with values of any type: a Config or one HelloError naming the key, nothing else."""
    doc = {"base": "digits", **dict(items)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        assert isinstance(load_config(str(path)), Config)
    except HelloError as e:
        assert str(e).startswith(("config", "unknown config preset"))
