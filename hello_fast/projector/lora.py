"""LoRA adapters for the projector (HeLlO Eq. 4): frozen base weight plus scale * B @ A, on convs and linears.

The peft convention: A (r, in) is initialised like a linear layer's weight, B (out, r) at zero, so
an untrained adapter leaves the backbone exactly as it was; scale = alpha / r (1 when alpha is None).
A conv's A is itself a conv with the base's kernel, stride and padding (r x in x kh x kw) and its B
a 1x1 conv, so B(A(x)) is the conv with weight B @ A and merges into the base weight exactly.
A conv class with its own forward (timm's TF-"same" `Conv2dSame` pads by the input's size) runs
A through that forward too, so both branches pad alike and the merge stays exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from hello_fast.ops.lora_linear import lora_linear


def _scale(rank: int, alpha: float | None) -> float:
    return 1.0 if alpha is None else float(alpha) / rank


class LoRAConv2d(nn.Module):
    """A frozen nn.Conv2d plus a rank-r update: y = conv(x, W) + scale * conv1x1(conv(x, A), B)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None):
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRAConv2d supports ungrouped convolutions only")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        kh, kw = base.kernel_size
        self.rank = rank
        self.scale = _scale(rank, alpha)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_channels, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.merged = False
        self._own_forward = type(base).forward is not nn.Conv2d.forward  # pads (or more) in its own forward

    def delta_weight(self) -> torch.Tensor:
        r = self.rank
        return self.scale * (self.lora_b @ self.lora_a.reshape(r, -1)).reshape(self.base.weight.shape)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        b = self.base
        a = self.lora_a.to(x.dtype)
        if self._own_forward:  # the base's forward with A as its weight (and no bias)
            h = functional_call(b, {"weight": a, **({"bias": None} if b.bias is not None else {})}, (x,))
        else:
            h = F.conv2d(x, a, None, b.stride, b.padding, b.dilation)
        return y + self.scale * F.conv2d(h, self.lora_b.to(x.dtype)[:, :, None, None])

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class LoRALinear(nn.Module):
    """A frozen linear map plus a rank-r update: y = x W^T + b + scale * (x A^T) B^T.

    `weight` is the effective weight (W + scale * B A), for modules that read a linear layer's
    weight directly (open_clip's attention pool passes q/k/v weights to multi_head_attention_forward).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, alpha: float | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.register_buffer("base_weight", weight.detach().clone())
        self.register_buffer("base_bias", None if bias is None else bias.detach().clone())
        self.rank = rank
        self.scale = _scale(rank, alpha)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.merged = False

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float | None = None) -> "LoRALinear":
        return cls(linear.weight, linear.bias, rank, alpha)

    @property
    def in_features(self) -> int:
        return self.base_weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.base_weight.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_weight if self.merged else self.base_weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_bias

    def forward(self, x):
        bias = None if self.base_bias is None else self.base_bias.to(x.dtype)
        if self.merged:
            return F.linear(x, self.base_weight.to(x.dtype), bias)

        # one fused op (Triton on GPUs): the LoRA term joins the base GEMM, x A^T stays fp32
        return lora_linear(x, self.base_weight.to(x.dtype), self.lora_a, self.lora_b, self.scale, bias)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_weight += self.delta_weight().to(self.base_weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_weight -= self.delta_weight().to(self.base_weight.dtype)
            self.merged = False


def inject_lora(module: nn.Module, conv_rank: int, linear_rank: int, alpha: float | None = None) -> list[str]:
    """Replace every ungrouped Conv2d (conv_rank > 0) and Linear (linear_rank > 0) below `module` by its LoRA version.

    Returns the dotted names of the wrapped layers, in module order.
    """
    wrapped = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Conv2d) and conv_rank > 0 and sub.groups == 1:
                setattr(child, attr, LoRAConv2d(sub, conv_rank, alpha))
                wrapped.append(full)
            elif type(sub) is nn.Linear and linear_rank > 0:
                setattr(child, attr, LoRALinear.wrap(sub, linear_rank, alpha))
                wrapped.append(full)
    return wrapped


def lora_layers(module: nn.Module):
    """(name, layer) for every LoRA layer below `module`."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (LoRAConv2d, LoRALinear))]
