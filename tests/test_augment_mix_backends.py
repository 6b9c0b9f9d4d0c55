"""augment_mix backends (cpp, Triton through the interpreter, CUDA and Triton on a GPU) against the PyTorch reference."""
import pytest
import torch
from conftest import gpu, triton_device

from hello_fast.ops import _backend, augment_mix, augment_mix_reference, sample_augment_params
from hello_fast.ops.augment_mix import MAX_VIEWS, effective_lam

VIEWS = [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32), ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28), torch.float32)]


def _cpu_backends():
    out = []
    if _backend.extension() is not None:
        out.append("cpp")
    if triton_device() == "cpu":
        out.append("triton")
    return out


CPU_BACKENDS = _cpu_backends()


def _params(B, S, H, W, out, mode, g, device="cpu", shuffle_factor=1):
    index = torch.randint(0, S, (B,), generator=g)
    p = sample_augment_params(index, H, W, out_size=out, scale=(0.05, 1.0), mode=mode, per_sample=True, generator=g,
                              shuffle_factor=shuffle_factor)
    if mode == "mixup":
        p["lam"] = torch.rand(B, generator=g)
    return index.to(device), {k: v.to(device) for k, v in p.items()}


def _compare(backend, src, index, p, mode, out, views=VIEWS, tol=2e-3, channels_last=False):
    ref, lam_ref = augment_mix_reference(src.cpu(), index.cpu(), **{k: v.cpu() for k, v in p.items()}, mode=mode, out_size=out, views=views)
    got, lam = augment_mix(src, index, **p, mode=mode, out_size=out, views=views, backend=backend, channels_last=channels_last)
    assert len(got) == len(views)
    for g_, r_, (_, _, dtype) in zip(got, ref, views):
        assert g_.dtype == dtype and g_.shape == r_.shape
        assert torch.isfinite(g_.float()).all()
        assert (g_.float().cpu() - r_.float()).abs().max().item() <= tol
    assert torch.allclose(lam.cpu(), lam_ref, atol=1e-6)
    return got


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
@pytest.mark.parametrize("B, out", [(1, 1), (3, 8), (7, 17), (3, 45), (1, 224)])
def test_backend_matches_reference(backend, mode, B, out, rng):
    src = torch.randint(0, 256, (5, 3, 29, 38), dtype=torch.uint8, generator=rng)
    index, p = _params(B, 5, 29, 38, out, mode, rng)
    _compare(backend, src, index, p, mode, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
@pytest.mark.parametrize("H, W, factor, out", [(32, 32, 2, 17), (29, 38, 2, 24), (40, 31, 3, 45), (23, 33, 4, 8),
                                                 (224, 224, 2, 224)])
def test_shuffle_patches_match_reference(backend, mode, H, W, factor, out, rng):
    """RDED's ShufflePatches folded into the source coordinates, sides the factor does not divide included."""
    src = torch.randint(0, 256, (5, 3, H, W), dtype=torch.uint8, generator=rng)
    index, p = _params(4, 5, H, W, out, mode, rng, shuffle_factor=factor)
    assert p["shuffle"].shape == (4, 2, factor)
    _compare(backend, src, index, p, mode, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shuffle_patches_with_channels_last_source_and_views(backend, rng):
    big = torch.randint(0, 256, (5, 37, 26, 3), dtype=torch.uint8, generator=rng)
    src = big.permute(0, 3, 1, 2)  # channels-last memory, NCHW view
    index, p = _params(6, 5, 37, 26, 19, "cutmix", rng, shuffle_factor=3)
    views = [VIEWS[0], ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.bfloat16)]
    _compare(backend, src, index, p, "cutmix", 19, views=views, tol=4e-2, channels_last=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_border_and_one_pixel_crops_partner_self(backend, rng):
    src = torch.randint(0, 256, (4, 3, 21, 30), dtype=torch.uint8, generator=rng)
    index = torch.tensor([0, 3, 2, 1, 0, 3, 2])
    crop = torch.tensor([[0, 0, 21, 30], [20, 29, 1, 1], [0, 29, 21, 1], [20, 0, 1, 30], [0, 0, 1, 1], [5, 7, 16, 23], [0, 0, 7, 30]])
    flip = torch.tensor([True, False, True, True, False, False, True])
    partner = torch.arange(7)  # every sample mixes with itself
    cut = torch.tensor([[0, 0, 17, 17], [3, 4, 9, 10], [0, 0, 0, 0], [16, 16, 17, 17], [2, 2, 15, 3], [0, 5, 17, 6], [1, 1, 2, 2]])
    lam = torch.rand(7, generator=rng)
    for mode in ("none", "mixup", "cutmix"):
        p = dict(crop=crop, flip=flip, partner=partner, lam=lam, cut=cut)
        _compare(backend, src, index, p, mode, 17)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_views_and_channels_last(backend, rng):
    src = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=rng)
    index, p = _params(5, 6, 40, 40, 24, "cutmix", rng)
    views = [VIEWS[0], ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.bfloat16), ((0.4, 0.4, 0.4), (0.3, 0.3, 0.3), torch.float16)]
    got = _compare(backend, src, index, p, "cutmix", 24, views=views, tol=4e-2, channels_last=True)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in got)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_source(backend, rng):
    big = torch.randint(0, 256, (5, 40, 50, 3), dtype=torch.uint8, generator=rng)
    src = big.permute(0, 3, 1, 2)  # channels-last memory, NCHW view
    index, p = _params(4, 5, 40, 50, 19, "mixup", rng)
    _compare(backend, src, index, p, "mixup", 19)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_four_views_everywhere_and_the_same_refusals(backend, rng):
    """One semantics: every backend writes up to MAX_VIEWS views and refuses the same bad parameters with the same
    error, raised by the dispatcher before the backend runs."""
    src = torch.randint(0, 256, (4, 3, 21, 30), dtype=torch.uint8, generator=rng)
    index, p = _params(3, 4, 21, 30, 13, "cutmix", rng)
    views = [VIEWS[0], ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.bfloat16), ((0.4, 0.4, 0.4), (0.3, 0.3, 0.3), torch.float16),
             ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), torch.float32)]
    assert len(views) == MAX_VIEWS
    _compare(backend, src, index, p, "cutmix", 13, views=views, tol=4e-2)
    bad_views = dict(views=views + [VIEWS[1]])
    bad_crop = dict(crop=p["crop"].clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(22)))
    bad_cut = dict(cut=torch.tensor([[0, 0, 14, 3]] * 3))
    bad_index = dict(index=torch.tensor([0, 4, 1]))
    bad_shuffle = dict(shuffle=torch.tensor([[[0, 1], [1, 0]], [[1, 0], [0, 1]], [[1, 1], [0, 1]]]))
    for bad in (bad_views, bad_crop, bad_cut, bad_index, bad_shuffle):
        args = dict(index=index, **p, mode="cutmix", out_size=13, views=[VIEWS[0]])
        args.update(bad)
        with pytest.raises((ValueError, IndexError)) as default:
            augment_mix(src, **args)
        with pytest.raises(default.type) as forced:
            augment_mix(src, **args, backend=backend)
        assert str(forced.value) == str(default.value)


