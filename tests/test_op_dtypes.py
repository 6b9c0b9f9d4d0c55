"""The one dtype rule of the three ops: float64 is refused for every backend, with one message, and never reaches Triton."""
import pytest
import torch
from conftest import triton_device

from hello_fast.ops import augment_mix, lora_linear, soft_label_loss

DEV = triton_device()
MESSAGE = "must be float32, float16 or bfloat16 (every backend computes in float32), got torch.float64"


def _lora_call(dtype, where):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 16, generator=g), torch.randn(32, 16, generator=g)
    a, b, bias = torch.randn(4, 16, generator=g), torch.randn(32, 4, generator=g), torch.randn(32, generator=g)
    args = {"x": x, "weight": w, "lora_a": a, "lora_b": b, "bias": bias}
    args[where] = args[where].to(dtype)
    if where == "x":
        args["weight"] = args["weight"].to(dtype)
    return lambda backend: lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], 0.5, args["bias"],
                                       backend=backend)


def _loss_call(dtype):
    s = torch.randn(4, 6, dtype=dtype)
    hard, partner, lam = torch.tensor([0, 1, 2, 5]), torch.tensor([1, 0, 3, 2]), torch.rand(4)
    return lambda backend: soft_label_loss(s, s.detach() + 1, hard, partner, lam, mode="kl", beta=0.5, backend=backend)


def _augment_call(dtype):
    src = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    B = 2
    crop = torch.tensor([[0, 0, 8, 8], [1, 1, 6, 6]])
    cut = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]])
    view = ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), dtype)
    return lambda backend: augment_mix(src, torch.tensor([0, 2]), crop, torch.zeros(B, dtype=torch.bool),
                                       torch.tensor([1, 0]), torch.rand(B), cut, mode="cutmix", out_size=4,
                                       views=[view], backend=backend)


CALLS = {
    "lora_linear x": lambda d: _lora_call(d, "x"),
    "lora_linear lora_a": lambda d: _lora_call(d, "lora_a"),
    "lora_linear lora_b": lambda d: _lora_call(d, "lora_b"),
    "lora_linear bias": lambda d: _lora_call(d, "bias"),
    "soft_label_loss": _loss_call,
    "augment_mix": _augment_call,
}


@pytest.fixture
def triton_launchers_forbidden(monkeypatch):
    """Every Triton launcher of the three ops replaced by one that fails the test if it is ever called."""
    pytest.importorskip("triton")
    from hello_fast.kernels import augment_mix as k_aug
    from hello_fast.kernels import lora_linear as k_lora
    from hello_fast.kernels import soft_label_loss as k_loss

    def forbidden(*args, **kwargs):
        raise AssertionError("a float64 call reached a Triton launcher")

    for mod, names in ((k_lora, ("fused", "tn", "multi")), (k_aug, ("augment_mix",)), (k_loss, ("soft_label_loss",))):
        for name in names:
            monkeypatch.setattr(mod, name, forbidden)


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("how", ["argument", "environment", "default"])
def test_float64_is_refused_for_every_backend_with_one_message(op, how, monkeypatch, triton_launchers_forbidden):
    if DEV is None:
        pytest.skip("Triton cannot run here: the dispatcher would not offer it")
    call = CALLS[op](torch.float64)
    backend = "triton" if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv("HELLO_FAST_BACKEND", "triton")
    with pytest.raises(ValueError, match=MESSAGE.replace("(", r"\(").replace(")", r"\)")):
        call(backend)
    for other in ("torch", "cpp"):  # the reference and the C++ op refuse it too: one semantics whatever runs
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            call(other)


@pytest.mark.parametrize("op", ["lora_linear x", "soft_label_loss", "augment_mix"])
def test_float32_still_reaches_triton(op, monkeypatch):
    """The other side of the rule: the same calls in float32 do run the Triton launchers (so the refusal above is
    the dtype's doing, not a call that could never have reached Triton)."""
    if DEV != "cpu":
        pytest.skip("checked through the interpreter")
    pytest.importorskip("triton")
    from hello_fast.kernels import augment_mix as k_aug
    from hello_fast.kernels import lora_linear as k_lora
    from hello_fast.kernels import soft_label_loss as k_loss

    reached = []
    for mod, name in ((k_lora, "fused"), (k_aug, "augment_mix"), (k_loss, "soft_label_loss")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (reached.append(_name), _real(*a, **k))[1])
    CALLS[op](torch.float32)("triton")
    assert reached


def test_the_triton_lora_kernels_refuse_float64_themselves():
    pytest.importorskip("triton")
    from hello_fast.kernels import lora_linear as k_lora

    with pytest.raises(ValueError, match="float64"):
        k_lora.precision_for(torch.float64)
    with pytest.raises(ValueError, match="float64"):
        k_lora.precision_for(torch.float32, torch.float64)
    assert k_lora.precision_for(torch.float32, torch.bfloat16) in ("tf32", "ieee")

