"""Fake (meta) and autograd registrations of the csrc ops, so they trace under torch.compile."""
from __future__ import annotations

import torch

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    lib = torch.ops.hello_fast

    @torch.library.register_fake("hello_fast::soft_label_loss")
    def _(student, target, hard, partner, lam, mode, temperature, beta):
        return student.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("hello_fast::soft_label_loss_backward")
    def _(grad, student, target, hard, partner, lam, mode, temperature, beta):
        return torch.empty_like(student)

    def _setup(ctx, inputs, output):
        student, target, hard, partner, lam, mode, temperature, beta = inputs
        ctx.save_for_backward(student, target, hard, partner, lam)
        ctx.mode, ctx.temperature, ctx.beta = mode, temperature, beta

    def _backward(ctx, grad):
        student, target, hard, partner, lam = ctx.saved_tensors
        g = lib.soft_label_loss_backward(grad, student, target, hard, partner, lam, ctx.mode, ctx.temperature, ctx.beta)
        return g, None, None, None, None, None, None, None

    torch.library.register_autograd("hello_fast::soft_label_loss", _backward, setup_context=_setup)
