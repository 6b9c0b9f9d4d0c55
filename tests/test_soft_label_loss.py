"""soft_label_loss: every backend against the float64 reference, forward and backward, with clear errors."""
import importlib

import pytest
import torch

from hello_fast.ops import _backend, _registrations, soft_label_loss, soft_label_loss_reference

CPP = pytest.mark.skipif(_backend.extension() is None, reason="hello_fast._C not built")
TOL = {torch.float32: 1e-5, torch.float64: 1e-7,  # the loss is returned as float32
       torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(B, C, dtype=torch.float32, g=None, target=True):
    g = g or torch.Generator().manual_seed(0)
    s = (torch.randn(B, C, generator=g) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(B, C, generator=g) * 3).to(dtype) if target else None
    hard = torch.randint(0, C, (B,), generator=g)
    partner = torch.randperm(B, generator=g)
    lam = torch.rand(B, generator=g)
    return s, t, hard, partner, lam


def _ref64(s, t, hard, partner, lam, **kw):
    s64 = s.detach().double().requires_grad_(True)
    out = soft_label_loss_reference(s64, None if t is None else t.double(), hard, partner, lam, **kw)
    return s64, out


@CPP
@pytest.mark.parametrize("B, C", [(1, 1), (1, 7), (3, 1001), (37, 13), (64, 2049)])
@pytest.mark.parametrize("mode, temperature, beta", [("mse", 1.0, 0.0), ("mse", 1.0, 0.7), ("kl", 4.0, 0.0), ("kl", 20.0, 0.3)])
def test_cpp_matches_float64_reference(B, C, mode, temperature, beta, rng):
    s, t, hard, partner, lam = _inputs(B, C, g=rng)
    got = soft_label_loss(s, t, hard, partner, lam, mode=mode, temperature=temperature, beta=beta, backend="cpp")
    s64, want = _ref64(s, t, hard, partner, lam, mode=mode, temperature=temperature, beta=beta)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    grad_out = torch.rand((), generator=rng) * 3 + 0.5  # grad_output != 1
    (g,) = torch.autograd.grad(got * grad_out, s)
    (g64,) = torch.autograd.grad(want * grad_out.double(), s64)
    assert torch.allclose(g.double(), g64, rtol=1e-4, atol=1e-7)


def _cpu_backends():
    from conftest import triton_device

    out = ["cpp"] if _backend.extension() is not None else []
    return out + (["triton"] if triton_device() == "cpu" else [])


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("B, C", [(1, 1), (3, 7), (7, 1001), (5, 20000)])
@pytest.mark.parametrize("mode, temperature, beta, target", [
    ("mse", 1.0, 0.0, True), ("mse", 1.0, 0.7, True), ("kl", 4.0, 0.0, True), ("kl", 1.0, 0.3, True), ("mse", 1.0, 1.0, False),
])
def test_every_backend_matches_float64(backend, B, C, mode, temperature, beta, target, rng):
    s, t, hard, partner, lam = _inputs(B, C, g=rng, target=target)
    got = soft_label_loss(s, t, hard, partner, lam, mode=mode, temperature=temperature, beta=beta, backend=backend)
    s64, want = _ref64(s, t, hard, partner, lam, mode=mode, temperature=temperature, beta=beta)
    assert abs(got.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item()))
    grad_out = torch.rand((), generator=rng) + 0.5
    (g,) = torch.autograd.grad(got * grad_out, s)
    (g64,) = torch.autograd.grad(want * grad_out.double(), s64)
    assert (g.double() - g64).abs().max() <= 1e-5 * max(1.0, g64.abs().max().item()) + 1e-9


@CPP
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_inputs(dtype, rng):
    s, t, hard, partner, lam = _inputs(9, 101, dtype=dtype, g=rng)
    got = soft_label_loss(s, t, hard, partner, lam, mode="kl", temperature=2.0, beta=0.5, backend="cpp")
    _, want = _ref64(s, t, hard, partner, lam, mode="kl", temperature=2.0, beta=0.5)
    assert abs(got.item() - want.item()) <= TOL[dtype] * max(1.0, abs(want.item())) * 10
    (g,) = torch.autograd.grad(got, s)
    assert g.dtype == dtype and torch.isfinite(g.float()).all()


