"""The image-to-label projector: CLIP image tower + text-embedding head, both carrying LoRA (HeLlO Eq. 3-5).

f(x) = logit_scale * normalize(E_I(x)) @ (W + s_h B_h A_h)^T, with E_I the CLIP image tower whose
convs (and optionally linears) carry LoRA, W the normalised text embeddings of the class prompts
and logit_scale CLIP's own temperature, so an untrained projector is exactly CLIP's zero-shot
classifier. Only the LoRA tensors are trained and stored.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from hello_fast.data.class_names import check_prompt_names
from hello_fast.projector.head import text_head_weight
from hello_fast.projector.lora import LoRALinear, inject_lora, lora_layers


class Projector(nn.Module):
    def __init__(self, visual: nn.Module, head_weight: torch.Tensor, logit_scale: float, *, conv_rank: int,
                 head_rank: int, linear_rank: int = 0, alpha: float | None = None, mean=None, std=None, image_size=None):
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
        """Logits (B, C) of images `x` normalised with CLIP's statistics at its resolution."""
        features = F.normalize(self.visual(x).float(), dim=-1)
        return self.logit_scale * self.head(features)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> CLIP-normalised float, resized to the tower's resolution if needed."""
        x = images_uint8.float() / 255.0
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

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


def build_projector(backbone, class_names: list[str], templates: list[str], *, conv_rank: int, head_rank: int,
                    linear_rank: int = 0, alpha: float | None = None, device="cpu", head_weight: torch.Tensor | None = None) -> Projector:
    """A fresh projector on `backbone` (a ClipBackbone) whose head is CLIP's zero-shot classifier.

    The backbone's image tower is copied, so the backbone itself stays untouched. A pretrained
    backbone refuses raw WordNet ids as class names (its head would embed the id strings).
    """
    if head_weight is None:
        check_prompt_names(class_names, backbone.pretrained)
        head_weight = text_head_weight(backbone, class_names, templates, device=device)
    visual = copy.deepcopy(backbone.model.visual)
    return Projector(
        visual, head_weight, backbone.logit_scale, conv_rank=conv_rank, head_rank=head_rank, linear_rank=linear_rank,
        alpha=alpha, mean=backbone.mean, std=backbone.std, image_size=backbone.image_size,
    ).to(device)
