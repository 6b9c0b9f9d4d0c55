"""Fake (meta) and autograd registrations of the csrc ops, so they trace under torch.compile."""
from __future__ import annotations

import torch

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    @torch.library.register_fake("hello_fast::soft_label_loss")
    def _(student, target, hard, partner, lam, mode, temperature, beta):
        return student.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("hello_fast::soft_label_loss_with_grad")
    def _(student, target, hard, partner, lam, mode, temperature, beta):
        return student.new_empty((), dtype=torch.float32), torch.empty_like(student)

    @torch.library.register_fake("hello_fast::augment_mix")
    def _(src, index, crop, flip, partner, lam, cut, mode, out_size, mean, std, dtypes, channels_last):
        from hello_fast.ops.augment_mix import DTYPE_CODES

        B = index.shape[0]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        codes = {v: k for k, v in DTYPE_CODES.items()}
        views = [torch.empty((B, 3, out_size, out_size), dtype=codes[d], device=src.device, memory_format=fmt) for d in dtypes]
        return views, torch.empty((B,), dtype=torch.float32, device=src.device)
