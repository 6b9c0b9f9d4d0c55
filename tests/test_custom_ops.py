"""The three ops as torch.library ops: schemas, fake tensors, opcheck, autograd, and torch.compile seeing one node per op."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import triton_device
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode

from hello_fast.ops import (
    _backend,
    _registrations,
    augment_mix,
    augment_mix_reference,
    lora_linear,
    soft_label_loss,
    soft_label_loss_reference,
)

DEV = triton_device()
CPP = pytest.mark.skipif(_backend.extension() is None, reason="the C++ extension is not built")
INTERPRETER = pytest.mark.skipif(DEV != "cpu", reason="runs the Triton kernels through the interpreter")
VIEW = ((0.5, 0.4, 0.3), (0.25, 0.2, 0.3), torch.float32)


def _augment_args(g, B=4, S=5, size=12):
    src = torch.randint(0, 256, (S, 3, size, size), dtype=torch.uint8, generator=g)
    index = torch.randint(0, S, (B,), generator=g)
    crop = torch.tensor([[0, 0, 12, 12], [1, 1, 10, 9], [2, 0, 8, 12], [0, 3, 7, 7]])[:B]
    flip = torch.tensor([True, False, True, False])[:B]
    partner = torch.tensor([1, 0, 3, 2])[:B]
    cut = torch.tensor([[0, 0, 4, 4], [2, 2, 6, 6], [1, 0, 3, 8], [0, 0, 0, 0]])[:B]
    return src, index, crop, flip, partner, torch.full((B,), 0.6), cut


def _lora_args(g, rows=5, K=24, N=10, r=4):
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    a = torch.randn(r, K, generator=g) / K**0.5
    b = torch.randn(N, r, generator=g)
    return x, w, a, b, 0.5, torch.randn(N, generator=g)


def _loss_args(g, B=4, C=10):
    return (torch.randn(B, C, generator=g), torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g),
            torch.tensor([1, 0, 3, 2])[:B], torch.rand(B, generator=g))


@CPP
def test_python_schemas_are_the_extensions():
    """Where the extension is absent the ops are declared from Python: with exactly the C++ schema text."""
    for name, schema in _registrations.SCHEMAS.items():
        declared = getattr(torch.ops.hello_fast, name).default._schema
        assert str(declared) == str(torch._C.parse_schema("hello_fast::" + schema)), name


def test_every_op_has_autograd_and_a_gpu_kernel_registered():
    for name in ("lora_linear", "soft_label_loss", "soft_label_loss_with_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hello_fast::{name}", "Autograd"), name
    triton_installed = DEV is not None or torch.cuda.is_available()
    if not _registrations.cuda_kernels_built() and triton_installed:
        # no CUDA kernels in this build: the Triton launchers are the ops' CUDA kernels
        assert _registrations.triton_serves_cuda()
    for name in ("augment_mix", "soft_label_loss", "soft_label_loss_with_grad"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"hello_fast::{name}", "CUDA")
        assert has == (_registrations.cuda_kernels_built() or _registrations.triton_serves_cuda()), name


@INTERPRETER
def test_the_triton_cuda_kernels_match_the_references(rng):
    """The functions registered at the CUDA key (run here on the CPU through the interpreter): the argument
    conversion from the schema (flat means/stds, dtype codes) gives the reference's views and loss."""
    args = _augment_args(rng)
    views = [VIEW, ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7), torch.bfloat16)]
    mean = [m for v in views for m in v[0]]
    std = [s for v in views for s in v[1]]
    got = _registrations._augment_mix_triton(*args, "cutmix", 8, mean, std, [0, 2], True)
    want, _ = augment_mix_reference(*args, mode="cutmix", out_size=8, views=views)
    assert [v.dtype for v in got] == [torch.float32, torch.bfloat16]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_.float(), w_.float(), atol=1e-3 if g_.dtype == torch.float32 else 3e-2)
    s, t, hard, partner, lam = _loss_args(rng)
    loss, grad = _registrations._soft_label_loss_with_grad_triton(s, t, hard, partner, lam, "kl", 2.0, 0.5)
    s_ref = s.clone().requires_grad_(True)
    want = soft_label_loss_reference(s_ref, t, hard, partner, lam, mode="kl", temperature=2.0, beta=0.5)
    (g_ref,) = torch.autograd.grad(want, [s_ref])
    assert torch.allclose(loss, want, atol=1e-5) and torch.allclose(grad, g_ref, atol=1e-5)
    alone = _registrations._soft_label_loss_triton(s, t, hard, partner, lam, "kl", 2.0, 0.5)
    assert torch.allclose(alone, want, atol=1e-5)


