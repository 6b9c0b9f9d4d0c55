"""Configs: presets, YAML files with `base:`, overrides, and errors that name the bad key."""
import os

import pytest

from hello_fast.config import load_config, preset_names
from hello_fast.errors import HelloError


def test_presets_carry_the_papers_settings():
    assert {"digits", "imagenet1k-ipc10", "imagenet100-ipc10", "places365-ipc10"} <= set(preset_names())
    in1k = load_config("imagenet1k-ipc10")
    assert (in1k.clip.model, in1k.clip.pretrained) == ("RN50", "openai")
    assert (in1k.projector.conv_rank, in1k.projector.head_rank) == (8, 128)
    assert in1k.teachers.keep_epochs == [11, 16, 21, 26, 31, 36, 41, 46, 51]  # 9 weak teachers, Table 4's 11-51 (Table 1: 43.7)
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


def test_fingerprint_tracks_only_what_is_read():
    a = load_config("digits")
    b = load_config("digits", ["student.epochs=5"])
    assert a.fingerprint("teachers") == b.fingerprint("teachers")
    assert a.fingerprint("student") != b.fingerprint("student")
    assert a.fingerprint("teachers") != load_config("digits", ["seed=1"]).fingerprint("teachers")
    # result-neutral options never enter a fingerprint
    for neutral in ("data.num_workers=8", "student.eval_batch_size=7", "select.batch_size=3", "checkpoint_every=0"):
        c = load_config("digits", [neutral])
        assert all(c.fingerprint(s) == a.fingerprint(s) for s in ("data", "teachers", "select", "student")), neutral
    # a left-out key does not count
    c = load_config("digits", ["student.label_sources=[hard]"])
    assert c.fingerprint("student", "-student.label_sources") == a.fingerprint("student", "-student.label_sources")
    assert c.fingerprint("student") != a.fingerprint("student")


def test_every_option_is_declared_once_with_help_and_a_working_default():
    from hello_fast.config import Config, options

    opts = options()
    assert len({o.key for o in opts}) == len(opts)
    for o in opts:
        assert o.help and not o.help.endswith("."), o.key
    Config().validate()  # the declared defaults obey the declared rules


def test_declared_bounds_and_choices_are_enforced_from_the_declaration():
    from hello_fast.config import options

    for o in options():
        if o.choices:  # a value outside a Literal is refused by name
            with pytest.raises(HelloError, match=o.key.replace(".", r"\.") + " must be one of"):
                load_config("digits", [f"{o.key}=not-a-choice"])
        for bound, bad in (("min", lambda b: b - 1), ("gt", lambda b: b)):
            if o.meta[bound] is not None and o.type_name() in ("int", "float", "int | null", "float | null"):
                with pytest.raises(HelloError, match=o.key.replace(".", r"\.")):
                    load_config("digits", [f"{o.key}={bad(o.meta[bound])}"])


def test_cli_flags_are_aliases_of_set():
    from hello_fast.cli import build_parser, _load_cfg

    args = build_parser().parse_args(["distill", "--loader", "torch", "--seed", "3", "--set", "student.epochs=4",
                                      "--log-steps", "--artifact", "a.safetensors"])
    cfg = _load_cfg(args)
    assert (cfg.data.loader, cfg.seed, cfg.student.epochs, cfg.log_steps) == ("torch", 3, 4, True)
    assert os.path.isabs(cfg.student.artifact)
    with pytest.raises(SystemExit):  # choices come from the declaration
        build_parser().parse_args(["distill", "--loader", "pil"])


def test_data_defines_the_classes_whatever_the_preset(tmp_path):
    digits = load_config("digits", data_root=str(tmp_path))
    assert (digits.data.source, digits.data.root) == ("folder", str(tmp_path))
    assert digits.data.num_classes is None and digits.clip.class_names is None
    assert digits.clip.templates != "digits" and digits.data.flip  # the digits source's own rules give way
    kept = load_config("digits", ["data.num_classes=2", "clip.templates=digits"], data_root=str(tmp_path))
    assert (kept.data.num_classes, kept.clip.templates) == (2, "digits")  # what the user sets stays
    in1k = load_config("imagenet1k-ipc10", data_root=str(tmp_path))
    assert in1k.data.num_classes is None and in1k.clip.templates == "imagenet"  # a folder preset keeps its prompts


def test_yaml_words_that_read_as_booleans_select_a_literal_choice():
    """`--set student.overlap=on` (YAML 1.1 reads on/off as booleans) means the choice 'on', not an error."""
    assert load_config("digits", ["student.overlap=on"]).student.overlap == "on"
    assert load_config("digits", ["student.overlap=off"]).student.overlap == "off"
    with pytest.raises(HelloError, match="student.loss must be one of mse, kl; got True"):
        load_config("digits", ["student.loss=yes"])  # no yes-like choice: still refused, naming the key
