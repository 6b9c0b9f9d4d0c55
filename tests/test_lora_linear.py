"""lora_linear and lora_linear_multi: the Triton kernels (interpreter on the CPU, fp32) against a float64 reference."""
import importlib
import json
import os
import types

import pytest
import torch
from conftest import gpu, triton_device

from hello_fast.ops import (
    _backend,
    lora_linear,
    lora_linear_multi,
    lora_linear_multi_reference,
    lora_linear_reference,
)

DEV = triton_device()
TRITON = pytest.mark.skipif(DEV is None, reason="Triton cannot run here")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(lead, K, N, r, bias, g, device="cpu", dtype=torch.float32, noncontig=False):
    x = torch.randn(*lead, K * (2 if noncontig else 1), generator=g).to(device=device, dtype=dtype)
    if noncontig:
        x = x[..., ::2]  # every other feature: a strided view
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(device)
    b = (torch.randn(N, r, generator=g) / r**0.5).to(device)
    bb = torch.randn(N, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, w, a, b, bb


# rows 1, 37, 2049 and leading dims (3, 11); K 45, 1024; N 37, 1000, 1271; r 1, 5, 8, 128
CASES = [
    ((1,), 45, 37, 1, True, False),
    ((37,), 45, 1000, 5, False, False),
    ((3, 11), 1024, 37, 8, True, True),
    ((2049,), 45, 1271, 128, True, False),
    ((37,), 1024, 1271, 128, False, True),
    ((3, 11), 45, 1000, 1, False, True),
    ((2049,), 1024, 37, 5, True, False),
]


@TRITON
@pytest.mark.parametrize("lead, K, N, r, bias, noncontig", CASES)
def test_triton_forward_and_backward_match_float64(lead, K, N, r, bias, noncontig, rng):
    x, w, a, b, bb = _problem(lead, K, N, r, bias, rng, device=DEV, noncontig=noncontig)
    scale = 0.5 + torch.rand((), generator=rng).item()
    params = [x, a, b] + ([bb] if bias else [])
    for p in params:
        p.requires_grad_(True)
    out = lora_linear(x, w, a, b, scale, bb, backend="triton")
    assert out.shape == (*lead, N) and out.dtype == x.dtype and torch.isfinite(out).all()
    grad_out = torch.randn(out.shape, generator=rng).to(DEV)
    grads = torch.autograd.grad(out, params, grad_out)
    ref_params = [p.detach().double().requires_grad_(True) for p in params]
    x64, a64, b64 = ref_params[:3]
    ref = lora_linear_reference(x64, w.double(), a64, b64, scale, ref_params[3] if bias else None)
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out.double())
    assert _rel(out, ref) < 1e-5
    for name, g_, r_ in zip(["x", "lora_a", "lora_b", "bias"], grads, ref_grads):
        assert g_.shape == r_.shape
        assert _rel(g_, r_) < 1e-5, name


@TRITON
def test_weight_gradient_when_it_is_trained(rng):
    x, w, a, b, bb = _problem((5,), 45, 37, 3, True, rng, device=DEV)
    w.requires_grad_(True)
    out = lora_linear(x, w, a, b, 2.0, bb, backend="triton")
    (gw,) = torch.autograd.grad(out.sum(), [w])
    w64 = w.detach().double().requires_grad_(True)
    (gw64,) = torch.autograd.grad(lora_linear_reference(x.double(), w64, a.double(), b.double(), 2.0, bb.double()).sum(), [w64])
    assert _rel(gw, gw64) < 1e-5


@TRITON
@pytest.mark.parametrize("fuse", [True, False])
def test_both_forward_strategies_agree(fuse, rng):
    from hello_fast.kernels import lora_linear as K

    x, w, a, b, bb = _problem((37,), 45, 1000, 8, True, rng, device=DEV)
    poisoned = torch.full((37, 1000), float("nan"), device=DEV)  # every element must be written
    out = K.fused(x, w, b, 0.7, a=a, bias=bb, fuse_xa=fuse, out=poisoned)
    assert torch.isfinite(out).all()
    ref = lora_linear_reference(x.double(), w.double(), a.double(), b.double(), 0.7, bb.double())
    assert _rel(out, ref) < 1e-5


def test_torch_backend_is_the_reference(rng):
    x, w, a, b, bb = _problem((3, 11), 45, 37, 5, True, rng)
    out = lora_linear(x, w, a, b, 0.3, bb, backend="torch")
    ref = lora_linear_reference(x.double(), w.double(), a.double(), b.double(), 0.3, bb.double())
    assert _rel(out, ref) < 1e-6