@INTERPRETER
def test_opcheck_lora_linear(rng):
    x, w, a, b, scale, bias = _lora_args(rng)
    for requires in ((), ("x", "a", "b"), ("a",)):
        xs, ws, as_, bs = (t.clone().requires_grad_(n in requires) for t, n in zip((x, w, a, b), "xwab"))
        res = torch.library.opcheck(torch.ops.hello_fast.lora_linear.default, (xs, ws, as_, bs, scale, bias))
        assert all(v == "SUCCESS" for v in res.values()), (requires, res)
    dy = torch.randn(x.shape[0], w.shape[0], generator=rng)
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        res = torch.library.opcheck(torch.ops.hello_fast.lora_linear_backward.default, (dy, x, w, a, b, scale, *needs))
        assert all(v == "SUCCESS" for v in res.values()), (needs, res)


@CPP
def test_opcheck_soft_label_loss_with_autograd(rng):
    s, t, hard, partner, lam = _loss_args(rng)
    s.requires_grad_(True)
    for op in (torch.ops.hello_fast.soft_label_loss.default, torch.ops.hello_fast.soft_label_loss_with_grad.default):
        res = torch.library.opcheck(op, (s, t, hard, partner, lam, "mse", 1.0, 0.3))
        assert all(v == "SUCCESS" for v in res.values()), res
    # the plain op's backward (recomputed through _with_grad) is the reference's gradient, scaled
    loss = torch.ops.hello_fast.soft_label_loss(s, t, hard, partner, lam, "kl", 2.0, 0.5)
    (g,) = torch.autograd.grad(loss * 3.0, [s])
    s_ref = s.detach().double().requires_grad_(True)
    want = soft_label_loss_reference(s_ref, t.double(), hard, partner, lam, mode="kl", temperature=2.0, beta=0.5)
    (g_ref,) = torch.autograd.grad(want * 3.0, [s_ref])
    assert torch.allclose(g.double(), g_ref, atol=1e-6)


@CPP
def test_fake_tensors_give_shapes_dtypes_and_layouts(rng):
    aug = _augment_args(rng)
    x, w, a, b, scale, bias = _lora_args(rng)
    s, t, hard, partner, lam = _loss_args(rng)
    a_t = a.t().contiguous()
    with FakeTensorMode() as mode:
        fake = lambda v: mode.from_tensor(v)  # noqa: E731
        views = torch.ops.hello_fast.augment_mix(*map(fake, aug), "mixup", 8, [0.5] * 6, [0.2] * 6, [1, 2], True, None)
        assert [(tuple(v.shape), v.dtype) for v in views] == [((4, 3, 8, 8), torch.float16), ((4, 3, 8, 8), torch.bfloat16)]
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
        # the dispatcher itself runs on fake tensors (no data read with check=False)
        (v,), lam_eff = augment_mix(*map(fake, aug), mode="cutmix", out_size=8, views=[VIEW], check=False, backend="cpp")
        assert v.shape == (4, 3, 8, 8) and lam_eff.shape == (4,)
        y = torch.ops.hello_fast.lora_linear(fake(x).view(5, 1, 24), fake(w), fake(a), fake(b), scale, fake(bias))
        assert y.shape == (5, 1, 10) and y.dtype == torch.float32
        dx, da, db = torch.ops.hello_fast.lora_linear_backward(fake(torch.empty(5, 10)), fake(x), fake(w), fake(a),
                                                               fake(b), scale, True, False, True)
        assert dx.shape == x.shape and da.numel() == 0 and db.shape == b.shape
        loss, grad = torch.ops.hello_fast.soft_label_loss_with_grad(*map(fake, (s, t, hard, partner, lam)), "kl", 2.0, 0.5)
        assert loss.shape == () and loss.dtype == torch.float32 and grad.shape == s.shape
        wrong_a = fake(a_t)
        with pytest.raises(Exception, match="lora_a must be"):  # the fake re-checks the invariants, not only shapes
            torch.ops.hello_fast.lora_linear(fake(x), fake(w), wrong_a, fake(b), scale, None)


def _step_inputs(g):
    aug = _augment_args(g)
    _, w, a, b, _, bias = _lora_args(g, K=3 * 8 * 8)
    hard = torch.randint(0, 10, (4,), generator=g)
    target = torch.randn(4, 10, generator=g)
    return aug, w, a, b, bias, hard, target


def _step(aug, w, a, b, bias, hard, target):
    """One student step's ops: augment a batch, a LoRA layer on the pixels, the soft-label loss."""
    (x,), lam_eff = augment_mix(*aug, mode="cutmix", out_size=8, views=[VIEW], backend="cpp")
    logits = lora_linear(x.flatten(1), w, a, b, 0.5, bias, backend="triton")
    return soft_label_loss(logits, target, hard, aug[4], lam_eff, mode="kl", temperature=2.0, beta=0.5, backend="cpp")


