"""The image-to-label projector: an image tower + a cosine head, both carrying LoRA (HeLlO Eq. 3-5).

f(x) = logit_scale * normalize(E_I(x) - m) @ (W + s_h B_h A_h)^T, with E_I the image tower whose convs
(and optionally linears) carry LoRA. On CLIP (HeLlO's choice) E_I is CLIP's image tower, W the
normalised text embeddings of the class prompts, m = 0 and logit_scale CLIP's own temperature,
so an untrained projector is exactly CLIP's zero-shot classifier. On an image classifier
(EfficientNet-Lite0, any timm/torchvision model) E_I gives its pooled features; with prototypes,
m is the training images' mean feature and W the normalised centred class means (a nearest-class-
mean classifier), else m = 0 and W a seeded random head; the temperature is CLIP's (100). Only
the LoRA tensors (and a prototype head: W and m) are trained or stored.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from hello_fast.data.class_names import check_prompt_names
from hello_fast.errors import HelloError
from hello_fast.projector.head import text_head_weight
from hello_fast.projector.lora import LoRALinear, inject_lora, lora_layers


class Projector(nn.Module):
    def __init__(self, visual: nn.Module, head_weight: torch.Tensor, logit_scale: float, *, conv_rank: int,
                 head_rank: int, linear_rank: int = 0, alpha: float | None = None, mean=None, std=None, image_size=None,
                 feature_center: torch.Tensor | None = None):
        super().__init__()
        self.visual = visual
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.tower_layers = inject_lora(self.visual, conv_rank, linear_rank, alpha)
        self.head = LoRALinear(head_weight.float(), None, head_rank, alpha)
        self.logit_scale = float(logit_scale)
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1), persistent=False)
        self.image_size = image_size
        # subtracted from the tower's features before they are normalised (prototype heads); None: no centring
        self.register_buffer("feature_center", None if feature_center is None else feature_center.detach().float().clone())
        self.visual.eval()

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def train(self, mode: bool = True):
        # the frozen tower stays in eval mode: its BatchNorm statistics are part of the public weights
        super().train(mode)
        self.visual.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of images `x` normalised with the tower's statistics at its resolution."""
        features = self.visual(x).float()
        if self.feature_center is not None:
            features = features - self.feature_center
        features = F.normalize(features, dim=-1)
        return self.logit_scale * self.head(features)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float normalised for the tower, resized to its resolution if needed."""
        return normalize_images(images_uint8, self.mean, self.std, self.image_size)

    def lora_parameters(self):
        return [p for _, m in self.lora_modules() for p in (m.lora_a, m.lora_b)]

    def lora_modules(self):
        """(artifact name, LoRA layer): tower layers as `visual.<path>`, the head as `head`."""
        return [(f"visual.{n}", m) for n, m in lora_layers(self.visual)] + [("head", self.head)]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.lora_modules():
            out[f"{name}.lora_a"] = m.lora_a.detach().float().cpu().contiguous()
            out[f"{name}.lora_b"] = m.lora_b.detach().float().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load LoRA tensors; names and shapes must match this projector exactly."""
        expected = {}
        for name, m in self.lora_modules():
            expected[f"{name}.lora_a"] = m.lora_a
            expected[f"{name}.lora_b"] = m.lora_b
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"LoRA tensors do not fit this projector: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        for key, param in expected.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"LoRA tensor {key} has shape {tuple(t.shape)}, the projector needs {tuple(param.shape)}")
            param.copy_(t.to(param.dtype))

    def merge(self) -> None:
        """Fold every LoRA update into its base weight (for inference); unmerge() undoes it."""
        for _, m in self.lora_modules():
            m.merge()

    def unmerge(self) -> None:
        for _, m in self.lora_modules():
            m.unmerge()


def normalize_images(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (x / 255 - mean) / std, resized (antialiased bilinear) to size x size when it differs."""
    x = images_uint8.float() / 255.0
    if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std


def projector_image_size(backbone, image_size: int | None) -> int:
    """The resolution the tower sees: `image_size` (projector.image_size) or the backbone's own.

    CLIP's towers take only their own resolution (their attention pool / position embeddings are
    fixed); an image classifier's pooled features take any size.
    """
    if image_size is None or image_size == backbone.image_size:
        return backbone.image_size
    if backbone.has_text_tower:
        raise HelloError(f"projector.image_size {image_size}: CLIP {backbone.name}'s tower takes only its own "
                         f"resolution ({backbone.image_size} px); leave it unset")
    return int(image_size)


def build_projector(backbone, class_names: list[str], templates: list[str], *, conv_rank: int, head_rank: int,
                    linear_rank: int = 0, alpha: float | None = None, device="cpu", head_weight: torch.Tensor | None = None,
                    image_size: int | None = None, feature_center: torch.Tensor | None = None) -> Projector:
    """A fresh projector on `backbone` (a ClipBackbone or a ClassifierBackbone).

    `head_weight`: the head's base weight (C, d) (prototypes, a random head); None: CLIP's zero-shot
    classifier from the text tower (a backbone without one refuses). `feature_center` (d,): subtracted
    from the features before they are normalised (the prototypes' mean feature). `image_size`: the resolution
    the tower sees (None: the backbone's own). The backbone's image tower is copied, so the backbone
    itself stays untouched. A pretrained CLIP refuses raw WordNet ids as class names (its head
    would embed the id strings).
    """
    size = projector_image_size(backbone, image_size)
    if head_weight is None:
        if not backbone.has_text_tower:
            raise HelloError(f"projector.head_init text needs a text tower and {backbone.name} has none: "
                             "use head_init prototypes or random")
        check_prompt_names(class_names, backbone.pretrained)
        head_weight = text_head_weight(backbone, class_names, templates, device=device)
    visual = copy.deepcopy(backbone.visual)
    return Projector(
        visual, head_weight, backbone.logit_scale, conv_rank=conv_rank, head_rank=head_rank, linear_rank=linear_rank,
        alpha=alpha, mean=backbone.mean, std=backbone.std, image_size=size, feature_center=feature_center,
    ).to(device)
