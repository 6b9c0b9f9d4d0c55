"""The student's loss against online soft labels: MSE or temperature-KL, plus beta x mixed hard CE.

`soft_label_loss(student_logits, target_logits, hard, partner, lam, mode=, temperature=, beta=)`
returns `main + beta * ce`: main is the mean squared error over all elements ("mse", the paper's
Alg. 1 l.14) or KL(softmax(target/T) || softmax(student/T)) averaged over the batch ("kl",
kl_div "batchmean", no T^2 factor: the RDED/SRe2L practice); `ce` is the cross-entropy with the
hard labels mixed as the images were, `mean_b[lam_b CE(s_b, hard_b) + (1-lam_b) CE(s_b,
hard[partner_b])]`. `target_logits=None` keeps only the CE term (hard-label training). The
gradient flows to `student_logits` only.

One semantics for every backend (Triton, CUDA, C++, the reference): this module checks the
arguments once, before dispatching. Logits are float32, float16 or bfloat16 (float64 is refused:
every kernel computes in float32, and a float64 input would silently lose its precision);
`target_logits` is cast to the student's dtype; every backend computes in float32 and returns a
float32 loss; out-of-range hard labels and partners raise IndexError. The csrc ops keep
TORCH_CHECKs with the same limits for C++ callers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hello_fast._limits import check_kernel_dtype
from hello_fast.ops import _backend, _registrations

MODES = ("mse", "kl")
# preferred first; the dispatcher drops what this device cannot run (see _backend for the roles)
_OFFERED = _backend.CUDA_THEN_TRITON


def soft_label_loss_reference(student_logits, target_logits, hard, partner, lam, *, mode="mse", temperature=1.0, beta=0.0):
    """The PyTorch reference (fp32 math; fp64 for fp64 inputs, which only the tests' oracle passes): the CPU fallback
    and the test oracle."""
    compute = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(compute)
    main = s.new_zeros(())
    if target_logits is not None:
        t = target_logits.detach().to(compute)
        if mode == "mse":
            main = F.mse_loss(s, t)
        else:
            main = F.kl_div(
                F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                reduction="batchmean", log_target=True,
            )
    if beta == 0:
        return main
    logp = F.log_softmax(s, dim=1)
    lam = lam.to(compute)
    ce_own = -logp.gather(1, hard[:, None])[:, 0]
    ce_partner = -logp.gather(1, hard[partner][:, None])[:, 0]
    return main + beta * (lam * ce_own + (1 - lam) * ce_partner).mean()


def _check(student_logits, target_logits, hard, partner, lam, mode, temperature, beta):
    if mode not in MODES:
        raise ValueError(f"soft_label_loss: mode must be one of {MODES}, got {mode!r}")
    if student_logits.dim() != 2 or student_logits.numel() == 0:
        raise ValueError(f"soft_label_loss: student_logits must be a non-empty (B, C) tensor, got {tuple(student_logits.shape)}")
    check_kernel_dtype("soft_label_loss", "student_logits", student_logits.dtype)
    B, C = student_logits.shape
    if target_logits is not None:
        if target_logits.shape != student_logits.shape:
            raise ValueError(f"soft_label_loss: target_logits {tuple(target_logits.shape)} != student_logits {tuple(student_logits.shape)}")
        if not target_logits.is_floating_point():
            raise ValueError(f"soft_label_loss: target_logits must be floating point, got {target_logits.dtype}")
        if target_logits.device != student_logits.device:
            raise ValueError(f"soft_label_loss: target_logits is on {target_logits.device}, student_logits on {student_logits.device}")
    for name, t, dtype in (("hard", hard, torch.long), ("partner", partner, torch.long), ("lam", lam, torch.float32)):
        if t.shape != (B,) or t.dtype != dtype:
            raise ValueError(f"soft_label_loss: {name} must be {dtype} of shape ({B},), got {t.dtype} {tuple(t.shape)}")
        if t.device != student_logits.device:
            raise ValueError(f"soft_label_loss: {name} is on {t.device}, logits on {student_logits.device}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"soft_label_loss: temperature must be a positive finite number, got {temperature}")
    if not abs(beta) < float("inf"):
        raise ValueError(f"soft_label_loss: beta must be finite, got {beta}")
    if torch.compiler.is_compiling():
        # under torch.compile a host read would break the graph: the same bounds, asserted on the device
        ok = (hard.min() >= 0) & (hard.max() < C) & (partner.min() >= 0) & (partner.max() < B)
        torch._assert_async(ok, "soft_label_loss: hard labels must lie in [0, C) and partners in [0, B)")
        return
    # one device-to-host read for the four bounds (a sync per training step, not four)
    h_lo, h_hi, p_lo, p_hi = torch.stack([hard.min(), hard.max(), partner.min(), partner.max()]).tolist()
    if h_lo < 0 or h_hi >= C:
        raise IndexError(f"soft_label_loss: hard labels must lie in [0, {C}), got [{h_lo}, {h_hi}]")
    if p_lo < 0 or p_hi >= B:
        raise IndexError(f"soft_label_loss: partner must index batch rows [0, {B}), got [{p_lo}, {p_hi}]")


def soft_label_loss(student_logits, target_logits, hard, partner, lam, *, mode="mse", temperature=1.0, beta=0.0, backend=None):
    """Loss of `student_logits` (B, C) against online soft labels `target_logits` (B, C) or None.

    `hard` int64 (B,) class of each sample, `partner` int64 (B,) the row each sample was mixed
    with, `lam` float32 (B,) each sample's own share of the mix (1 for unmixed). Returns a float32
    scalar. `backend`: "cpp", "cuda", "triton", "torch" or None for the fastest available.
    """
    _check(student_logits, target_logits, hard, partner, lam, mode, temperature, beta)
    if target_logits is not None:  # every backend reads the target in the student's dtype
        target_logits = target_logits.detach().to(student_logits.dtype)
    name = _backend.choose("soft_label_loss", backend, student_logits.device, _OFFERED)
    if name == "torch":
        return soft_label_loss_reference(student_logits, target_logits, hard, partner, lam, mode=mode, temperature=temperature, beta=beta).float()
    args = (target_logits, hard, partner, lam, mode, float(temperature), float(beta))
    grad = torch.is_grad_enabled() and student_logits.requires_grad
    if name == "triton" and not (student_logits.device.type == "cuda" and _registrations.triton_serves_cuda()):
        # Triton beside the CUDA kernels, or in the interpreter: its launcher directly (the op's key is taken)
        if grad:
            return _TritonWithGrad.apply(student_logits, *args)
        return _triton(student_logits, *args, with_grad=False)[0]
    # the op: the C++ kernel of the device, or Triton where it is the op's CUDA kernel; autograd is the op's
    if grad:
        return torch.ops.hello_fast.soft_label_loss_with_grad(student_logits, *args)[0]
    return torch.ops.hello_fast.soft_label_loss(student_logits, *args)


def _triton(student, target, hard, partner, lam, mode, temperature, beta, with_grad):
    from hello_fast.kernels import (
        soft_label_loss as kern,  # triton is an optional dependency
    )

    return kern.soft_label_loss(student, target, hard, partner, lam, mode, temperature, beta, with_grad)


class _TritonWithGrad(torch.autograd.Function):
    """The Triton launcher called directly: the kernel computes d loss / d student in the forward pass (the
    exponentials are at hand); backward only scales it by the incoming gradient, as the op's autograd does."""

    @staticmethod
    def forward(ctx, student, target, hard, partner, lam, mode, temperature, beta):
        loss, grad = _triton(student, target, hard, partner, lam, mode, temperature, beta, with_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (_registrations.scaled_grad(grad, grad_output),) + (None,) * 7
