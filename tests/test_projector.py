"""LoRA layers and the projector: exact merges, CLIP's zero-shot classifier at init, the paper's parameter count."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hello_fast.models.clip import load_clip, template_strings
from hello_fast.projector.lora import LoRAConv2d, LoRALinear, inject_lora
from hello_fast.projector.model import build_projector


def _randomise(layer, g):
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 0)])
def test_lora_conv_merge_is_exact(kernel, stride, padding, rng):
    base = nn.Conv2d(6, 9, kernel, stride=stride, padding=padding, bias=False)
    layer = LoRAConv2d(base, rank=3, alpha=6.0)
    _randomise(layer, rng)
    x = torch.randn(2, 6, 13, 11, generator=rng)
    y = layer(x)
    dense = F.conv2d(x, base.weight + layer.delta_weight(), None, stride, padding)
    assert torch.allclose(y, dense, atol=1e-5)
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_lora_starts_as_the_base_and_trains_only_adapters(rng):
    base = nn.Linear(7, 5)
    layer = LoRALinear.wrap(base, rank=2)
    x = torch.randn(3, 7, generator=rng)
    assert torch.allclose(layer(x), base(x), atol=1e-6)  # B = 0 at init
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    _randomise(layer, rng)
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)  # effective weight
    y = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_inject_lora_wraps_every_conv_of_rn50_with_the_papers_parameter_count():
    model = load_clip("RN50").model.visual
    names = inject_lora(model, conv_rank=8, linear_rank=0)
    assert len(names) == 55  # 3 stem + 48 bottleneck + 4 downsample convs
    tower = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = 128 * 1024 + 1000 * 128
    assert tower + head == 898_776  # ~0.9 M (the paper: 0.8 M)


@pytest.fixture(scope="module")
def tiny():
    return load_clip("hello-tiny-rn")


def test_random_backbone_is_seeded_and_its_features_separate_images(tiny):
    again = load_clip("hello-tiny-rn")
    other = load_clip("hello-tiny-rn", init_seed=1)
    assert tiny.weights_sha256 == again.weights_sha256 != other.weights_sha256
    x = torch.randn(16, 3, 32, 32)
    f = F.normalize(tiny.model.encode_image(x), dim=-1)
    off_diagonal = (f @ f.T)[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.mean() < 0.98  # open_clip's bare init gives ~0.99999: every image the same


def test_untrained_projector_is_clips_zero_shot_classifier(tiny):
    names = ["zero", "one", "two"]
    templates = template_strings("digits")
    proj = build_projector(tiny, names, templates, conv_rank=4, head_rank=3)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        image = F.normalize(tiny.model.encode_image(x), dim=-1)
        tok = tiny.tokenizer()([templates[0].format(n) for n in names])
        text = F.normalize(tiny.model.encode_text(tok), dim=-1)
        zero_shot = tiny.logit_scale * image @ text.T
        assert torch.allclose(proj(x), zero_shot, atol=1e-4)  # Prop. 1


def test_projector_keeps_backbone_frozen_and_bn_in_eval(tiny):
    proj = build_projector(tiny, ["a", "b"], ["{}"], conv_rank=2, head_rank=2)
    before = copy.deepcopy({k: v for k, v in proj.visual.state_dict().items() if "lora_" not in k})
    proj.train()
    assert not proj.visual.training
    opt = torch.optim.SGD(proj.lora_parameters(), lr=0.5)
    for _ in range(2):
        loss = proj(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: v for k, v in proj.visual.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert not any(p.requires_grad for n, p in proj.named_parameters() if "lora_" not in n)
    assert proj.lora_state_dict()["head.lora_b"].abs().sum() > 0  # the adapters did move


def test_merged_projector_equals_unmerged(tiny, rng):
    proj = build_projector(tiny, ["a", "b", "c"], ["{}"], conv_rank=3, head_rank=2, linear_rank=2)
    for _, m in proj.lora_modules():
        _randomise(m, rng)
    x = torch.randn(4, 3, 32, 32, generator=rng)
    with torch.no_grad():
        y = proj(x)
        proj.merge()
        assert torch.allclose(proj(x), y, atol=1e-4, rtol=1e-4)
        proj.unmerge()
        assert torch.allclose(proj(x), y, atol=1e-4, rtol=1e-4)
