"""The csrc ops' torch.library registrations: fake (meta) impls, autograd and the Triton kernels, so each is one op under torch.compile.

`hello_fast::augment_mix`, `soft_label_loss` and `soft_label_loss_with_grad` are declared by the
extension (csrc/ops/<op>.cpp), whose C++ kernels sit at the CPU and (when built with CUDA) CUDA
keys. Here, once the extension has been asked for:
- the schemas are declared from Python with the same text when the extension is absent (a test
  compares the two), so the ops exist on every install;
- fake implementations (shapes, dtypes and the invariants that need no data) for tracing;
- autograd at the ops' Autograd key: `soft_label_loss_with_grad` returns d loss / d student from
  the same pass, so its backward only scales it; `soft_label_loss` recomputes it the same way;
- the Triton launchers as the ops' CUDA kernels wherever the extension has no CUDA kernels (the
  role hello_fast.ops._backend gives Triton), so the Triton path is the same op on a GPU.
  `triton_serves_cuda()` says whether that registration was made; where the CUDA kernels own
  the key, Triton asked for by name runs through its launcher directly (eager; traced as Python
  under torch.compile).
The LoRA op, which has no C++ kernel, is declared with its Triton kernel in hello_fast.ops.lora_linear.
"""
from __future__ import annotations

import importlib.util

import torch

from hello_fast._limits import DTYPE_CODES, MAX_VIEWS

# the schemas of csrc/ops/augment_mix.cpp and soft_label_loss.cpp, declared here only where the extension is absent
SCHEMAS = {
    "augment_mix": "augment_mix(Tensor src, Tensor index, Tensor crop, Tensor flip, Tensor partner, Tensor lam, "
                   "Tensor cut, str mode, int out_size, float[] mean, float[] std, int[] dtypes, bool channels_last, "
                   "Tensor? shuffle=None) -> Tensor[]",
    "soft_label_loss": "soft_label_loss(Tensor student, Tensor? target, Tensor hard, Tensor partner, Tensor lam, "
                       "str mode, float temperature, float beta) -> Tensor",
    "soft_label_loss_with_grad": "soft_label_loss_with_grad(Tensor student, Tensor? target, Tensor hard, "
                                 "Tensor partner, Tensor lam, str mode, float temperature, float beta) "
                                 "-> (Tensor, Tensor)",
}
_VIEW_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

_done = False
_triton_cuda = False
_cuda_kernels = False
_library = None  # the Python fragment of the hello_fast namespace (kept alive: dropping it removes its registrations)


def cuda_kernels_built() -> bool:
    """Whether the loaded extension has CUDA kernels (asked once, at registration: a plain bool is free to trace)."""
    return _cuda_kernels


def triton_serves_cuda() -> bool:
    """Whether the Triton launchers are the CUDA kernels of augment_mix and soft_label_loss(_with_grad) here."""
    return _triton_cuda


def register(ext) -> None:
    """Register everything above once; `ext` is the loaded extension module or None."""
    global _done, _triton_cuda, _cuda_kernels, _library
    if _done:
        return
    _done = True
    _cuda_kernels = ext is not None and bool(ext.cuda_built())
    _library = torch.library.Library("hello_fast", "FRAGMENT")
    if ext is None:
        for schema in SCHEMAS.values():
            _library.define(schema)
    _register_fakes()
    _register_autograd()
    if not _cuda_kernels and importlib.util.find_spec("triton") is not None:
        for name, kernel in (("augment_mix", _augment_mix_triton), ("soft_label_loss", _soft_label_loss_triton),
                             ("soft_label_loss_with_grad", _soft_label_loss_with_grad_triton)):
            _library.impl(name, kernel, "CUDA")
        _triton_cuda = True