@TRITON
@pytest.mark.parametrize("r", [6, 40])  # 40: two column blocks of H (block_r 32), the second partial
def test_multi_adapter_rows_use_their_own_adapter(r, rng):
    n, K, N = 3, 45, 37
    x = torch.randn(2, 19, K, generator=rng).to(DEV)
    w = torch.randn(N, K, generator=rng).to(DEV) / 7
    a = torch.randn(n, r, K, generator=rng).to(DEV) / 7
    b = torch.randn(n, N, r, generator=rng).to(DEV) / 3
    idx = torch.randint(0, n, (2, 19), generator=rng).to(DEV)
    scales = [0.5, 1.0, 2.0]
    bias = torch.randn(N, generator=rng).to(DEV)
    out = lora_linear_multi(x, w, a, b, idx, scales, bias, backend="triton")
    ref = lora_linear_multi_reference(x.double(), w.double(), a.double(), b.double(), idx, torch.tensor(scales), bias.double())
    assert _rel(out, ref) < 1e-5
    for j in range(n):  # each row equals the single-adapter op with its adapter
        rows = idx == j
        single = lora_linear_reference(x[rows].double(), w.double(), a[j].double(), b[j].double(), scales[j], bias.double())
        assert _rel(out[rows], single) < 1e-5


def test_multi_adapter_under_autograd_uses_the_reference(rng):
    x = torch.randn(7, 20, generator=rng, requires_grad=True)
    w, a, b = torch.randn(9, 20), torch.randn(2, 3, 20), torch.randn(2, 9, 3)
    idx = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    out = lora_linear_multi(x, w, a, b, idx, [1.0, 0.5])
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("args, words", [
    (dict(x=torch.randn(3, 8), weight=torch.randn(5, 7)), "features"),
    (dict(lora_a=torch.randn(2, 9)), "lora_a"),
    (dict(lora_b=torch.randn(5, 3)), "lora_b"),
    (dict(bias=torch.randn(4)), "bias"),
    (dict(weight=torch.randn(5, 8, dtype=torch.float64)), "weight is torch.float64"),
])
def test_bad_shapes_are_named(args, words):
    base = dict(x=torch.randn(3, 8), weight=torch.randn(5, 8), lora_a=torch.randn(2, 8), lora_b=torch.randn(5, 2), bias=None)
    base.update(args)
    with pytest.raises(ValueError, match=words):
        lora_linear(base["x"], base["weight"], base["lora_a"], base["lora_b"], 1.0, base["bias"])


_RULE_KEYS = {"dtypes", "precision", "aligned", "min_rows", "min_n", "max_rank", "block_m", "block_n", "block_k",
              "group_m", "num_warps", "num_stages", "fuse_xa_max_rank", "block_r", "min_block_r"}


def _gpu_tables(table):
    return {k: v for k, v in table.items() if isinstance(v, list) and not k.startswith(("_", "interpreter")) and k != "reduction"}


def test_configs_are_data():
    """Every device table is well formed and serves every dtype x precision x alignment (its last rule takes the rest)."""
    pytest.importorskip("triton")
    from hello_fast.kernels import lora_linear as K

    with open(os.path.join(os.path.dirname(K.__file__), "configs", "lora_linear.json")) as f:
        table = json.load(f)
    assert {"interpreter", "default", "NVIDIA H200", "reduction"} <= set(table)
    assert set(table["_device_arch"]) <= set(table)
    for device, rules in {**_gpu_tables(table), "interpreter": table["interpreter"]}.items():
        for rule in rules:
            assert set(rule) <= _RULE_KEYS, f"{device}: unknown keys {set(rule) - _RULE_KEYS}"
            assert all(rule[k] >= 16 and rule[k] & (rule[k] - 1) == 0 for k in ("block_m", "block_n", "block_k", "block_r"))
            assert 16 <= rule.get("min_block_r", 16) <= rule["block_r"]
            assert set(rule.get("dtypes", [])) <= {"float32", "float16", "bfloat16"}
            assert rule.get("precision", "tf32") in ("tf32", "ieee")
        assert not set(rules[-1]) & {"dtypes", "precision", "aligned", "min_rows", "min_n", "max_rank"}, f"{device}: no catch-all"
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
                for aligned in (True, False):
                    rule = next(r for r in rules if K._matches(r, 256, 1000, 128, dtype, precision, aligned))
                    if dtype != torch.float32 or precision == "tf32":  # the fast paths have rules of their own
                        assert rule is not rules[-1] or device == "interpreter", (device, dtype, precision, aligned)
    assert not set(table["reduction"][-1]) & {"precision"} and table["reduction"][0]["precision"] == "ieee"