@CPP
def test_hard_labels_only_is_mixed_cross_entropy(rng):
    s, _, hard, partner, lam = _inputs(6, 5, g=rng, target=False)
    got = soft_label_loss(s, None, hard, partner, lam, beta=1.0, backend="cpp")
    logp = torch.log_softmax(s.double(), 1)
    want = -(lam * logp[torch.arange(6), hard] + (1 - lam) * logp[torch.arange(6), hard[partner]]).mean()
    assert abs(got.item() - want.item()) < 1e-5


def test_gradient_reaches_the_student_only(rng):
    s, t, hard, partner, lam = _inputs(4, 6, g=rng)
    t.requires_grad_(True)
    loss = soft_label_loss(s, t, hard, partner, lam, mode="mse", beta=0.2)
    loss.backward()
    assert s.grad is not None and t.grad is None


@CPP
def test_opcheck_and_compile():
    s, t, hard, partner, lam = _inputs(5, 7)
    for op in (torch.ops.hello_fast.soft_label_loss.default, torch.ops.hello_fast.soft_label_loss_with_grad.default):
        res = torch.library.opcheck(op, (s.detach(), t, hard, partner, lam, "kl", 2.0, 0.5))
        assert all(v == "SUCCESS" for v in res.values()), res
    compiled = torch.compile(lambda a: soft_label_loss(a, t, hard, partner, lam, mode="kl", temperature=2.0, beta=0.5, backend="cpp"),
                             fullgraph=False)
    want = soft_label_loss(s, t, hard, partner, lam, mode="kl", temperature=2.0, beta=0.5, backend="cpp")
    got = compiled(s)
    assert torch.allclose(got, want)
    (g1,) = torch.autograd.grad(got, [s])
    (g2,) = torch.autograd.grad(want, [s])
    assert torch.allclose(g1, g2)


BAD_ARGUMENTS = [
    (lambda a: a.update(mode="l1"), ValueError, "mode"),
    (lambda a: a.update(hard=torch.tensor([0, 1, 7, 0])), IndexError, "hard labels"),
    (lambda a: a.update(hard=torch.tensor([0, -1, 2, 0])), IndexError, "hard labels"),
    (lambda a: a.update(partner=torch.tensor([0, 1, 2, 4])), IndexError, "partner"),
    (lambda a: a.update(lam=torch.rand(3)), ValueError, "lam"),
    (lambda a: a.update(target_logits=torch.randn(4, 5)), ValueError, "target_logits"),
    (lambda a: a.update(target_logits=torch.ones(4, 6, dtype=torch.long)), ValueError, "floating point"),
    (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
    (lambda a: a.update(temperature=float("inf")), ValueError, "temperature"),
    (lambda a: a.update(beta=float("nan")), ValueError, "beta"),
    (lambda a: a.update(student_logits=torch.randn(4)), ValueError, "student_logits"),
    (lambda a: a.update(student_logits=torch.randn(4, 6, dtype=torch.float64)), ValueError, "float32, float16 or bfloat16"),
]


def _bad_call(mutate, backend=None):
    args = dict(student_logits=torch.randn(4, 6), target_logits=torch.randn(4, 6), hard=torch.tensor([0, 1, 2, 3]),
                partner=torch.tensor([1, 0, 3, 2]), lam=torch.rand(4), mode="mse", temperature=1.0, beta=0.5)
    mutate(args)
    return soft_label_loss(**args, backend=backend)


@pytest.mark.parametrize("mutate, error, words", BAD_ARGUMENTS)
def test_bad_arguments_raise_clear_errors(mutate, error, words):
    with pytest.raises(error, match=words):
        _bad_call(mutate)


@pytest.mark.parametrize("backend", ["torch"] + _cpu_backends())
def test_every_backend_refuses_bad_arguments_with_the_same_error(backend):
    """One check, in the dispatcher, before any backend runs: the same exception and message whichever runs."""
    for mutate, error, _ in BAD_ARGUMENTS:
        with pytest.raises(error) as default:
            _bad_call(mutate)
        with pytest.raises(error) as forced:
            _bad_call(mutate, backend)
        assert str(forced.value) == str(default.value)


@pytest.mark.parametrize("backend", ["torch"] + _cpu_backends())
def test_target_is_read_in_the_students_dtype_by_every_backend(backend, rng):
    s, t, hard, partner, lam = _inputs(5, 33, dtype=torch.bfloat16, g=rng)
    t32 = t.float() + torch.rand(5, 33, generator=rng) * 0.01  # not representable in bfloat16
    got = soft_label_loss(s, t32, hard, partner, lam, mode="kl", temperature=2.0, beta=0.3, backend=backend)
    want = soft_label_loss_reference(s.double(), t32.bfloat16().double(), hard, partner, lam, mode="kl", temperature=2.0,
                                     beta=0.3)
    assert abs(got.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item()))


