"""Refinement (Eq. 7) within bounds: a PSNR floor whatever the step, and the selected image kept when refining hurts the projector."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hello_fast.config import RefineConfig, load_config
from hello_fast.errors import HelloError
from hello_fast.models.clip import load_clip
from hello_fast.projector.model import build_projector
from hello_fast.stages.refine import projector_ce, psnr, psnr_floor, refine_batch


@pytest.fixture(scope="module")
def projector():
    backbone = load_clip("hello-tiny-rn")
    proj = build_projector(backbone, ["zero", "one", "two"], ["a photo of a {}."], conv_rank=2, head_rank=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in proj.lora_modules():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)
    return proj.eval()


def _images(rng, n=4, size=32):
    return (torch.rand(n, 3, size, size, generator=rng) * 255).round().to(torch.uint8)


def test_box_bound_keeps_psnr_above_its_floor_however_hard_the_step(projector, rng):
    images, labels = _images(rng, n=2), torch.tensor([0, 2])
    strong = dict(steps=3, lr=0.5, downsample=2, fidelity=0.0, keep_better=False)  # far beyond any sane step
    out, stats = refine_batch(projector, images, labels, RefineConfig(max_delta=8.0, **strong))
    assert int((out.int() - images.int()).abs().max()) <= 8
    assert float(stats["psnr"].min()) >= psnr_floor(8.0) - 1e-4 and psnr_floor(8.0) == pytest.approx(30.069, abs=1e-3)
    assert stats["loss_last"] < stats["loss_first"]  # Eq. 7 still descends inside the box
    loose, loose_stats = refine_batch(projector, images, labels, RefineConfig(max_delta=255.0, **strong))
    assert float(loose_stats["psnr"].mean()) < float(stats["psnr"].mean()) - 3  # without the box the images drift far


def test_fidelity_term_pulls_towards_the_selected_images(projector, rng):
    images, labels = _images(rng, n=2), torch.tensor([1, 2])
    base = dict(steps=3, lr=0.05, downsample=2, max_delta=32.0, keep_better=False)
    free = refine_batch(projector, images, labels, RefineConfig(fidelity=0.0, **base))[1]["psnr"].mean()
    held = refine_batch(projector, images, labels, RefineConfig(fidelity=20.0, **base))[1]["psnr"].mean()
    assert held > free


class _Probe(nn.Module):
    """A stand-in projector whose cross-entropy is lowest exactly on the selected images: any refinement makes it worse."""

    def __init__(self, selected_uint8, rng):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        with torch.no_grad():
            for p in self.visual.parameters():
                p.copy_(torch.randn(p.shape, generator=rng))
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.image_size = None
        self.selected = selected_uint8.float() / 255

    def normalize(self, images_uint8):
        return images_uint8.float() / 255

    def forward(self, x):
        far = (x - self.selected).pow(2).flatten(1).mean(1) * 1e3
        return torch.stack([-far, torch.zeros_like(far)], 1)  # class 0 is every image's class


def test_refined_images_that_raise_the_projectors_loss_are_not_kept(rng):
    images = _images(rng)
    labels = torch.zeros(4, dtype=torch.long)
    probe = _Probe(images, rng)
    cfg = dict(steps=5, lr=0.05, downsample=2, max_delta=8.0, fidelity=0.0)
    moved, stats = refine_batch(probe, images, labels, RefineConfig(keep_better=False, **cfg))
    assert not torch.equal(moved, images) and bool((stats["ce_after"] > stats["ce_before"]).all())
    kept, stats = refine_batch(probe, images, labels, RefineConfig(keep_better=True, **cfg))
    assert torch.equal(kept, images) and int(stats["kept"].sum()) == 0  # every selected image kept
    assert torch.equal(stats["psnr"], psnr(images, images))


def test_keep_better_never_raises_the_real_projectors_loss(projector, rng):
    images, labels = _images(rng, n=3), torch.arange(3)
    out, stats = refine_batch(projector, images, labels, RefineConfig(steps=2, lr=0.1, max_delta=16.0, keep_better=True))
    before, after = projector_ce(projector, images, labels), projector_ce(projector, out, labels)
    assert bool((after <= before + 1e-5).all())
    assert torch.allclose(after, stats["ce_after"], atol=1e-5)


@pytest.mark.parametrize("override, words", [
    ("refine.max_delta=0", "refine.max_delta must be"),
    ("refine.max_delta=300", "refine.max_delta must be"),
    ("refine.fidelity=-1", "refine.fidelity must be >= 0"),
])
def test_bad_bounds_are_named(override, words):
    with pytest.raises(HelloError) as e:
        load_config("digits", [override])
    assert words in str(e.value)


def test_psnr_of_identical_and_shifted_images():
    a = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[1] += 8  # every pixel 8 grey levels off: exactly the box's floor
    p = psnr(b, a)
    assert p[0] == 100.0 and float(p[1]) == pytest.approx(psnr_floor(8.0), abs=1e-4)
    assert F.mse_loss(a.float(), a.float()) == 0
