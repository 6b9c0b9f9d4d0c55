"""The LoRA linear op: y = x W^T + bias + scale * (x A^T) B^T (the peft convention), and its multi-adapter form.

`lora_linear(x, weight, lora_a, lora_b, scale, bias=None, backend=None)`: x (..., K) with any
leading dims and strides, weight (N, K), lora_a (r, K), lora_b (N, r), bias (N,) or None. The
x A^T intermediate and all accumulation are fp32; the output has x's dtype. Autograd gives
gradients for x, lora_a, lora_b, and bias/weight when they require them. Backends: "triton"
(one fused kernel, hello_fast.kernels.lora_linear) and "torch" (the reference below, also the
CPU fallback); HELLO_FAST_BACKEND prefers one. fp32 inputs follow torch's fp32 matmul setting: with
TF32 allowed the Triton kernel runs on TF32 tensor cores; with IEEE precision (torch's default)
tl.dot has no tensor cores: a CUDA-core FMA GEMM at a small tile (benchmarks/gpu_static.py: the larger
tiles spilled heavily; the 32x64 one still spills a few instructions in a few variants on sm_89, sm_90
and sm_100), so the op runs the
cuBLAS-backed reference unless Triton is asked for by name (`backend="triton"` or the env var).

`lora_linear_multi(x, weight, lora_a (n, r, K), lora_b (n, N, r), adapter_index (rows,), scales
(n,), bias=None)`: row m uses adapter adapter_index[m] (one backbone serving several label
artifacts in one batch).

Inputs are float32, float16 or bfloat16; float64 is refused for every backend with the message
the other ops use (hello_fast._limits.check_kernel_dtype), so it never reaches the Triton kernel,
whose accumulator is fp32. `lora_linear_reference` itself still computes float64 in float64 (the
tests' oracle).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from hello_fast._limits import check_kernel_dtype
from hello_fast.ops import _backend

_OFFERED = ("triton", "torch")


def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None):
    """The PyTorch expression (fp32 x A^T): the CPU fallback and the test oracle (in float64 on float64 inputs)."""
    y = F.linear(x, weight, bias)
    compute = torch.promote_types(x.dtype, torch.float32)
    h = F.linear(x.to(compute), lora_a.to(compute))
    return y + (scale * F.linear(h, lora_b.to(compute))).to(y.dtype)


def lora_linear_multi_reference(x, weight, lora_a, lora_b, adapter_index, scales, bias=None):
    y = F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    idx = adapter_index.reshape(-1)
    compute = torch.promote_types(x.dtype, torch.float32)
    delta = torch.zeros(x2.shape[0], weight.shape[0], device=x.device, dtype=compute)
    for j in range(lora_a.shape[0]):
        rows = (idx == j).nonzero()[:, 0]
        if rows.numel():
            h = F.linear(x2[rows].to(compute), lora_a[j].to(compute))
            delta[rows] = float(scales[j]) * F.linear(h, lora_b[j].to(compute))
    return y + delta.reshape(*lead, -1).to(y.dtype)


def _check(x, weight, lora_a, lora_b, bias):
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"lora_linear: x must be (..., K) and weight (N, K), got {tuple(x.shape)}, {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features, weight expects {K}")
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(f"lora_linear: lora_a must be (r, {K}), got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.shape != (N, r):
        raise ValueError(f"lora_linear: lora_b must be ({N}, {r}), got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lora_linear: bias must be ({N},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None:
            check_kernel_dtype("lora_linear", name, t.dtype)
    if weight.dtype != x.dtype:
        raise ValueError(f"lora_linear: weight is {weight.dtype} but x is {x.dtype}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device}, x on {x.device}")


def _triton_is_fast(dtype: torch.dtype) -> bool:
    """Whether the Triton kernel is the fast path on a GPU for inputs of `dtype` under torch's current
    fp32 matmul setting: not for fp32 with IEEE precision, where tl.dot has no tensor cores (a CUDA-core
    FMA GEMM at a small tile, which we judge slower than cuBLAS's SGEMM: not measured)."""
    from hello_fast.kernels import (
        lora_linear as kern,  # imports triton: only called once Triton is usable
    )

    return kern.precision_for(dtype) != "ieee"


def _offered(x: torch.Tensor) -> tuple[str, ...]:
    """The backends in order of preference for `x`: the reference (cuBLAS) first where Triton is not the fast
    path; the dispatcher still honours a backend asked for by name (`backend=` or the env var)."""
    if x.device.type == "cuda" and _backend.triton_usable(x.device) and not _triton_is_fast(x.dtype):
        return ("torch", "triton")
    return _OFFERED


# The Triton path as two torch.library ops, so torch.compile sees one node each (the reference is plain torch ops).
# Their kernel is Triton on every device (the GPU, or the CPU through the interpreter); the dispatcher below only
# calls them once it chose "triton". Schemas are spelled out: this module uses postponed annotations.
@torch.library.custom_op("hello_fast::lora_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias) -> Tensor")
def _lora_linear_op(x, weight, lora_a, lora_b, scale, bias):
    from hello_fast.kernels import lora_linear as kern  # triton is an optional dependency

    out = kern.fused(x.reshape(-1, x.shape[-1]), weight, lora_b, scale, a=lora_a, bias=bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_lora_linear_op.register_fake
def _(x, weight, lora_a, lora_b, scale, bias):
    N, K = weight.shape
    torch._check(x.shape[-1] == K, lambda: f"lora_linear: x has {x.shape[-1]} features, weight expects {K}")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == K, lambda: f"lora_linear: lora_a must be (r, {K})")
    torch._check(lora_b.dim() == 2 and lora_b.shape[0] == N and lora_b.shape[1] == lora_a.shape[0],
                 lambda: f"lora_linear: lora_b must be ({N}, r)")
    torch._check(weight.dtype == x.dtype, lambda: f"lora_linear: weight is {weight.dtype} but x is {x.dtype}")
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("hello_fast::lora_linear_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
                                "bool need_x, bool need_a, bool need_b) -> (Tensor, Tensor, Tensor)")
def _lora_linear_backward_op(dy, x, weight, lora_a, lora_b, scale, need_x, need_a, need_b):
    """(dx, dA, dB) of the Triton path for 2-D dy (rows, N) and x (rows, K); an unneeded one is empty (0,)."""
    from hello_fast.kernels import lora_linear as kern  # triton is an optional dependency

    dx, da, db = (dy.new_empty(0) for _ in range(3))  # three tensors: outputs must not alias each other
    # g = s * dy B (rows x r, fp32): the LoRA path's gradient at x A^T, accumulated in fp32 from strided views
    g = kern.tn(dy.t(), lora_b, scale) if (need_x or need_a) else None
    if need_x:
        # dx = dy W + g A: the forward kernel on dy with W^T, B' = A^T and the precomputed g
        dx = kern.fused(dy, weight.t(), lora_a.t(), 1.0, h=g)
    if need_a:
        da = kern.tn(g, x).to(lora_a.dtype)  # (r, K) = g^T x
    if need_b:
        h = kern.tn(x.t(), lora_a.t())  # x A^T (rows x r), recomputed in fp32
        db = kern.tn(dy, h, scale).to(lora_b.dtype)  # (N, r) = s dy^T (x A^T)
    return dx, da, db


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, scale, need_x, need_a, need_b):
    torch._check(dy.dim() == 2 and x.dim() == 2 and dy.shape[0] == x.shape[0],
                 lambda: "lora_linear_backward: dy (rows, N) and x (rows, K) must share their rows")
    return (x.new_empty(x.shape) if need_x else dy.new_empty(0), lora_a.new_empty(lora_a.shape) if need_a else dy.new_empty(0),
            lora_b.new_empty(lora_b.shape) if need_b else dy.new_empty(0))


