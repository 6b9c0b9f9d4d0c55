"""The projector's backbone as a config names it: CLIP through open_clip (the clip section) or an image classifier (projector.backbone)."""
from __future__ import annotations

from hello_fast.models.classifier import load_classifier
from hello_fast.models.clip import load_clip


def configured_image_size(cfg, backbone) -> int | None:
    """projector.image_size where the backbone can take it (a classifier); None (its own) for CLIP."""
    return None if backbone.has_text_tower else cfg.projector.image_size


def load_backbone(cfg, device="cpu"):
    """A ClipBackbone (projector.backbone clip) or a ClassifierBackbone, loaded offline as the config says."""
    pc = cfg.projector
    if pc.backbone == "clip":
        c = cfg.clip
        return load_clip(c.model, c.pretrained, c.init_seed, device=device, activation=c.activation)
    return load_classifier(pc.backbone, pc.pretrained, device=device)
