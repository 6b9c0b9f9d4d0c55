"""soft_label_loss forward+backward: the fused kernels against unfused PyTorch (time and, on a GPU, peak memory).

    python benchmarks/bench_loss.py [--quick] [--out DIR]

CPU (always): the `cpp` kernel against the torch reference on this machine's cores. GPU (when
CUDA is present): the Triton and CUDA kernels against the unfused PyTorch expression (log_softmax,
kl_div / mse_loss, mixed cross-entropy, autograd), time and peak memory over the forward and
backward. Shapes: (256, 1000) and (1024, 1000) logits, MSE and KL (T=4), beta 0.1.
Writes results/soft_label_loss_<device>.json and .csv.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import _results, _timing  # noqa: E402

SHAPES = ((256, 1000), (1024, 1000))


def _problem(B, C, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(B, C, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(B, C, generator=g) * 3).to(device=device, dtype=dtype)
    hard = torch.randint(0, C, (B,), generator=g).to(device)
    partner = torch.randperm(B, generator=g).to(device)
    lam = torch.rand(B, generator=g).to(device)
    return s, t, hard, partner, lam


def _step(backend, args, mode):
    from hello_fast.ops import soft_label_loss

    s = args[0]

    def run():
        loss = soft_label_loss(*args, mode=mode, temperature=4.0, beta=0.1, backend=backend)
        torch.autograd.grad(loss, [s])

    return run


def rows_for(device, backends, quick):
    rows = []
    for B, C in SHAPES:
        for mode in ("mse", "kl"):
            args = _problem(B, C, device)
            row = {"device": device, "batch": B, "classes": C, "mode": mode, "temperature": 4.0, "beta": 0.1}
            if device == "cpu":
                row["threads"] = torch.get_num_threads()
            for backend in backends:
                try:
                    fn = _step(backend, args, mode)
                    fn()
                except RuntimeError as e:
                    print(f"  {backend}: not available ({e})")
                    continue
                row[f"{backend}_ms"] = round(_timing.median_ms(fn, rep_ms=500 if quick else 2000), 4)
                if device == "cuda":
                    row[f"{backend}_peak_mib"] = round(_timing.peak_memory_mb(fn), 2)
            ref = row["torch_ms"]
            for backend in backends:
                if backend != "torch" and f"{backend}_ms" in row:
                    row[f"{backend}_speedup"] = round(ref / row[f"{backend}_ms"], 2)
                    if device == "cuda":
                        row[f"{backend}_memory_fraction"] = round(row[f"{backend}_peak_mib"] / row["torch_peak_mib"], 3)
            rows.append(row)
            print(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=_results.RESULTS_DIR)
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU comparison")
    args = ap.parse_args(argv)
    if not args.gpu_only:
        paths = _results.write("soft_label_loss_cpu", rows_for("cpu", ("torch", "cpp"), args.quick),
                               extra={"goal": "cpp >= 4x the torch reference"}, out_dir=args.out)
        print("wrote", *paths)
    if torch.cuda.is_available():
        goals = {"speedup_min": 2.0, "memory_fraction_max": 0.5}
        paths = _results.write("soft_label_loss_cuda", rows_for("cuda", ("torch", "triton", "cuda"), args.quick),
                               extra={"goals": goals}, out_dir=args.out)
        print("wrote", *paths)
    else:
        print("bench_loss: no CUDA device here; the GPU comparisons were not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