def _setup_lora_linear(ctx, inputs, output):
    x, weight, lora_a, lora_b, scale, bias = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale = scale


def _lora_linear_backward(ctx, dy):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad
    x2d = x.reshape(-1, x.shape[-1])
    dy = dy.reshape(-1, weight.shape[0])
    dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)
    dx = dw = da = db = dbias = None
    if need_x or need_a or need_b:
        dx, da, db = torch.ops.hello_fast.lora_linear_backward(dy, x2d, weight, lora_a, lora_b, ctx.scale,
                                                               need_x, need_a, need_b)
        dx = dx.reshape(x.shape) if need_x else None
        da = da if need_a else None
        db = db if need_b else None
    if need_w:
        dw = torch.matmul(dy.t(), x2d).to(weight.dtype)
    if need_bias:
        dbias = dy.float().sum(0).to(dy.dtype)
    return dx, dw, da, db, None, dbias


_lora_linear_op.register_autograd(_lora_linear_backward, setup_context=_setup_lora_linear)


def lora_linear(x, weight, lora_a, lora_b, scale, bias=None, *, backend=None):
    """x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T with an fp32 LoRA intermediate.

    Any leading dims and strides for x; autograd for x, lora_a, lora_b (and weight, bias).
    `backend`: "triton", "torch" or None (the best available: Triton on CUDA tensors, except fp32 with
    IEEE precision, where cuBLAS runs the reference).
    """
    _check(x, weight, lora_a, lora_b, bias)
    name = _backend.choose("lora_linear", backend, x.device, _offered(x))
    if name == "torch":
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias)
    return torch.ops.hello_fast.lora_linear(x, weight, lora_a, lora_b, float(scale), bias)


