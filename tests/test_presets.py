"""The paper's presets: weak-teacher epochs (Table 1/4), RDED's batch sizes by IPC, the full observer, and that every preset loads."""
import pytest

from hello_fast.config import load_config, preset_names
from hello_fast.storage import MIB, sre2l_soft_label_bytes

PAPER_PRESETS = ("imagenet1k-ipc1", "imagenet1k-ipc10", "imagenet1k-ipc50", "imagenet100-ipc1", "imagenet100-ipc10",
                 "imagenet100-ipc50", "places365-ipc1", "places365-ipc10", "places365-ipc50")


def test_every_preset_loads_and_names_itself():
    names = preset_names()
    assert set(PAPER_PRESETS) | {"digits"} <= set(names)
    for name in names:
        cfg = load_config(name)  # validates
        assert cfg.name == name


@pytest.mark.parametrize("preset, first", [
    ("imagenet1k-ipc10", 11),   # Table 1's 43.7 is Table 4's 11-51 column (1-41: 42.3)
    ("imagenet100-ipc10", 1),   # Table 1's 48.9 is Table 4's 1-41 column
    ("imagenet1k-ipc1", 1),     # earlier teachers for smaller IPC (Sec. 4.4.3): Table 4's earliest column
    ("imagenet1k-ipc50", 21),   # later teachers for larger IPC: the column after IPC 10's
    ("places365-ipc10", 1),
    # the same reading for ImageNet-100 and Places365, whose IPC 10 already takes the earliest column
    ("imagenet100-ipc1", 1), ("imagenet100-ipc50", 11), ("places365-ipc1", 1), ("places365-ipc50", 11),
])
def test_nine_weak_teachers_five_epochs_apart(preset, first):
    cfg = load_config(preset)
    assert cfg.teachers.keep_epochs == list(range(first, first + 41, 5))  # 9 checkpoints of one run
    assert cfg.teachers.epochs >= cfg.teachers.keep_epochs[-1]


@pytest.mark.parametrize("preset, ipc, batch", [
    ("imagenet1k-ipc1", 1, 20), ("imagenet1k-ipc10", 10, 100), ("imagenet1k-ipc50", 50, 200),
])
def test_imagenet1k_ipc_and_rdeds_batch_sizes(preset, ipc, batch):
    cfg = load_config(preset)
    assert (cfg.select.ipc, cfg.student.batch_size) == (ipc, batch)  # RDED: (10, 50, 100) x 2 for 1,000 classes
    assert cfg.data.num_classes == 1000 and cfg.student.epochs == 300
    assert (cfg.clip.model, cfg.clip.pretrained, cfg.projector.head_rank) == ("RN50", "openai", 128)


@pytest.mark.parametrize("preset, ipc, batch, classes, head_rank", [
    ("imagenet100-ipc1", 1, 20, 100, 64), ("imagenet100-ipc50", 50, 200, 100, 64),
    ("places365-ipc1", 1, 20, 365, 128), ("places365-ipc50", 50, 200, 365, 128),
])
def test_imagenet100_and_places365_at_ipc_1_and_50(preset, ipc, batch, classes, head_rank):
    cfg = load_config(preset)
    assert (cfg.select.ipc, cfg.student.batch_size, cfg.data.num_classes, cfg.projector.head_rank) == (ipc, batch, classes, head_rank)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_select_with_a_fully_trained_observer(preset):
    cfg = load_config(preset)
    assert cfg.select.method == "rded" and cfg.select.observer == "full"
    # each candidate image gives its best crop first: enough candidates for every patch of a class
    assert cfg.select.candidates_per_class >= cfg.select.ipc * cfg.select.factor**2


@pytest.mark.parametrize("preset, paper_mib", [
    ("imagenet1k-ipc1", 579.8), ("imagenet1k-ipc10", 5798.3), ("imagenet1k-ipc50", 28990.8),
])
def test_stored_label_sizes_match_table_1_at_every_ipc(preset, paper_mib):
    cfg = load_config(preset)
    n = cfg.data.num_classes * cfg.select.ipc
    ours = sre2l_soft_label_bytes(n, cfg.data.num_classes, cfg.student.epochs, cfg.student.batch_size) / MIB
    assert abs(ours - paper_mib) / paper_mib < 0.002