def _register_fakes() -> None:
    def check_loss(student, target, hard, partner, lam):
        torch._check(student.dim() == 2, lambda: f"soft_label_loss: student must be (B, C), got {tuple(student.shape)}")
        B = student.shape[0]
        if target is not None:
            torch._check(target.shape == student.shape, lambda: "soft_label_loss: target and student shapes differ")
        for name, t in (("hard", hard), ("partner", partner), ("lam", lam)):
            torch._check(t.dim() == 1 and t.shape[0] == B, lambda: f"soft_label_loss: {name} must be ({B},)")

    @torch.library.register_fake("hello_fast::soft_label_loss")
    def _(student, target, hard, partner, lam, mode, temperature, beta):
        check_loss(student, target, hard, partner, lam)
        return student.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("hello_fast::soft_label_loss_with_grad")
    def _(student, target, hard, partner, lam, mode, temperature, beta):
        check_loss(student, target, hard, partner, lam)
        return student.new_empty((), dtype=torch.float32), torch.empty_like(student)

    @torch.library.register_fake("hello_fast::augment_mix")
    def _(src, index, crop, flip, partner, lam, cut, mode, out_size, mean, std, dtypes, channels_last, shuffle=None):
        torch._check(1 <= len(dtypes) <= MAX_VIEWS, lambda: f"augment_mix: at most {MAX_VIEWS} views, got {len(dtypes)}")
        torch._check(len(mean) == len(std) == 3 * len(dtypes), lambda: "augment_mix: 3 means and 3 stds per view")
        B = index.shape[0]
        if shuffle is not None:
            torch._check(shuffle.dim() == 3 and shuffle.shape[0] == B and shuffle.shape[1] == 2,
                         lambda: f"augment_mix: shuffle must be (B, 2, factor), got {tuple(shuffle.shape)}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return [torch.empty((B, 3, out_size, out_size), dtype=_VIEW_DTYPES[d], device=src.device, memory_format=fmt)
                for d in dtypes]


def _register_autograd() -> None:
    def setup_with_grad(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def backward_with_grad(ctx, grad_loss, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        return (scaled_grad(grad, grad_loss),) + (None,) * 7

    torch.library.register_autograd("hello_fast::soft_label_loss_with_grad", backward_with_grad,
                                    setup_context=setup_with_grad)

    def setup_loss(ctx, inputs, output):
        ctx.save_for_backward(*(t for t in inputs[:5] if t is not None))
        ctx.has_target = inputs[1] is not None
        ctx.rest = inputs[5:]

    def backward_loss(ctx, grad_loss):
        # this form keeps no gradient: recompute it in one pass (the ops use _with_grad whenever grad is wanted)
        saved = list(ctx.saved_tensors)
        student, target = saved.pop(0), saved.pop(0) if ctx.has_target else None
        _, grad = torch.ops.hello_fast.soft_label_loss_with_grad(student, target, *saved, *ctx.rest)
        return (scaled_grad(grad, grad_loss),) + (None,) * 7

    torch.library.register_autograd("hello_fast::soft_label_loss", backward_loss, setup_context=setup_loss)


def scaled_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """d loss / d student given the gradient at the loss: the precomputed `grad` scaled by it (always multiplied:
    a shortcut for a gradient of 1 would read the value on the host, which no trace can do)."""
    return grad * grad_loss.to(grad.dtype)


def _augment_mix_triton(src, index, crop, flip, partner, lam, cut, mode, out_size, mean, std, dtypes, channels_last,
                        shuffle=None):
    from hello_fast.kernels import augment_mix as kern  # triton is an optional dependency

    views = [(mean[3 * v:3 * v + 3], std[3 * v:3 * v + 3], _VIEW_DTYPES[d]) for v, d in enumerate(dtypes)]
    return list(kern.augment_mix(src, index, crop, flip, partner, lam, cut, mode, out_size, views, channels_last,
                                 shuffle=shuffle))


def _soft_label_loss_with_grad_triton(student, target, hard, partner, lam, mode, temperature, beta):
    from hello_fast.kernels import soft_label_loss as kern  # triton is an optional dependency

    return tuple(kern.soft_label_loss(student, target, hard, partner, lam, mode, temperature, beta, True))


def _soft_label_loss_triton(student, target, hard, partner, lam, mode, temperature, beta):
    from hello_fast.kernels import soft_label_loss as kern  # triton is an optional dependency

    return kern.soft_label_loss(student, target, hard, partner, lam, mode, temperature, beta, False)[0]
