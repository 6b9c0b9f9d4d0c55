"""Class names for CLIP's prompts: WordNet ids -> CLIP's curated ImageNet names for any subset; raw ids refused by a pretrained CLIP."""
import json
import warnings

import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from hello_fast.data.class_names import check_prompt_names, folder_class_names, imagenet_1k_wnids

IMAGENET_1K_WNIDS = imagenet_1k_wnids()
from hello_fast.data.sources import folder_splits
from hello_fast.errors import HelloError
from hello_fast.models.clip import load_clip
from hello_fast.projector.model import build_projector


def test_our_wnid_list_is_imagenet_1ks_sorted_synsets():
    import os

    import timm.data

    assert len(IMAGENET_1K_WNIDS) == 1000 and len(set(IMAGENET_1K_WNIDS)) == 1000
    assert list(IMAGENET_1K_WNIDS) == sorted(IMAGENET_1K_WNIDS)
    timm_copy = os.path.join(os.path.dirname(timm.data.__file__), "_info", "imagenet_synsets.txt")
    if os.path.isfile(timm_copy):  # timm's package data (a private layout): a cross-check where it is
        assert open(timm_copy).read().split() == list(IMAGENET_1K_WNIDS)


def test_all_1000_synsets_get_clips_curated_names(tmp_path):
    names = folder_class_names(list(IMAGENET_1K_WNIDS), str(tmp_path))
    assert names == list(IMAGENET_CLASSNAMES)
    by_id = dict(zip(IMAGENET_1K_WNIDS, names))
    assert (by_id["n01440764"], by_id["n02012849"], by_id["n03126707"]) == ("tench", "crane bird", "construction crane")


def _imagenet_style(root, wnids):
    for split in ("train", "val"):
        for w in wnids:
            d = root / split / w
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8), (len(w) * 7 % 255, 40, 90)).save(d / "a.png")


def test_a_100_class_subset_gets_clips_names_even_with_a_synset_file(tmp_path):
    wnids = list(IMAGENET_1K_WNIDS[::10])  # 100 of the 1,000 synsets, ImageNet-100 style
    _imagenet_style(tmp_path, wnids)
    # ImageNet's LOC_synset_mapping.txt: WordNet first lemmas ("crane" twice, "maillot" twice): must not win
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} lemma{i}, other words\n" for i, w in enumerate(IMAGENET_1K_WNIDS)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every folder is named: no warning
        train, val = folder_splits(str(tmp_path), 0.2, "skip")
    clip = dict(zip(IMAGENET_1K_WNIDS, IMAGENET_CLASSNAMES))
    assert train.class_names == [clip[w] for w in wnids] == val.class_names
    assert train.num_classes == 100 and len(train) == 100


def test_classes_json_wins_and_other_wordnet_ids_get_lemmas(tmp_path):
    folders = [IMAGENET_1K_WNIDS[0], "n00004475", "n09999999", "my_own_class"]  # IN-1K, IN-21K, listed only locally, plain
    (tmp_path / "classes.json").write_text(json.dumps({IMAGENET_1K_WNIDS[0]: "a tench fish"}))
    (tmp_path / "LOC_synset_mapping.txt").write_text("n09999999 made-up thing, other\n")
    assert folder_class_names(folders, str(tmp_path)) == ["a tench fish", "organism", "made-up thing", "my own class"]


def test_unnamed_wordnet_ids_warn_and_a_pretrained_clip_refuses_them(tmp_path):
    with pytest.warns(RuntimeWarning, match="WordNet ids with no known name"):
        names = folder_class_names(["n99999991", "n99999992"], str(tmp_path))
    assert names == ["n99999991", "n99999992"]
    check_prompt_names(names, None)  # a random-weight CLIP takes them
    with pytest.raises(HelloError, match="2 of 2 class names are raw WordNet ids") as e:
        check_prompt_names(names, "openai")
    assert "\n" not in str(e.value) and "classes.json" in str(e.value)
    backbone = load_clip("hello-tiny-rn")
    backbone.pretrained = "openai"  # stands in for the real weights: the check reads only the source
    with pytest.raises(HelloError, match="raw WordNet ids"):
        build_projector(backbone, names, ["a photo of a {}."], conv_rank=1, head_rank=1)
    backbone.pretrained = None
    assert build_projector(backbone, names, ["a photo of a {}."], conv_rank=1, head_rank=1).num_classes == 2