def lora_linear_multi(x, weight, lora_a, lora_b, adapter_index, scales, bias=None, *, backend=None):
    """Several LoRA adapters on one base weight: row m of x uses adapter adapter_index[m].

    lora_a (n, r, K), lora_b (n, N, r), scales (n,) floats or a tensor, adapter_index int64 with
    x's leading shape. The Triton path is forward-only (serving); under autograd the reference runs.
    """
    N, K = weight.shape
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError("lora_linear_multi: lora_a must be (n, r, K) and lora_b (n, N, r)")
    n, r, _ = lora_a.shape
    _check(x, weight, lora_a[0], lora_b[0], bias)
    if adapter_index.shape != x.shape[:-1] or adapter_index.dtype != torch.long:
        raise ValueError(f"lora_linear_multi: adapter_index must be int64 of shape {tuple(x.shape[:-1])}")
    scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
    if scales.numel() != n:
        raise ValueError(f"lora_linear_multi: {scales.numel()} scales for {n} adapters")
    if adapter_index.numel() and (int(adapter_index.min()) < 0 or int(adapter_index.max()) >= n):
        raise IndexError(f"lora_linear_multi: adapter_index must lie in [0, {n})")
    name = _backend.choose("lora_linear_multi", backend, x.device, _offered(x))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, bias))
    if name == "torch" or grad:
        return lora_linear_multi_reference(x, weight, lora_a, lora_b, adapter_index, scales, bias)
    from hello_fast.kernels import lora_linear as kern

    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    idx = adapter_index.reshape(-1)
    # per-row fp32 H = s_j x A_j^T, one thin GEMM per adapter (n is small: a few label artifacts)
    h = torch.empty(x2d.shape[0], r, device=x.device, dtype=torch.float32)
    for j in range(n):
        rows = (idx == j).nonzero()[:, 0]
        if rows.numel():
            h[rows] = torch.matmul(x2d[rows].float(), lora_a[j].float().t()) * float(scales[j])
    out = kern.multi(x2d, weight, h, idx, lora_b, bias)
    return out.reshape(*lead, N)
