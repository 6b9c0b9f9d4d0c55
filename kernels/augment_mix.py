"""Triton kernel of augment_mix: (ShufflePatches,) crop + bilinear resize + flip + CutMix/Mixup + up to 4 normalised views, one pass.

Each program writes BLOCK output pixels (all 3 channels, every view) of one sample. A pixel's
source sample is the sample itself or, inside its CutMix box, its partner; Mixup blends both.
Bilinear taps follow F.interpolate(align_corners=False) in fp32; with ShufflePatches each tap's
row and column go through the sample's strip maps (hello_fast.ops.augment_mix.strip_source_index).
The reference and the contract are in hello_fast.ops.augment_mix.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from hello_fast._limits import MAX_VIEWS, strip_source_index  # MAX_VIEWS: enforced by the dispatcher



@triton.jit
def _taps(INDEX, CROP, FLIP, ROWS, COLS, smp, oy, ox, out_f, out_size, s_n, s_h, s_w, rows_n, cols_n, mask,
          SHUFFLE: tl.constexpr):
    """Where the 4 bilinear taps of output pixel (oy, ox) of sample(s) smp (vectors) sit in SRC, and their weights.

    Returns (image offset (int64), row offsets r0/r1, column offsets c0/c1 (int32), ly, lx), computed once
    for the 3 channels. SHUFFLE: the crop is of the sample's ShufflePatches image; its row y is source row
    ROWS[smp, y] (rows_n per sample), its column x source column COLS[smp, x]."""
    idx = tl.load(INDEX + smp, mask=mask, other=0)
    crop = CROP + smp * 4
    top = tl.load(crop + 0, mask=mask, other=0).to(tl.int32)
    left = tl.load(crop + 1, mask=mask, other=0).to(tl.int32)
    h = tl.load(crop + 2, mask=mask, other=1).to(tl.int32)
    w = tl.load(crop + 3, mask=mask, other=1).to(tl.int32)
    flip = tl.load(FLIP + smp, mask=mask, other=0) != 0
    oxx = tl.where(flip, out_size - 1 - ox, ox)
    sy = tl.maximum((h.to(tl.float32) / out_f) * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum((w.to(tl.float32) / out_f) * (oxx.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    ya = top + y0
    yb = top + tl.where(y0 < h - 1, y0 + 1, y0)
    xa = left + x0
    xb = left + tl.where(x0 < w - 1, x0 + 1, x0)
    if SHUFFLE:
        ya = tl.load(ROWS + smp * rows_n + ya, mask=mask, other=0)
        yb = tl.load(ROWS + smp * rows_n + yb, mask=mask, other=0)
        xa = tl.load(COLS + smp * cols_n + xa, mask=mask, other=0)
        xb = tl.load(COLS + smp * cols_n + xb, mask=mask, other=0)
    # only the image offset needs 64 bits (a large image set passes 2^31 bytes); one image's do not
    return idx * s_n, ya * s_h, yb * s_h, xa * s_w, xb * s_w, ly, lx


@triton.jit
def _bilinear(SRC, c, s_c, image, r0, r1, c0, c1, ly, lx, mask):
    """Bilinear value (float, 0-255) of channel c from the taps of _taps."""
    base = SRC + image + c * s_c
    p00 = tl.load(base + (r0 + c0), mask=mask, other=0).to(tl.float32)
    p01 = tl.load(base + (r0 + c1), mask=mask, other=0).to(tl.float32)
    p10 = tl.load(base + (r1 + c0), mask=mask, other=0).to(tl.float32)
    p11 = tl.load(base + (r1 + c1), mask=mask, other=0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * p00 + lx * p01) + ly * ((1.0 - lx) * p10 + lx * p11)


@triton.jit
def _store_view(OUT, NORM, v: tl.constexpr, value, b, c, oy, ox, o_n, o_c, o_h, o_w, mask):
    mean = tl.load(NORM + v * 6 + c)
    std = tl.load(NORM + v * 6 + 3 + c)
    y = (value / 255.0 - mean) / std
    tl.store(OUT + b * o_n + c * o_c + oy * o_h + ox * o_w, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _augment_mix_kernel(
    SRC, INDEX, CROP, FLIP, PARTNER, LAM, CUT, NORM, ROWS, COLS, OUT0, OUT1, OUT2, OUT3,
    out_size, s_n, s_c, s_h, s_w, rows_n, cols_n,
    o0_n, o0_c, o0_h, o0_w, o1_n, o1_c, o1_h, o1_w, o2_n, o2_c, o2_h, o2_w, o3_n, o3_c, o3_h, o3_w,
    MODE: tl.constexpr, NUM_VIEWS: tl.constexpr, SHUFFLE: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < out_size * out_size
    oy = pix // out_size
    ox = pix % out_size
    out_f = out_size * 1.0
    p = tl.load(PARTNER + b).to(tl.int32)
    own = tl.zeros((BLOCK,), dtype=tl.int32) + b
    if MODE == 2:  # cutmix: inside the box, pixels come from the partner
        t0 = tl.load(CUT + b * 4 + 0)
        l0 = tl.load(CUT + b * 4 + 1)
        b1 = tl.load(CUT + b * 4 + 2)
        r1 = tl.load(CUT + b * 4 + 3)
        inside = (oy >= t0) & (oy < b1) & (ox >= l0) & (ox < r1)
        own = tl.where(inside, p, own)
    img, r0, r1, c0, c1, ly, lx = _taps(INDEX, CROP, FLIP, ROWS, COLS, own, oy, ox, out_f, out_size, s_n, s_h, s_w,
                                        rows_n, cols_n, mask, SHUFFLE)
    if MODE == 1:  # mixup: the partner's taps too
        lam = tl.load(LAM + b)
        p_img, p_r0, p_r1, p_c0, p_c1, p_ly, p_lx = _taps(INDEX, CROP, FLIP, ROWS, COLS, tl.zeros((BLOCK,), dtype=tl.int32) + p,
                                                          oy, ox, out_f, out_size, s_n, s_h, s_w, rows_n, cols_n, mask, SHUFFLE)
    for c in tl.static_range(3):
        value = _bilinear(SRC, c, s_c, img, r0, r1, c0, c1, ly, lx, mask)
        if MODE == 1:
            value = lam * value + (1.0 - lam) * _bilinear(SRC, c, s_c, p_img, p_r0, p_r1, p_c0, p_c1, p_ly, p_lx, mask)
        _store_view(OUT0, NORM, 0, value, b, c, oy, ox, o0_n, o0_c, o0_h, o0_w, mask)
        if NUM_VIEWS > 1:
            _store_view(OUT1, NORM, 1, value, b, c, oy, ox, o1_n, o1_c, o1_h, o1_w, mask)
        if NUM_VIEWS > 2:
            _store_view(OUT2, NORM, 2, value, b, c, oy, ox, o2_n, o2_c, o2_h, o2_w, mask)
        if NUM_VIEWS > 3:
            _store_view(OUT3, NORM, 3, value, b, c, oy, ox, o3_n, o3_c, o3_h, o3_w, mask)


MODE_CODES = {"none": 0, "mixup": 1, "cutmix": 2}


@functools.lru_cache(maxsize=32)
def _norm_table(stats: tuple, device: torch.device) -> torch.Tensor:
    """The views' (mean, std) rows on the device, made once per (views, device): a host-to-device copy per
    launch would wait for the GPU's queued work every step."""
    return torch.tensor([[*m, *s] for m, s in stats], dtype=torch.float32, device=device)