def test_effective_lam_is_the_one_rule():
    lam = torch.tensor([0.3, 0.9])
    cut = torch.tensor([[0, 0, 4, 5], [2, 2, 2, 7]])
    assert torch.equal(effective_lam("mixup", lam, cut, 10), lam)
    assert torch.allclose(effective_lam("cutmix", lam, cut, 10), torch.tensor([1 - 20 / 100, 1.0]))
    assert torch.equal(effective_lam("none", lam, cut, 10), torch.ones(2))


@pytest.mark.skipif(_backend.extension() is None, reason="hello_fast._C not built")
def test_csrc_op_checks_ranges_itself_and_passes_opcheck():
    src = torch.randint(0, 256, (3, 3, 10, 10), dtype=torch.uint8)
    args = [src, torch.tensor([0, 1]), torch.tensor([[0, 0, 10, 10], [2, 2, 5, 5]]), torch.tensor([False, True]),
            torch.tensor([1, 0]), torch.rand(2), torch.tensor([[0, 0, 4, 4], [1, 1, 3, 3]]), "cutmix", 8,
            [0.5] * 6, [0.25] * 6, [0, 2], False]
    res = torch.library.opcheck(torch.ops.hello_fast.augment_mix.default, tuple(args))
    assert all(v == "SUCCESS" for v in res.values()), res
    bad = list(args)
    bad[2] = torch.tensor([[0, 0, 11, 10], [2, 2, 5, 5]])  # crop outside the image
    with pytest.raises(RuntimeError, match="crop"):
        torch.ops.hello_fast.augment_mix(*bad)
    bad = list(args)
    bad[1] = torch.tensor([0, 3])
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.hello_fast.augment_mix(*bad)
    shuffled = args + [torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 0]]])]
    res = torch.library.opcheck(torch.ops.hello_fast.augment_mix.default, tuple(shuffled))
    assert all(v == "SUCCESS" for v in res.values()), res
    bad = list(shuffled)
    bad[-1] = torch.tensor([[[1, 0], [0, 1]], [[0, 2], [1, 0]]])  # strip 2 of 2
    with pytest.raises(RuntimeError, match=r"shuffle\[1, 0\] is not an order"):
        torch.ops.hello_fast.augment_mix(*bad)
    bad = list(args)
    bad[9:12] = [[0.5] * 15, [0.25] * 15, [0, 1, 2, 0, 0]]  # the same view limit as the Python op
    with pytest.raises(RuntimeError, match=f"at most {MAX_VIEWS} views"):
        torch.ops.hello_fast.augment_mix(*bad)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
@pytest.mark.parametrize("B, out", [(1, 1), (7, 17), (3, 45), (64, 224)])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_gpu_backends(backend, mode, B, out, factor, rng):
    if backend == "cuda" and not _backend.available(torch.device("cuda"), ("cuda",)):
        pytest.skip("extension built without CUDA")
    src = torch.randint(0, 256, (9, 3, 230, 190), dtype=torch.uint8, generator=rng)
    index, p = _params(B, 9, 230, 190, out, mode, rng, device="cuda", shuffle_factor=factor)
    _compare(backend, src.cuda(), index, p, mode, out)
