"""pytest-benchmark entries: `python -m pytest benchmarks --benchmark-enable` times them; CI runs each once.

GPU entries skip without CUDA (the Triton kernels' speed needs a GPU); CPU entries compare the
csrc C++ kernels with their PyTorch references on this machine's cores.
"""
import pytest
import torch
import torch.nn.functional as F

from hello_fast.ops import _backend, lora_linear, soft_label_loss

gpu = pytest.mark.gpu  # skipped without CUDA by the suite's conftest (tests/conftest.py, imported by ours)
cpp = pytest.mark.skipif(_backend.extension() is None, reason="hello_fast._C not built")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def head_problem():
    dev = "cuda"
    x = torch.randn(4096, 1024, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1000, 1024, device=dev, dtype=torch.bfloat16) / 32
    a = torch.randn(128, 1024, device=dev, dtype=torch.bfloat16) / 32
    b = torch.randn(1000, 128, device=dev, dtype=torch.bfloat16) / 11
    return x, w, a, b


@gpu
@pytest.mark.parametrize("impl", ["base_gemm", "unfused", "fused"])
def test_lora_linear_head(benchmark, head_problem, impl):
    x, w, a, b = head_problem
    fns = {
        "base_gemm": lambda: x @ w.t(),
        "unfused": lambda: F.linear(x, w) + 0.5 * F.linear(F.linear(x, a), b),
        "fused": lambda: lora_linear(x, w, a, b, 0.5, backend="triton"),
    }
    fn = fns[impl]

    def run():
        fn()
        _sync()

    benchmark(run)


@pytest.fixture(scope="module")
def loss_problem():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(256, 1000, generator=g, requires_grad=True)
    t = torch.randn(256, 1000, generator=g)
    hard = torch.randint(0, 1000, (256,), generator=g)
    return s, t, hard, torch.randperm(256, generator=g), torch.rand(256, generator=g)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=cpp), "torch"])
@pytest.mark.parametrize("mode", ["mse", "kl"])
def test_soft_label_loss_cpu(benchmark, loss_problem, backend, mode):
    s, t, hard, partner, lam = loss_problem

    def run():
        loss = soft_label_loss(s, t, hard, partner, lam, mode=mode, temperature=4.0, beta=0.1, backend=backend)
        torch.autograd.grad(loss, [s])

    benchmark(run)


@pytest.fixture(scope="module")
def augment_problem():
    from hello_fast.ops import sample_augment_params

    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (128, 3, 256, 256), dtype=torch.uint8, generator=g)
    index = torch.randint(0, 128, (64,), generator=g)
    p = sample_augment_params(index, 256, 256, out_size=224, scale=(0.5, 1.0), mode="cutmix", generator=g)
    views = [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32),
             ((0.481, 0.458, 0.408), (0.269, 0.261, 0.276), torch.bfloat16)]
    return src, index, p, views


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=cpp), "torch"])
def test_augment_mix_cpu(benchmark, augment_problem, backend):
    from hello_fast.ops import augment_mix

    src, index, p, views = augment_problem
    benchmark(lambda: augment_mix(src, index, **p, mode="cutmix", out_size=224, views=views, backend=backend))


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_augment_mix_gpu(benchmark, augment_problem, backend):
    from hello_fast.ops import augment_mix

    src, index, p, views = augment_problem
    src, index = src.cuda(), index.cuda()
    p = {k: v.cuda() for k, v in p.items()}

    def run():
        augment_mix(src, index, **p, mode="cutmix", out_size=224, views=views, backend=backend, check=False)
        _sync()

    benchmark(run)


@pytest.fixture(scope="module")
def loop_setup():
    import argparse

    from hello_fast.bench import _Setup

    args = argparse.Namespace(student="resnet18", projector="hello-tiny-rn", batch=32, res=32, classes=10, conv_rank=4,
                              head_rank=8, width=16, capture=False, device="cpu", steps=3)
    return _Setup(args)


@pytest.mark.parametrize("loop", ["fast", "floor"])
def test_student_loop_step_cpu(benchmark, loop_setup, loop):
    """One student step with online projector labels (fast) and without labeling (floor), tiny CPU sizes."""
    from hello_fast import bench, labels

    s = loop_setup
    source = labels.ProjectorLabels(s.projector, s.meta, 0, device=s.device, fast=True)
    if loop == "floor":
        benchmark.pedantic(lambda: bench._floor(s, source, 1), rounds=3)
    else:
        benchmark.pedantic(lambda: bench._fast_loop(s, source, 1), rounds=3)


@pytest.mark.parametrize("source", ["resident", "dali"])
def test_student_batches(benchmark, source):
    """One student-loop batch (two views, CutMix) from the resident set + augment_mix, or from the DALI backend."""
    from hello_fast.data.resident import ResidentSet
    from hello_fast.data.sources import procedural_images
    from hello_fast.data.spec import AugmentRecipe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = procedural_images(10, 6, 64)
    recipe = AugmentRecipe(64, scale=(0.5, 1.0), flip=True, mix="cutmix", alpha=1.0)
    views = [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32),
             ((0.481, 0.458, 0.408), (0.269, 0.261, 0.276), torch.float32)]
    if source == "dali":
        dali = pytest.importorskip("hello_fast.data.dali")
        if not dali.available():
            pytest.skip("DALI is not installed")
        s = dali.DaliDistilledSet(images, labels, device, recipe, batch_size=32, views=views)
    else:
        s = ResidentSet(images, labels, device, recipe)
    index = s.epoch_order(32)[0]
    p = s.draw(index)

    def run():
        s.make(index, p, views=views)
        _sync()

    benchmark(run)