def augment_mix(src, index, crop, flip, partner, lam, cut, mode, out_size, views, channels_last=False, shuffle=None):
    """Launch the kernel; `views` is [(mean[3], std[3], dtype)] (at most MAX_VIEWS), `shuffle` None or the strip
    orders int64 (B, 2, factor). Returns the views tuple."""
    B = index.shape[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs = [torch.empty((B, 3, out_size, out_size), device=src.device, dtype=d, memory_format=fmt) for _, _, d in views]
    norm = _norm_table(tuple((tuple(m), tuple(s)) for m, s, _ in views), src.device)
    padded = outs + [outs[0]] * (MAX_VIEWS - len(outs))
    strides = [s for o in padded for s in o.stride()]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # 2 pixels per thread (256 x 4 warps): every mode, view count, layout and ShufflePatches compiles without
    # spills for sm_80/89/90/100 (benchmarks/gpu_static.py); 4 per thread spilled with Mixup into channels-last
    # views. The interpreter's speed is set by the number of programs: large blocks there.
    block, warps = (16384, 4) if interpreting else (256, 4)
    block = min(block, triton.next_power_of_2(out_size * out_size))
    H, W = src.shape[-2:]
    if shuffle is not None:
        # the one rule for strip maps (hello_fast._limits), shared with every other backend
        rows = strip_source_index(shuffle[:, 0], H).to(torch.int32).contiguous()  # (B, H) source row of each row
        cols = strip_source_index(shuffle[:, 1], W).to(torch.int32).contiguous()  # (B, W)
    else:
        rows = cols = index  # unused
    grid = (B, triton.cdiv(out_size * out_size, block))
    _augment_mix_kernel[grid](
        src, index, crop, flip.view(torch.uint8), partner, lam, cut, norm, rows, cols, *padded,
        out_size, *src.stride(), H, W, *strides,
        MODE=MODE_CODES[mode], NUM_VIEWS=len(outs), SHUFFLE=shuffle is not None, BLOCK=block, num_warps=warps,
    )
    return tuple(outs)  # lam_eff is the dispatcher's (hello_fast.ops.augment_mix.effective_lam)