def test_unaligned_operands_get_their_own_tile(monkeypatch):
    pytest.importorskip("triton")
    from hello_fast.kernels import lora_linear as K

    x = torch.empty(64, 1024, dtype=torch.bfloat16)
    assert K._aligned(x, torch.empty(1000, 1024, dtype=torch.bfloat16))
    assert not K._aligned(torch.empty(64, 1000, dtype=torch.bfloat16))  # row stride 1000: Triton cannot vectorise
    assert not K._aligned(x.view(-1)[1:].view(-1)[: 64 * 1000].view(64, 1000))  # base pointer 2 bytes off
    assert K._aligned(x.t())  # strides (1, 1024)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tables (nothing is launched)
    monkeypatch.setattr(K, "_device_facts", lambda device: ("NVIDIA H200", 132))
    cpu = torch.device("cpu")
    aligned = K.config_for(cpu, 8192, 1000, 1024, 128, torch.bfloat16, "tf32", True)
    unaligned = K.config_for(cpu, 8192, 1000, 1000, 128, torch.bfloat16, "tf32", False)
    assert aligned["block_n"] == 256 and aligned.get("aligned") is True
    assert unaligned.get("aligned") is False and unaligned["block_m"] * unaligned["block_n"] < aligned["block_m"] * aligned["block_n"]


def _set_fp32_precision(value):
    """Set torch's fp32 matmul precision through the newest switch this torch has; returns a restore function."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = value
        return lambda: setattr(matmul, "fp32_precision", old)
    old = matmul.allow_tf32
    matmul.allow_tf32 = value == "tf32"
    return lambda: setattr(matmul, "allow_tf32", old)


@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_fp32_precision_follows_torch_and_16_bit_inputs_use_tf32(setting, monkeypatch):
    pytest.importorskip("triton")
    from hello_fast.kernels import lora_linear as K

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the rule for GPUs (the interpreter always computes exactly)
    restore = _set_fp32_precision(setting)
    try:
        assert K.precision_for(torch.float32) == setting
        assert K.precision_for(torch.float32, torch.float32) == setting  # tn on two fp32 operands
        assert K.precision_for(torch.bfloat16) == "tf32" and K.precision_for(torch.float32, torch.float16) == "tf32"
    finally:
        restore()


def test_fp32_precision_follows_the_legacy_switch(monkeypatch):
    pytest.importorskip("triton")
    from hello_fast.kernels import lora_linear as K

    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", "none") != "none":
        pytest.skip("the new fp32_precision switch is set in this process; the legacy flag is not consulted")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    old = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert K._tf32_allowed() and K.precision_for(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert K.precision_for(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = old


def test_fp32_with_ieee_precision_runs_cublas_unless_triton_is_named(monkeypatch):
    pytest.importorskip("triton")
    op = importlib.import_module("hello_fast.ops.lora_linear")  # the module (hello_fast.ops exports the function)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("HELLO_FAST_BACKEND", raising=False)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)

    def pick(requested, x):  # what the op launches: the shared dispatcher over the op's order for x
        return _backend.choose("lora_linear", requested, x.device, op._offered(x))

    restore = _set_fp32_precision("ieee")
    try:
        assert pick(None, on_gpu) == "torch"
        assert pick("triton", on_gpu) == "triton"
        monkeypatch.setenv("HELLO_FAST_BACKEND", "triton")
        assert pick(None, on_gpu) == "triton"
        monkeypatch.delenv("HELLO_FAST_BACKEND")
        assert pick(None, types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)) == "triton"
    finally:
        restore()
    restore = _set_fp32_precision("tf32")
    try:
        assert pick(None, on_gpu) == "triton"
    finally:
        restore()


@TRITON
def test_projector_head_runs_through_the_op(monkeypatch, rng):
    from hello_fast.projector.lora import LoRALinear

    layer = LoRALinear(torch.randn(37, 45, generator=rng), None, rank=5)
    with torch.no_grad():
        layer.lora_b.normal_(generator=rng)
    x = torch.randn(4, 45, generator=rng).to(DEV)
    layer = layer.to(DEV)
    monkeypatch.setenv("HELLO_FAST_BACKEND", "triton")
    y = layer(x)
    ref = lora_linear_reference(x.double(), layer.base_weight.double(), layer.lora_a.double(), layer.lora_b.double(), layer.scale)
    assert _rel(y, ref) < 1e-5
    layer.merge()
    assert _rel(layer(x), ref) < 1e-5


@gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_gpu_half_precision(dtype, tol, rng):
    x, w, a, b, bb = _problem((517,), 1024, 1000, 128, True, rng, device="cuda", dtype=dtype)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = lora_linear(x, w, a, b, 1.0, bb, backend="triton")
    g = torch.randn(out.shape, device="cuda", dtype=dtype)
    grads = torch.autograd.grad(out, [x, a, b], g)
    p64 = [t.detach().double().requires_grad_(True) for t in (x, a, b)]
    ref = lora_linear_reference(p64[0], w.double(), p64[1], p64[2], 1.0, bb.double())
    ref_grads = torch.autograd.grad(ref, p64, g.double())
    plain = lora_linear_reference(x.detach(), w, a.detach(), b.detach(), 1.0, bb)  # PyTorch in the same precision
    assert _rel(out, ref) <= max(tol, 2 * _rel(plain, ref))
    for g_, r_ in zip(grads, ref_grads):
        assert _rel(g_, r_) < 5 * tol
