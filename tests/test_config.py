"""Configs: presets, YAML files with `base:`, overrides, and errors that name the bad key."""
import pytest

from hello_fast.config import load_config, preset_names
from hello_fast.errors import HelloError


def test_presets_carry_the_papers_settings():
    assert {"digits", "imagenet1k-ipc10", "imagenet100-ipc10", "places365-ipc10"} <= set(preset_names())
    in1k = load_config("imagenet1k-ipc10")
    assert (in1k.clip.model, in1k.clip.pretrained) == ("RN50", "openai")
    assert (in1k.projector.conv_rank, in1k.projector.head_rank) == (8, 128)
    assert in1k.teachers.keep_epochs == [1, 6, 11, 16, 21, 26, 31, 36, 41]  # 9 weak teachers, Table 4's 1-41
    assert load_config("imagenet100-ipc10").projector.head_rank == 64
    assert load_config("places365-ipc10").data.num_classes == 365
    assert load_config("digits").data.source == "digits"


def test_yaml_file_extends_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: digits\nstudent:\n  epochs: 7\n  loss: kl\n")
    cfg = load_config(str(path))
    assert cfg.student.epochs == 7 and cfg.student.loss == "kl"
    assert cfg.projector.head_rank == load_config("digits").projector.head_rank
    assert cfg.name == "mine"


def test_overrides_parse_yaml_values():
    cfg = load_config("digits", ["student.scale=[0.3, 0.9]", "refine.enabled=false", "clip.pretrained=/x/y.pt"])
    assert cfg.student.scale == [0.3, 0.9] and cfg.refine.enabled is False and cfg.clip.pretrained == "/x/y.pt"


@pytest.mark.parametrize("override, words", [
    (["student.epoch=3"], ["unknown key student.epoch"]),
    (["colour=red"], ["unknown key colour"]),
    (["student.epochs=three"], ["student.epochs must be int"]),
    (["student.loss=l1"], ["student.loss must be one of mse, kl"]),
    (["student.scale=[0.9, 0.1]"], ["student.scale"]),
    (["student.label_sources=[hard, oracle]"], ["student.label_sources"]),
    (["student=3"], ["student must be a mapping"]),
    (["no_equals_sign"], ["KEY=VALUE"]),
])
def test_bad_configs_are_named(override, words):
    with pytest.raises(HelloError) as e:
        load_config("digits", override)
    for w in words:
        assert w in str(e.value)


def test_unknown_keys_in_a_file_are_all_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  epochz: 3\n  lrr: 0.1\n")
    with pytest.raises(HelloError, match="unknown keys student.epochz, student.lrr"):
        load_config(str(path))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(HelloError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(HelloError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(HelloError, match="unknown config preset"):
        load_config("imagenet-ipc11")
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(HelloError, match="loops"):
        load_config(str(loop))


def test_section_hash_tracks_only_its_sections():
    a = load_config("digits")
    b = load_config("digits", ["student.epochs=5"])
    assert a.section_hash("teachers") == b.section_hash("teachers")
    assert a.section_hash("student") != b.section_hash("student")
    assert a.section_hash("teachers") != load_config("digits", ["seed=1"]).section_hash("teachers")
