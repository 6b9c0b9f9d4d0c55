"""The fused LoRA linear op against the base GEMM alone and the unfused PyTorch expression (GPU).

    python benchmarks/bench_lora.py [--dtype bf16] [--quick] [--out DIR]

Shapes: the projector head (rows 256-8192, K 1024, N 1000, r 128), ViT-B linears (rows 256*197,
K 768, N 768 / 3072, r 8) and 4096^3 at r 16. For each: forward time of (a) x @ W^T alone,
(b) unfused PyTorch `F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)` (peft's expression),
(c) the same with an fp32 x A^T (this package's reference), (d) the fused Triton kernel; and
forward+backward of (b) and (d). Writes results/lora_linear.json and .csv with the device,
versions and date. Needs a CUDA device: without one it measures nothing and says so.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _results, _timing  # noqa: E402

SHAPES = (
    [("head", rows, 1024, 1000, 128) for rows in (256, 1024, 4096, 8192)]
    + [("vit-b qkv/proj", 256 * 197, 768, 768, 8), ("vit-b mlp", 256 * 197, 768, 3072, 8), ("square", 4096, 4096, 4096, 16)]
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peft_expression(x, w, a, b, s, bias):
    return F.linear(x, w, bias) + s * F.linear(F.linear(x, a), b)


def measure(name, M, K, N, r, dtype, quick):
    from hello_fast.ops import lora_linear, lora_linear_reference

    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
    a = (torch.randn(r, K, device=dev) / K**0.5).to(dtype)
    b = (torch.randn(N, r, device=dev) / r**0.5).to(dtype)
    bias = torch.randn(N, device=dev, dtype=dtype)
    s = 0.5
    rep = 40 if quick else 200
    t = {
        "base_gemm_ms": _timing.median_ms(lambda: x @ w.t(), rep_ms=rep),
        "unfused_ms": _timing.median_ms(lambda: peft_expression(x, w, a, b, s, bias), rep_ms=rep),
        "reference_fp32_xa_ms": _timing.median_ms(lambda: lora_linear_reference(x, w, a, b, s, bias), rep_ms=rep),
        "fused_ms": _timing.median_ms(lambda: lora_linear(x, w, a, b, s, bias, backend="triton"), rep_ms=rep),
    }
    xg, ag, bg = (t_.clone().requires_grad_(True) for t_ in (x, a, b))
    dy = torch.randn(M, N, device=dev, dtype=dtype)

    def fb_unfused():
        torch.autograd.grad(peft_expression(xg, w, ag, bg, s, bias), [xg, ag, bg], dy)

    def fb_fused():
        torch.autograd.grad(lora_linear(xg, w, ag, bg, s, bias, backend="triton"), [xg, ag, bg], dy)

    t["unfused_fwd_bwd_ms"] = _timing.median_ms(fb_unfused, rep_ms=rep)
    t["fused_fwd_bwd_ms"] = _timing.median_ms(fb_fused, rep_ms=rep)
    err = ((lora_linear(x, w, a, b, s, bias, backend="triton").double() - lora_linear_reference(
        x.double(), w.double(), a.double(), b.double(), s, bias.double())).norm() / peft_expression(
        x.double(), w.double(), a.double(), b.double(), s, bias.double()).norm()).item()
    flops = 2 * M * K * N + 2 * M * r * (K + N)
    row = {
        "shape": name, "rows": M, "K": K, "N": N, "r": r, "dtype": str(dtype).split(".")[-1],
        **{k: round(v, 4) for k, v in t.items()},
        "fused_over_base": round(t["fused_ms"] / t["base_gemm_ms"], 3),
        "unfused_over_fused": round(t["unfused_ms"] / t["fused_ms"], 3),
        "fwd_bwd_unfused_over_fused": round(t["unfused_fwd_bwd_ms"] / t["fused_fwd_bwd_ms"], 3),
        "fused_tflops": round(flops / t["fused_ms"] / 1e9, 1),
        "fused_rel_error_vs_fp64": err,
    }
    print(f"{name:<16} rows {M:>6} K {K:>4} N {N:>4} r {r:>3}: base {t['base_gemm_ms']:.3f} ms, unfused {t['unfused_ms']:.3f}, "
          f"fused {t['fused_ms']:.3f} ({row['fused_over_base']:.2f}x base, {row['unfused_over_fused']:.2f}x faster than unfused); "
          f"fwd+bwd {row['fwd_bwd_unfused_over_fused']:.2f}x")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--out", default=_results.RESULTS_DIR)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora: no CUDA device here; nothing measured (the Triton kernel's speed needs a GPU)")
        return 0
    shapes = SHAPES[:2] + SHAPES[4:5] if args.quick else SHAPES
    rows = [measure(*shape, DTYPES[args.dtype], args.quick) for shape in shapes]
    goals = {
        "forward_over_base_gemm_max": 1.10, "forward_speedup_over_unfused_min": 1.3, "fwd_bwd_speedup_over_unfused_min": 1.2,
    }
    paths = _results.write("lora_linear", rows, extra={"goals": goals})
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
