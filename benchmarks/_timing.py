"""Timing helpers for the GPU benchmarks: median of CUDA-event timings after warm-up (triton.testing.do_bench)."""
from __future__ import annotations

import time

import torch


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn() in milliseconds: CUDA events on a GPU, a wall clock after synchronisation on the CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return times[len(times) // 2]


def peak_memory_mb(fn) -> float:
    """Peak device memory allocated while fn() runs, in MiB (GPU only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
