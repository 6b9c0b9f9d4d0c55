"""Human class names for CLIP's text prompts: ImageNet WordNet ids mapped to CLIP's curated names, for any subset.

CLIP's zero-shot head embeds the class names, so a raw WordNet id ("n01440764") as a name makes a
useless head row. Class folders are named in this order:
1. `classes.json` in the data root ({"folder": "name"}): the user's explicit names always win;
2. a WordNet id of ImageNet-1K: CLIP's curated ImageNet name (OpenAI's list, as open_clip ships it in
   `IMAGENET_CLASSNAMES`, in sorted-wnid order), for all 1,000 synsets or any subset (ImageNet-100, ...);
   a `LOC_synset_mapping.txt` never overrides these (its WordNet first lemmas give e.g. "crane" to
   both the bird and the machine, and "maillot" to two classes);
3. any other WordNet id: the first lemma in `LOC_synset_mapping.txt` / `synset_words.txt` in the data
   root, else in timm's WordNet tables of ImageNet-21K (timm comes with open_clip);
4. any other folder: its name with underscores as spaces.
A WordNet id with no name stays the id, with a warning; a pretrained CLIP refuses such names
(`check_prompt_names`); a randomly initialised one (tests, the digits default) takes them.

The sorted list of the 1,000 ImageNet-1K synsets comes from timm's public `ImageNetInfo` (timm comes
with open_clip).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from functools import lru_cache

from hello_fast.errors import HelloError

_WNID = re.compile(r"n\d{8}")
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


def is_wnid(name: str) -> bool:
    """True for a WordNet noun id as ImageNet names its class folders (n + 8 digits)."""
    return bool(_WNID.fullmatch(name))


@lru_cache(maxsize=1)
def imagenet_1k_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1K (ILSVRC-2012) synsets in sorted order: the class order of every ImageNet-1K
    classifier and of CLIP's curated name list."""
    from timm.data import ImageNetInfo  # timm is a dependency of open_clip; heavy to import

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@lru_cache(maxsize=1)
def imagenet_clip_names() -> dict[str, str]:
    """wnid -> CLIP's curated name, for the 1,000 ImageNet-1K synsets."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = imagenet_1k_wnids()
    if len(IMAGENET_CLASSNAMES) != len(wnids):
        raise HelloError(f"open_clip lists {len(IMAGENET_CLASSNAMES)} ImageNet class names, expected {len(wnids)}")
    return dict(zip(wnids, IMAGENET_CLASSNAMES))


@lru_cache(maxsize=1)
def _wordnet_lemmas():
    """timm's ImageNet-21K WordNet tables: a function wnid -> 'lemma, lemma, ...' (or None)."""
    from timm.data import ImageNetInfo  # timm is a dependency of open_clip; heavy to import

    info = ImageNetInfo("imagenet-22k")

    def lemma(wnid: str) -> str | None:
        try:
            return info.label_name_to_description(wnid)
        except KeyError:
            return None

    return lemma


def _read_json_names(root: str) -> dict[str, str]:
    path = os.path.join(root, "classes.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise HelloError(f"{path}: not a readable JSON mapping of class folder to name ({e})") from None
    if not isinstance(data, dict):
        raise HelloError(f"{path}: expected a JSON object mapping class folder to name")
    return {str(k): str(v) for k, v in data.items()}


def _read_synset_file(root: str) -> dict[str, str]:
    """wnid -> first lemma from an ImageNet synset mapping file in `root` ('n01440764 tench, Tinca tinca')."""
    for fname in NAME_FILES:
        path = os.path.join(root, fname)
        if os.path.isfile(path):
            out = {}
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.strip().split(None, 1)
                    if len(parts) == 2:
                        out[parts[0]] = parts[1].split(",")[0].strip()
            return out
    return {}


def folder_class_names(folders: list[str], root: str) -> list[str]:
    """Human names for class folders under `root`, by the rules in this module's docstring."""
    explicit = _read_json_names(root)
    clip = imagenet_clip_names()
    synsets = None
    names, unnamed = [], []
    for folder in folders:
        if folder in explicit:
            names.append(explicit[folder])
        elif folder in clip:
            names.append(clip[folder])
        elif is_wnid(folder):
            if synsets is None:
                synsets = _read_synset_file(root)
            name = synsets.get(folder)
            if name is None:
                found = _wordnet_lemmas()(folder)
                name = found.split(",")[0].strip() if found else None
            if name is None:
                unnamed.append(folder)
                name = folder
            names.append(name)
        else:
            names.append(folder.replace("_", " "))
    if unnamed:
        warnings.warn(
            f"{len(unnamed)} class folders are WordNet ids with no known name ({unnamed[0]}, ...); CLIP's text head "
            f"would read the ids. Add classes.json ({{\"folder\": \"name\"}}) to the data root or set clip.class_names.",
            RuntimeWarning, stacklevel=2,
        )
    return names


def check_prompt_names(class_names: list[str], backbone_source: str | None) -> None:
    """Refuse raw WordNet ids as the class names of a pretrained CLIP's zero-shot head (HelloError)."""
    if backbone_source is None:
        return  # a random-weight CLIP (tests, the digits default): the names carry no meaning anyway
    ids = [n for n in class_names if is_wnid(n.strip())]
    if ids:
        raise HelloError(
            f"{len(ids)} of {len(class_names)} class names are raw WordNet ids ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}): "
            f"pretrained CLIP ({backbone_source}) would embed the id strings as its head. Name them in classes.json in the "
            f"data root ({{\"{ids[0]}\": \"name\"}}) or set clip.class_names"
        )
