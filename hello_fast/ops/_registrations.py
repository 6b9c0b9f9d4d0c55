"""Fake (meta) and autograd registrations of the csrc ops, so they trace under torch.compile."""
from __future__ import annotations

import torch

from hello_fast._limits import DTYPE_CODES, MAX_VIEWS

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
    def _(src, index, crop, flip, partner, lam, cut, mode, out_size, mean, std, dtypes, channels_last, shuffle=None):
        torch._check(1 <= len(dtypes) <= MAX_VIEWS, lambda: f"augment_mix: at most {MAX_VIEWS} views, got {len(dtypes)}")
        B = index.shape[0]
        if shuffle is not None:
            torch._check(shuffle.dim() == 3 and shuffle.shape[0] == B and shuffle.shape[1] == 2,
                         lambda: f"augment_mix: shuffle must be (B, 2, factor), got {tuple(shuffle.shape)}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        codes = {v: k for k, v in DTYPE_CODES.items()}
        return [torch.empty((B, 3, out_size, out_size), dtype=codes[d], device=src.device, memory_format=fmt) for d in dtypes]
