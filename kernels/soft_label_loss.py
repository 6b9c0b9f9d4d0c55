"""Triton kernel of soft_label_loss: one program per row, the loss terms and (optionally) the gradient in two passes.

Pass 1 gathers the row's statistics with an online max/sum over chunks (log-sum-exp of s/T, t/T
and s); pass 2 accumulates the loss terms and writes d loss / d s. Per-row terms land in a
(B, 2) buffer summed afterwards. The reference and the contract are in hello_fast.ops.soft_label_loss.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _lse(X, C, k, BLOCK_C: tl.constexpr):
    """log(sum(exp(x * k))) of one row, online over chunks."""
    offs = tl.arange(0, BLOCK_C)
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(X + c0 + offs, mask=c0 + offs < C, other=-float("inf")).to(tl.float32) * k
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _soft_label_loss_kernel(
    S, T, HARD, PARTNER, LAM, ROWS, GRAD,
    B, C, s_row, t_row, g_row,
    inv_t, beta, grad_scale_mse, grad_scale_kl, grad_scale_ce,
    KL: tl.constexpr, HAS_TARGET: tl.constexpr, WITH_CE: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    s_ptr = S + b * s_row
    t_ptr = T + b * t_row
    offs = tl.arange(0, BLOCK_C)
    lse_s = 0.0
    lse_t = 0.0
    lse_1 = 0.0
    if HAS_TARGET and KL:
        lse_s = _lse(s_ptr, C, inv_t, BLOCK_C)
        lse_t = _lse(t_ptr, C, inv_t, BLOCK_C)
    if WITH_CE:
        lse_1 = _lse(s_ptr, C, 1.0, BLOCK_C)
        h = tl.load(HARD + b)
        pb = tl.load(PARTNER + b)
        p_ok = (pb >= 0) & (pb < B)
        hp = tl.load(HARD + pb, mask=p_ok, other=-1)
        lam = tl.load(LAM + b)
        # labels or partner out of range (the op checks them; C++ callers may not): NaN terms and gradient
        # for the row and no read outside the inputs, as the CUDA kernel does
        labels_ok = p_ok & (h >= 0) & (h < C) & (hp >= 0) & (hp < C)
    main = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        ok = cols < C
        s = tl.load(s_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_TARGET:
            t = tl.load(t_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            if KL:
                p = tl.where(ok, tl.exp(t * inv_t - lse_t), 0.0)
                q = tl.where(ok, tl.exp(s * inv_t - lse_s), 0.0)
                main += tl.sum(p * (t - s), 0) * inv_t
                g = (q - p) * grad_scale_kl
            else:
                d = tl.where(ok, s - t, 0.0)
                main += tl.sum(d * d, 0)
                g = d * grad_scale_mse
        if WITH_CE:
            sm = tl.where(ok, tl.exp(s - lse_1), 0.0)
            onehot = tl.where(cols == h, lam, 0.0) + tl.where(cols == hp, 1.0 - lam, 0.0)
            g += (sm - onehot) * grad_scale_ce
            g = tl.where(labels_ok, g, float("nan"))
        if WITH_GRAD:
            tl.store(GRAD + b * g_row + cols, g.to(GRAD.dtype.element_ty), mask=ok)
    if HAS_TARGET and KL:
        main += lse_s - lse_t  # sum p (t - s)/T - lse_t + lse_s, with sum p = 1
    ce = 0.0
    if WITH_CE:
        s_h = tl.load(s_ptr + h, mask=labels_ok, other=float("nan")).to(tl.float32)
        s_hp = tl.load(s_ptr + hp, mask=labels_ok, other=float("nan")).to(tl.float32)
        main = tl.where(labels_ok, main, float("nan"))
        ce = lam * (lse_1 - s_h) + (1.0 - lam) * (lse_1 - s_hp)
    tl.store(ROWS + b * 2, main)
    tl.store(ROWS + b * 2 + 1, ce)


def soft_label_loss(student, target, hard, partner, lam, mode, temperature, beta, with_grad):
    """(loss float32 scalar, grad or None) of one batch; inputs already checked by the op."""
    B, C = student.shape
    s = student.contiguous()
    t = target.contiguous().to(s.dtype) if target is not None else s
    rows = torch.empty((B, 2), device=s.device, dtype=torch.float32)
    grad = torch.empty_like(s) if with_grad else rows
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # at most 8 classes per thread (2048 x 8 warps): spill-free for sm_80/sm_90 in every mode
    # (benchmarks/gpu_static.py; 4096 classes per program spilled). Large blocks in the interpreter.
    block = min(triton.next_power_of_2(C), 16384 if interpreting else 2048)
    inv_t = 1.0 / float(temperature)
    _soft_label_loss_kernel[(B,)](
        s, t, hard, partner, lam, rows, grad,
        B, C, s.stride(0), t.stride(0), grad.stride(0),
        inv_t, float(beta), 2.0 / (B * C), inv_t / B, float(beta) / B,
        KL=mode == "kl", HAS_TARGET=target is not None, WITH_CE=beta != 0, WITH_GRAD=with_grad, BLOCK_C=block,
        num_warps=4 if block <= 1024 else 8,
    )
    main = rows[:, 0].sum() / (B * C if mode == "mse" else B)
    loss = main + float(beta) * rows[:, 1].sum() / B
    return loss, (grad if with_grad else None)