class _FakeExtension:
    def __init__(self, cuda):
        self._cuda = cuda

    def cuda_built(self):
        return self._cuda


@pytest.mark.parametrize("extension, triton, want", [
    ("cuda", True, "cuda"),      # both GPU kernels: the precompiled CUDA kernel leads
    ("cuda", False, "cuda"),
    ("cpu", True, "triton"),     # the extension was built without a CUDA toolkit: Triton is the GPU kernel
    (None, True, "triton"),      # no extension at all
    ("cpu", False, "torch"),
    (None, False, "torch"),
])
def test_gpu_roles_by_default(monkeypatch, extension, triton, want):
    """The default on a CUDA device (faked at choose()) for both ops with two GPU kernels; see _backend's roles."""
    am, sll = importlib.import_module("hello_fast.ops.augment_mix"), importlib.import_module("hello_fast.ops.soft_label_loss")
    monkeypatch.delenv("HELLO_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "extension", lambda: None if extension is None else _FakeExtension(extension == "cuda"))
    # what the extension said about its CUDA kernels when the ops were registered (read there once: free to trace)
    monkeypatch.setattr(_registrations, "cuda_kernels_built", lambda: extension == "cuda")
    monkeypatch.setattr(_backend, "triton_usable", lambda device: triton)
    cuda = torch.device("cuda")
    for op, offered in (("augment_mix", am._OFFERED), ("soft_label_loss", sll._OFFERED)):
        assert _backend.choose(op, None, cuda, offered) == want
        if want == "cuda" and triton:  # the other GPU kernel stays reachable, by preference or by demand
            monkeypatch.setenv("HELLO_FAST_BACKEND", "triton")
            assert _backend.choose(op, None, cuda, offered) == "triton"
            monkeypatch.delenv("HELLO_FAST_BACKEND")
            assert _backend.choose(op, "triton", cuda, offered) == "triton"
        if extension != "cuda":
            with pytest.raises(RuntimeError, match="'cuda' is not available"):
                _backend.choose(op, "cuda", cuda, offered)
    # on the CPU nothing changes: the C++ op where built, else the reference (the Triton interpreter only on demand)
    cpu = torch.device("cpu")
    assert _backend.choose("soft_label_loss", None, cpu, sll._OFFERED) == ("cpp" if extension else "torch")


def test_backend_choice(monkeypatch):
    s, t, hard, partner, lam = _inputs(3, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        soft_label_loss(s, t, hard, partner, lam, backend="fortran")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            soft_label_loss(s, t, hard, partner, lam, backend="cuda")
    monkeypatch.setenv("HELLO_FAST_BACKEND", "torch")
    assert _backend.choose("soft_label_loss", None, torch.device("cpu"), ("cpp", "torch")) == "torch"
    monkeypatch.setenv("HELLO_FAST_BACKEND", "cuda")  # a preference this op cannot honour on the CPU
    assert _backend.choose("soft_label_loss", None, torch.device("cpu"), ("cpp", "torch")) in ("cpp", "torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mode", ["mse", "kl"])
def test_gpu_backends(backend, dtype, tol, mode, rng):
    if backend == "cuda" and not _backend.available(torch.device("cuda"), ("cuda",)):
        pytest.skip("extension built without CUDA")
    s, t, hard, partner, lam = _inputs(256, 1000, g=rng)
    args = [x.cuda() for x in (s.detach(), t, hard, partner, lam)]
    args[0] = args[0].to(dtype).requires_grad_(True)
    args[1] = args[1].to(dtype)
    got = soft_label_loss(*args, mode=mode, temperature=4.0, beta=0.1, backend=backend)
    (g,) = torch.autograd.grad(got, args[0])
    s64, want = _ref64(args[0].detach().cpu(), args[1].cpu(), hard, partner, lam, mode=mode, temperature=4.0, beta=0.1)
    (g64,) = torch.autograd.grad(want, s64)
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    assert ((g.double().cpu() - g64).norm() / g64.norm()).item() <= tol * 10
