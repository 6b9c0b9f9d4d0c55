"""The limits, codes and index rules every backend of the ops shares (the Python side of csrc/ops/limits.h)."""
from __future__ import annotations

import torch

MAX_VIEWS = 4  # augment_mix views: csrc/ops/limits.h kMaxViews; the Triton kernel's MAX_VIEWS
MAX_SHUFFLE_FACTOR = 64  # csrc/ops/limits.h kMaxShuffleFactor (the CUDA kernel checks a strip order in a 64-bit mask)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the csrc augment_mix op's view dtype codes
# the floating dtypes every backend of every op accepts (Triton, CUDA, C++ and the reference alike)
KERNEL_DTYPES = tuple(DTYPE_CODES)


def check_kernel_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    """The one dtype rule of the three ops, checked by each dispatcher before it picks a backend.

    Every kernel computes in float32, so a float64 input would silently lose its precision on one
    backend and keep it on the reference: float64 (and any other dtype) is refused for every
    backend with this one message, and never reaches a Triton or CUDA kernel. The references
    (`*_reference`) still take float64 directly: they are the tests' oracles.
    """
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16 (every backend computes in float32), "
                         f"got {dtype}")


def strip_source_index(order: torch.Tensor, size: int) -> torch.Tensor:
    """The source coordinate of each coordinate along one shuffled axis: int64 (..., size) for strip orders (..., F).

    The axis is cut into F strips of size // F (the last also takes the remainder); position k of
    the shuffled axis holds source strip order[..., k]. Every backend maps its taps by this rule.
    """
    F = order.shape[-1]
    t = size // F
    length = torch.full((F,), t, dtype=torch.long, device=order.device)
    length[-1] += size - F * t
    placed = length[order]  # the strips' lengths in their shuffled positions
    end = placed.cumsum(-1)
    y = torch.arange(size, device=order.device).expand(*order.shape[:-1], size).contiguous()
    k = torch.searchsorted(end, y, right=True)  # which shuffled strip each coordinate falls in
    start_here = end.gather(-1, k) - placed.gather(-1, k)
    return order.gather(-1, k) * t + (y - start_here)
