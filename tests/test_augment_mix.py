"""augment_mix (reference semantics) and sample_augment_params: the student loop's augmentation contract."""
import pytest
import torch
import torch.nn.functional as F

from hello_fast.ops import augment_mix, sample_augment_params

VIEW = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), torch.float32)  # identity normalisation: pixels 0-255


def _batch(B, S=5, H=19, W=23, g=None, out=11):
    g = g or torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (S, 3, H, W), dtype=torch.uint8, generator=g)
    index = torch.randint(0, S, (B,), generator=g)
    p = sample_augment_params(index, H, W, out_size=out, mode="cutmix", generator=g)
    return src, index, p


def _manual_base(src, index, crop, flip, out):
    imgs = []
    for b in range(len(index)):
        t, l, h, w = crop[b].tolist()
        x = F.interpolate(src[index[b], :, t:t + h, l:l + w].float()[None], size=(out, out), mode="bilinear", align_corners=False)[0]
        imgs.append(x.flip(-1) if flip[b] else x)
    return torch.stack(imgs)


def test_full_crop_at_native_size_is_the_image():
    src, index, p = _batch(4, H=16, W=16, out=16)
    crop = torch.tensor([[0, 0, 16, 16]] * 4)
    (x,), lam = augment_mix(src, index, crop, torch.zeros(4, dtype=torch.bool), p["partner"], p["lam"], p["cut"],
                             mode="none", out_size=16, views=[VIEW])
    assert torch.allclose(x, src[index].float(), atol=1e-3)
    assert torch.equal(lam, torch.ones(4))


@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
def test_modes_follow_the_contract(mode, rng):
    src, index, p = _batch(7, g=rng, out=13)
    if mode == "mixup":
        p["lam"] = torch.rand(7, generator=rng)
    (x,), lam = augment_mix(src, index, **p, mode=mode, out_size=13, views=[VIEW])
    base = _manual_base(src, index, p["crop"], p["flip"], 13)
    if mode == "none":
        want = base
        assert torch.equal(lam, torch.ones(7))
    elif mode == "mixup":
        l = p["lam"][:, None, None, None]
        want = l * base + (1 - l) * base[p["partner"]]
        assert torch.equal(lam, p["lam"])
    else:
        want = base.clone()
        for b, (t, l0, bt, r) in enumerate(p["cut"].tolist()):
            want[b, :, t:bt, l0:r] = base[p["partner"][b], :, t:bt, l0:r]
            assert abs(lam[b].item() - (1 - (bt - t) * (r - l0) / 169)) < 1e-6
    assert torch.allclose(x, want, atol=1e-3)


def test_two_views_with_their_own_normalisation_and_dtype():
    src, index, p = _batch(3)
    v1 = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32)
    v2 = ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28), torch.bfloat16)
    (a, b), _ = augment_mix(src, index, **p, mode="cutmix", out_size=11, views=[v1, VIEW, v2][::2])
    (raw,), _ = augment_mix(src, index, **p, mode="cutmix", out_size=11, views=[VIEW])
    m = torch.tensor(v1[0]).view(1, 3, 1, 1)
    s = torch.tensor(v1[1]).view(1, 3, 1, 1)
    assert torch.allclose(a, (raw / 255 - m) / s, atol=1e-4)
    assert b.dtype == torch.bfloat16 and b.shape == (3, 3, 11, 11)


def test_partner_self_and_one_pixel_crops():
    src, index, p = _batch(3)
    crop = torch.tensor([[0, 0, 1, 1], [18, 22, 1, 1], [5, 5, 1, 1]])
    partner = torch.arange(3)
    (x,), lam = augment_mix(src, index, crop, p["flip"], partner, p["lam"], p["cut"], mode="cutmix", out_size=11, views=[VIEW])
    for b, (t, l, _, _) in enumerate(crop.tolist()):
        assert torch.allclose(x[b], src[index[b], :, t, l].float()[:, None, None].expand(3, 11, 11), atol=1e-3)


@pytest.mark.parametrize("field, value, error", [
    ("index", torch.tensor([0, 1, 9]), IndexError),
    ("crop", torch.tensor([[0, 0, 20, 5]] * 3), IndexError),
    ("crop", torch.tensor([[-1, 0, 2, 2]] * 3), IndexError),
    ("crop", torch.tensor([[0, 0, 0, 2]] * 3), IndexError),
    ("partner", torch.tensor([0, 1, 3]), IndexError),
    ("cut", torch.tensor([[0, 0, 12, 3]] * 3), IndexError),
    ("cut", torch.tensor([[5, 0, 2, 3]] * 3), IndexError),
    ("lam", torch.rand(2), ValueError),
    ("flip", torch.zeros(3), ValueError),
])
def test_out_of_range_parameters_are_rejected(field, value, error):
    src, index, p = _batch(3, S=5, H=19, W=23, out=11)
    args = dict(index=index, **p)
    args[field] = value
    with pytest.raises(error):
        augment_mix(src, **args, mode="cutmix", out_size=11, views=[VIEW])


def test_bad_mode_views_and_sources():
    src, index, p = _batch(2)
    with pytest.raises(ValueError, match="mode"):
        augment_mix(src, index, **p, mode="mosaic", out_size=11, views=[VIEW])
    with pytest.raises(ValueError, match="std"):
        augment_mix(src, index, **p, mode="none", out_size=11, views=[((0, 0, 0), (1, 0, 1), torch.float32)])
    with pytest.raises(ValueError, match="uint8"):
        augment_mix(src.float(), index, **p, mode="none", out_size=11, views=[VIEW])


def test_sampled_parameters_obey_their_rules():
    g = torch.Generator().manual_seed(1)
    H, W, out = 30, 50, 24
    index = torch.zeros(4000, dtype=torch.long)
    p = sample_augment_params(index, H, W, out_size=out, scale=(0.25, 0.75), mode="cutmix", per_sample=True, generator=g)
    top, left, h, w = p["crop"].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    area = (h * w).float() / (H * W)
    assert area.min() > 0.2 and area.max() < 0.8  # scale (0.25, 0.75) up to rounding
    assert 0.45 < p["flip"].float().mean() < 0.55
    assert sorted(p["partner"].tolist()) == list(range(4000))
    t0, l0, b1, r1 = p["cut"].unbind(1)
    assert (t0 >= 0).all() and (b1 <= out).all() and (t0 <= b1).all() and (l0 <= r1).all()
    assert 0.45 < p["lam"].mean() < 0.55  # Beta(1, 1)
    batch = sample_augment_params(index[:8], H, W, out_size=out, mode="cutmix", generator=g)
    assert len(set(batch["lam"].tolist())) == 1 and len({tuple(c) for c in batch["cut"].tolist()}) == 1  # one box per batch
    none = sample_augment_params(index[:8], H, W, out_size=out, mode="none", generator=g)
    assert torch.equal(none["lam"], torch.ones(8))
