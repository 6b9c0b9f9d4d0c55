"""Student and teacher networks: torchvision architectures by name, with small-image variants.

For inputs of 64 px or less the small-image variant keeps the spatial resolution that the
ImageNet stems throw away (stride-1 stems, no early max-pool, as in the CIFAR versions used by
the dataset-distillation literature); ResNet-18's variant also takes a base width.
"""
from __future__ import annotations

import typing

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from hello_fast import distributed
from hello_fast.config import StudentArch
from hello_fast.errors import HelloError

ARCHS = typing.get_args(StudentArch)  # declared once, with the config option that names them
SMALL_IMAGE_MAX = 64

# the students' (and weak teachers') input normalisation: torchvision's ImageNet statistics
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RDED's AdamW learning rate per student (LINs-lab/RDED argument.py, `--adamw-lr` by `--stud-name`): the student's
# rate when student.lr is not set. RDED's table has no ShuffleNetV2: 1e-3, its rate for the ResNets and ConvNets.
RDED_LR = {"resnet18": 1e-3, "mobilenet_v2": 2.5e-3, "efficientnet_b0": 2e-3, "vgg11": 5e-4, "swin_v2_t": 1e-4,
           "shufflenet_v2_x1_0": 1e-3}


def is_small(image_size: int) -> bool:
    return image_size <= SMALL_IMAGE_MAX


def _resnet18(num_classes: int, small: bool, width: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    if not small and width == 64:
        return model  # exactly torchvision's network (its checkpoints load as they are)
    w = width
    model.inplanes = w
    model.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False) if small else nn.Conv2d(3, w, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(w)
    if small:
        model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(BasicBlock, w, 2)
    model.layer2 = model._make_layer(BasicBlock, 2 * w, 2, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 4 * w, 2, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 8 * w, 2, stride=2)
    model.fc = nn.Linear(8 * w, num_classes)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _unstride(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def build_model(arch: str, num_classes: int, image_size: int, width: int | None = None) -> nn.Module:
    """A freshly initialised network `arch` for `num_classes` classes at `image_size` pixels."""
    if arch not in ARCHS:
        raise HelloError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if width is not None and arch != "resnet18":
        raise HelloError(f"a width is only supported for resnet18, not {arch}")
    small = is_small(image_size)
    if arch == "resnet18":
        return _resnet18(num_classes, small, width or 64)
    if arch == "swin_v2_t":
        if not small:
            return torchvision.models.swin_v2_t(num_classes=num_classes)

        return SwinTransformer(
            patch_size=[2, 2], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=[4, 4],
            stochastic_depth_prob=0.2, num_classes=num_classes, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
        )
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if not small:
        return model
    if arch == "mobilenet_v2" or arch == "efficientnet_b0":
        _unstride(model.features[0][0])
    elif arch == "shufflenet_v2_x1_0":
        _unstride(model.conv1[0])
        model.maxpool = nn.Identity()
    elif arch == "vgg11":
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
    return model


def learning_rate(arch: str, lr: float | None = None) -> float:
    """The student's AdamW learning rate: `lr` when given, else RDED's value for `arch` (RDED_LR)."""
    if lr is not None:
        return float(lr)
    if arch not in RDED_LR:
        raise HelloError(f"no learning rate in RDED's table for {arch!r}; set student.lr")
    return RDED_LR[arch]


def decay_groups(model: nn.Module, weight_decay: float, *, norms_and_biases: bool = True) -> list[dict]:
    """AdamW parameter groups. norms_and_biases=False is RDED's rule (validation/utils.py get_parameters): decay only on
    the parameters named `*weight*` with two or more dimensions (conv and linear weights); normalisation weights,
    biases and every other parameter (e.g. Swin's position-bias tables, logit scales) get none. True: one group,
    decay on everything (torch's default)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if norms_and_biases:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decayed = [p for n, p in params if "weight" in n and p.dim() > 1]
    kept = [p for n, p in params if not ("weight" in n and p.dim() > 1)]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]


@torch.no_grad()
def top1(model: nn.Module, batches, device, normalize) -> float:
    """Top-1 accuracy in percent over (uint8 images, labels) batches, summed over ranks when they are sharded."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels, _ in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        pred = model(normalize(images)).argmax(1)
        correct += int((pred == labels).sum())
        total += labels.numel()
    model.train(was_training)
    correct, total = distributed.sum_over_ranks([correct, total], device)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def mean_teacher_logits(teachers, x: torch.Tensor) -> torch.Tensor:
    """The weak teachers' averaged logits (Eq. 5's Y')."""
    out = teachers[0](x).float()
    for t in teachers[1:]:
        out += t(x).float()
    return out / len(teachers)
