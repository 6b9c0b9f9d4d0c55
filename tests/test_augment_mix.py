"""augment_mix (reference semantics) and sample_augment_params: the student loop's augmentation contract."""
import pytest
import torch
import torch.nn.functional as F

from hello_fast.ops import augment_mix, sample_augment_params
from hello_fast.ops.augment_mix import shuffle_patches, strip_source_index

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


# ---------------------------------------------------------------------------------------------------------------
# ShufflePatches (RDED): the reference against an explicit implementation of RDED's rule


def _rded_shuffle(img, rows, cols):
    """RDED's ShufflePatches written out as its code does it (validation/utils.py): cut the last axis into strips of
    size // factor, concatenate them in a shuffled order, then the same for the rows; here the last strip keeps the
    remainder (RDED's code drops it: the two agree when the factor divides the side)."""
    def shuffle_last_axis(x, order):
        n, f = x.shape[-1], len(order)
        t = n // f
        strips = [x[..., j * t:(j + 1) * t] if j < f - 1 else x[..., j * t:] for j in range(f)]
        return torch.cat([strips[j] for j in order], -1)

    img = shuffle_last_axis(img, cols)
    return shuffle_last_axis(img.transpose(-1, -2), rows).transpose(-1, -2)


@pytest.mark.parametrize("H, W, factor", [(16, 16, 2), (19, 23, 2), (20, 31, 3), (9, 14, 4), (12, 12, 1), (7, 5, 5)])
def test_shuffled_reference_is_a_crop_of_rdeds_shuffled_image(H, W, factor, rng):
    src, index, p = _batch(6, H=H, W=W, g=rng, out=13)
    p["shuffle"] = torch.rand(6, 2, factor, generator=rng).argsort(-1)
    (x,), _ = augment_mix(src, index, **p, mode="none", out_size=13, views=[VIEW], backend="torch")
    shuffled = torch.stack([_rded_shuffle(src[index[b]], p["shuffle"][b, 0].tolist(), p["shuffle"][b, 1].tolist())
                            for b in range(6)])
    assert torch.equal(shuffle_patches(src[index], p["shuffle"]), shuffled)
    assert torch.allclose(x, _manual_base(shuffled, torch.arange(6), p["crop"], p["flip"], 13), atol=1e-3)


def test_rded_rule_on_a_labelled_image():
    """Every pixel is its own coordinate: the shuffled image says where each came from."""
    H, W = 7, 10
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.stack([ys, xs, ys * 0]).to(torch.uint8)[None]
    out = shuffle_patches(img, torch.tensor([[[1, 2, 0], [2, 0, 1]]]))[0]
    # rows: strips [0,1], [2,3], [4,5,6] (the last takes the remainder) in the order 1, 2, 0
    assert out[0, :, 0].tolist() == [2, 3, 4, 5, 6, 0, 1]
    # columns: [0,1,2], [3,4,5], [6,7,8,9] in the order 2, 0, 1
    assert out[1, 0].tolist() == [6, 7, 8, 9, 0, 1, 2, 3, 4, 5]
    assert torch.equal(strip_source_index(torch.tensor([2, 0, 1]), 10), out[1, 0].long())


def test_identity_orders_change_nothing(rng):
    src, index, p = _batch(4, g=rng)
    (plain,), _ = augment_mix(src, index, **p, mode="cutmix", out_size=11, views=[VIEW])
    for factor in (1, 3):
        ident = torch.arange(factor).expand(4, 2, factor).contiguous()
        (same,), _ = augment_mix(src, index, **p, mode="cutmix", out_size=11, views=[VIEW], shuffle=ident)
        assert torch.equal(same, plain)


@pytest.mark.parametrize("shuffle, error, words", [
    (torch.tensor([[[0, 0], [0, 1]]] * 3), IndexError, r"shuffle\[0, 0\] = \[0, 0\] is not an order"),
    (torch.tensor([[[0, 1], [1, 2]]] * 3), IndexError, r"shuffle\[0, 1\]"),
    (torch.tensor([[[0, 1], [1, 0]]] * 2), ValueError, "shape"),
    (torch.tensor([[[0, 1], [1, 0]]] * 3, dtype=torch.int32), ValueError, "int64"),
    (torch.arange(24).expand(3, 2, 24).contiguous(), ValueError, "factor must lie in"),
])
def test_bad_strip_orders_are_rejected(shuffle, error, words):
    src, index, p = _batch(3, H=19, W=23)
    with pytest.raises(error, match=words):
        augment_mix(src, index, **p, mode="cutmix", out_size=11, views=[VIEW], shuffle=shuffle)


def test_sampled_strip_orders_are_uniform_permutations_drawn_last():
    index = torch.zeros(6000, dtype=torch.long)
    plain = sample_augment_params(index, 30, 40, out_size=16, generator=torch.Generator().manual_seed(3))
    p = sample_augment_params(index, 30, 40, out_size=16, generator=torch.Generator().manual_seed(3), shuffle_factor=3)
    assert "shuffle" not in plain
    for k in plain:  # the other parameters are exactly those drawn without ShufflePatches
        assert torch.equal(plain[k], p[k]), k
    s = p["shuffle"]
    assert s.shape == (6000, 2, 3) and s.dtype == torch.long
    assert torch.equal(s.sort(-1).values, torch.arange(3).expand_as(s))
    counts = torch.bincount(s[:, 0, 0], minlength=3).float() / 6000  # each strip first a third of the time
    assert (counts - 1 / 3).abs().max() < 0.03
    assert (s[:, 0] != s[:, 1]).any(-1).float().mean() > 0.7  # rows and columns drawn independently (5/6 differ)
    with pytest.raises(ValueError, match="shuffle_factor"):
        sample_augment_params(index[:2], 30, 4, out_size=16, shuffle_factor=5)
