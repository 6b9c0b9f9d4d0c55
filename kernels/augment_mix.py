"""Triton kernel of augment_mix: crop + bilinear resize + flip + CutMix/Mixup + up to 3 normalised views, one pass.

Each program writes BLOCK output pixels (all 3 channels, every view) of one sample. A pixel's
source sample is the sample itself or, inside its CutMix box, its partner; Mixup blends both.
Bilinear taps follow F.interpolate(align_corners=False) in fp32. The reference and the contract
are in hello_fast.ops.augment_mix.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_VIEWS = 3


@triton.jit
def _sample(SRC, INDEX, CROP, FLIP, smp, oy, ox, c, out_f, out_size, s_n, s_c, s_h, s_w, mask):
    """Bilinear value (float, 0-255) of channel c at output (oy, ox) of sample(s) smp (vectors)."""
    idx = tl.load(INDEX + smp, mask=mask, other=0)
    top = tl.load(CROP + smp * 4 + 0, mask=mask, other=0)
    left = tl.load(CROP + smp * 4 + 1, mask=mask, other=0)
    h = tl.load(CROP + smp * 4 + 2, mask=mask, other=1)
    w = tl.load(CROP + smp * 4 + 3, mask=mask, other=1)
    flip = tl.load(FLIP + smp, mask=mask, other=0) != 0
    oxx = tl.where(flip, out_size - 1 - ox, ox)
    sy = (h.to(tl.float32) / out_f) * (oy.to(tl.float32) + 0.5) - 0.5
    sx = (w.to(tl.float32) / out_f) * (oxx.to(tl.float32) + 0.5) - 0.5
    sy = tl.maximum(sy, 0.0)
    sx = tl.maximum(sx, 0.0)
    y0 = sy.to(tl.int64)
    x0 = sx.to(tl.int64)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = tl.where(y0 < h - 1, y0 + 1, y0)
    x1 = tl.where(x0 < w - 1, x0 + 1, x0)
    base = SRC + idx * s_n + c * s_c
    r0 = base + (top + y0) * s_h
    r1 = base + (top + y1) * s_h
    c0 = (left + x0) * s_w
    c1 = (left + x1) * s_w
    p00 = tl.load(r0 + c0, mask=mask, other=0).to(tl.float32)
    p01 = tl.load(r0 + c1, mask=mask, other=0).to(tl.float32)
    p10 = tl.load(r1 + c0, mask=mask, other=0).to(tl.float32)
    p11 = tl.load(r1 + c1, mask=mask, other=0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * p00 + lx * p01) + ly * ((1.0 - lx) * p10 + lx * p11)


@triton.jit
def _store_view(OUT, NORM, v: tl.constexpr, value, b, c, oy, ox, o_n, o_c, o_h, o_w, mask):
    mean = tl.load(NORM + v * 6 + c)
    std = tl.load(NORM + v * 6 + 3 + c)
    y = (value / 255.0 - mean) / std
    tl.store(OUT + b * o_n + c * o_c + oy * o_h + ox * o_w, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _augment_mix_kernel(
    SRC, INDEX, CROP, FLIP, PARTNER, LAM, CUT, NORM, OUT0, OUT1, OUT2,
    out_size, s_n, s_c, s_h, s_w,
    o0_n, o0_c, o0_h, o0_w, o1_n, o1_c, o1_h, o1_w, o2_n, o2_c, o2_h, o2_w,
    MODE: tl.constexpr, NUM_VIEWS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < out_size * out_size
    oy = pix // out_size
    ox = pix % out_size
    out_f = out_size * 1.0
    p = tl.load(PARTNER + b)
    own = tl.zeros((BLOCK,), dtype=tl.int64) + b
    if MODE == 2:  # cutmix: inside the box, pixels come from the partner
        t0 = tl.load(CUT + b * 4 + 0)
        l0 = tl.load(CUT + b * 4 + 1)
        b1 = tl.load(CUT + b * 4 + 2)
        r1 = tl.load(CUT + b * 4 + 3)
        inside = (oy >= t0) & (oy < b1) & (ox >= l0) & (ox < r1)
        own = tl.where(inside, p, own)
    for c in tl.static_range(3):
        value = _sample(SRC, INDEX, CROP, FLIP, own, oy, ox, c, out_f, out_size, s_n, s_c, s_h, s_w, mask)
        if MODE == 1:  # mixup
            lam = tl.load(LAM + b)
            other = _sample(SRC, INDEX, CROP, FLIP, tl.zeros((BLOCK,), dtype=tl.int64) + p, oy, ox, c, out_f, out_size,
                            s_n, s_c, s_h, s_w, mask)
            value = lam * value + (1.0 - lam) * other
        _store_view(OUT0, NORM, 0, value, b, c, oy, ox, o0_n, o0_c, o0_h, o0_w, mask)
        if NUM_VIEWS > 1:
            _store_view(OUT1, NORM, 1, value, b, c, oy, ox, o1_n, o1_c, o1_h, o1_w, mask)
        if NUM_VIEWS > 2:
            _store_view(OUT2, NORM, 2, value, b, c, oy, ox, o2_n, o2_c, o2_h, o2_w, mask)


MODE_CODES = {"none": 0, "mixup": 1, "cutmix": 2}


def augment_mix(src, index, crop, flip, partner, lam, cut, mode, out_size, views, channels_last=False):
    """Launch the kernel; `views` is [(mean[3], std[3], dtype)] (at most 3). Returns (views tuple, lam_eff)."""
    if len(views) > MAX_VIEWS:
        raise ValueError(f"augment_mix: the Triton kernel writes at most {MAX_VIEWS} views")
    B = index.shape[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs = [torch.empty((B, 3, out_size, out_size), device=src.device, dtype=d, memory_format=fmt) for _, _, d in views]
    norm = torch.tensor([[*m, *s] for m, s, _ in views], dtype=torch.float32, device=src.device)
    padded = outs + [outs[0]] * (MAX_VIEWS - len(outs))
    strides = [s for o in padded for s in o.stride()]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    block = 16384 if interpreting else 1024  # the interpreter's speed is set by the number of programs
    block = min(block, triton.next_power_of_2(out_size * out_size))
    grid = (B, triton.cdiv(out_size * out_size, block))
    _augment_mix_kernel[grid](
        src, index, crop, flip.view(torch.uint8), partner, lam, cut, norm, *padded,
        out_size, *src.stride(), *strides,
        MODE=MODE_CODES[mode], NUM_VIEWS=len(outs), BLOCK=block, num_warps=4,
    )
    if mode == "cutmix":
        area = (cut[:, 2] - cut[:, 0]) * (cut[:, 3] - cut[:, 1])
        lam_eff = 1.0 - area.to(torch.float32) / float(out_size * out_size)
    elif mode == "mixup":
        lam_eff = lam.clone()
    else:
        lam_eff = torch.ones(B, device=src.device, dtype=torch.float32)
    return tuple(outs), lam_eff