def _calls(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "hello_fast" in str(n.target)]


@CPP
@INTERPRETER
def test_torch_compile_sees_each_op_as_one_node(rng):
    aug, w, a, b, bias, hard, target = _step_inputs(rng)
    trained = [t.clone().requires_grad_(True) for t in (a, b)]
    explained = torch._dynamo.explain(_step)(aug, w, *trained, bias, hard, target)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert _calls(explained.graphs[0]) == ["hello_fast.augment_mix", "hello_fast.lora_linear",
                                           "hello_fast.soft_label_loss_with_grad"]

    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)  # run the traced graph as it is: aot_eager
        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    a1, b1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = torch.compile(_step, backend=backend, fullgraph=True)(aug, w, a1, b1, bias, hard, target)
    grads = torch.autograd.grad(loss * 2.0, [a1, b1])
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1
    assert sorted(_calls(graphs["forward"][0])) == ["hello_fast.augment_mix.default", "hello_fast.lora_linear.default",
                                                    "hello_fast.soft_label_loss_with_grad.default"]
    assert _calls(graphs["backward"][0]) == ["hello_fast.lora_linear_backward.default"]

    a2, b2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    want = _step(aug, w, a2, b2, bias, hard, target)
    want_grads = torch.autograd.grad(want * 2.0, [a2, b2])
    assert torch.allclose(loss, want, atol=1e-6)
    for got, ref in zip(grads, want_grads):
        assert torch.allclose(got, ref, atol=1e-6)
    # the same step through torch's own aot_eager backend
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(_step, backend="aot_eager", fullgraph=True)(aug, w, a, b, bias, hard, target),
                          want.detach(), atol=1e-6)


@CPP
def test_compiled_range_checks_still_refuse(rng):
    """Under torch.compile the host reads of the range checks become device-side assertions: still refused."""
    s, t, hard, partner, lam = _loss_args(rng)
    torch._dynamo.reset()
    fn = torch.compile(lambda h: soft_label_loss(s, t, h, partner, lam, mode="kl", backend="cpp"), backend="aot_eager",
                       fullgraph=True)
    assert torch.allclose(fn(hard), soft_label_loss(s, t, hard, partner, lam, mode="kl", backend="cpp"))
    with pytest.raises(RuntimeError, match="hard labels must lie"):
        fn(torch.full_like(hard, 10))
    aug = list(_augment_args(rng))
    aug_fn = torch.compile(lambda crop: augment_mix(*aug[:2], crop, *aug[3:], mode="none", out_size=8, views=[VIEW],
                                                    backend="cpp")[0][0], backend="aot_eager", fullgraph=True)
    aug_fn(aug[2])
    bad = aug[2].clone()
    bad[1, 2] = 13  # a crop taller than the image
    with pytest.raises(RuntimeError, match="out of range"):
        aug_fn(bad)


def test_without_the_extension_the_ops_are_declared_from_python():
    """An install with no compiled extension: the schemas come from Python, with fakes and autograd, and Triton (when
    installed) serves the CUDA key; the CPU runs the reference."""
    code = """
import sys, warnings
sys.modules["hello_fast._C"] = None  # the import of the extension fails, as on an install without it
warnings.simplefilter("ignore")
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from hello_fast.ops import _backend, _registrations, soft_label_loss
assert _backend.extension() is None
for name, schema in _registrations.SCHEMAS.items():
    assert str(getattr(torch.ops.hello_fast, name).default._schema) == str(torch._C.parse_schema("hello_fast::" + schema))
assert torch._C._dispatch_has_kernel_for_dispatch_key("hello_fast::soft_label_loss_with_grad", "Autograd")
s = torch.randn(3, 5)
with FakeTensorMode() as mode:
    loss, grad = torch.ops.hello_fast.soft_label_loss_with_grad(mode.from_tensor(s), None, *(mode.from_tensor(t) for t in (
        torch.tensor([0, 1, 4]), torch.tensor([1, 0, 2]), torch.ones(3))), "mse", 1.0, 1.0)
    assert loss.shape == () and grad.shape == (3, 5)
print(_registrations.triton_serves_cuda(), float(soft_label_loss(s, None, torch.tensor([0, 1, 4]), torch.tensor([1, 0, 2]),
                                                               torch.ones(3), beta=1.0)) > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    triton_installed = importlib.util.find_spec("triton") is not None
    assert out.stdout.split() == [str(triton_installed), "True"]
