"""Static GPU report: every Triton kernel variant the package can launch, compiled ahead of time for real GPU architectures.

    python benchmarks/gpu_static.py [--arch 80 90 [100]] [--json FILE] [--quick] [--workers 2] [--strict] [--reach-arch 80 90]

No GPU is needed or used: each op's own launcher (hello_fast.kernels.*) runs on CPU tensors while
Triton compiles for the named architecture through a stand-in driver (benchmarks/_triton_aot.py),
and the ptxas/cuobjdump inside the triton wheel read each cubin. Variants: every rule of every
device table in kernels/configs/lora_linear.json x dtype x fp32 precision (TF32/IEEE), through
lora_linear's forward (rank 8 fused, rank 128 precomputed), backward and multi-adapter paths;
augment_mix modes x 1-4 views x NCHW/channels-last x view dtype; soft_label_loss MSE/KL with and
without the hard-label CE, CE alone, 10/100/1000/21843 classes, fp32/bf16 logits. The plain-CUDA
kernels of csrc/ops/cuda/*.cu are built with nvcc for sm_90 (rows `cuda:*`; `--cuda-arch 80 90`).

Then the dispatchers themselves (benchmarks/_reach.py): a grid of real calls through the public ops
(lora_linear forward and backward, lora_linear_multi, augment_mix, soft_label_loss) on the shapes of
the preset models, every dtype and precision, odd and aligned sizes, strided, misaligned and
channels-last operands, 1-4 views, every mode, runs on sm_80 and sm_90 (`--reach-arch`) through the
stand-in driver; every specialisation it reaches (_triton_aot.specialisation) that the matrix did not
compile is compiled and reported too, and the run prints
`reached N specialisations, compiled N, uncovered 0`; it exits 1 when a reached specialisation was
not compiled cleanly or breaks a limit (always, not only with --strict).

Prints a summary table (per kernel and architecture) and the variants that spill; `--json` writes
one row per launch (keys: kernel, arch, config, dtype, fast_path, registers, spills, smem_bytes,
smem_limit, tensor_core_instructions, vector_loads, error, roofline_us, problem, ...).
`--strict` exits 1 on a compile error, shared memory over the limit, a spill on a fast path or a
16-bit LoRA GEMM without tensor-core instructions. These are compile-time facts, not timings.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _reach, _triton_aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "gpu_static.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90 100")
    ap.add_argument("--json", default=None, help=f"write the rows here (the committed copy: {os.path.relpath(RESULT, ROOT)})")
    ap.add_argument("--quick", action="store_true", help="only the default fast path of each kernel")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cuda-arch", type=int, nargs="+", default=[90], help="architectures of the nvcc build of csrc/ops/cuda/*.cu")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc build of csrc/")
    ap.add_argument("--strict", action="store_true", help="exit 1 on any violation (see the module docstring)")
    ap.add_argument("--reach-arch", type=int, nargs="*", default=[80, 90],
                    help="architectures (among --arch) on which the dispatchers' grid of real calls is reached and "
                         "every specialisation it reaches is compiled (none: skip)")
    args = ap.parse_args(argv)
    unknown = [a for a in args.arch if a not in _triton_aot.SMEM_LIMIT]
    if unknown:
        ap.error(f"no shared-memory limit known for sm_{unknown[0]}; known: {sorted(_triton_aot.SMEM_LIMIT)}")
    reason = _triton_aot.api_missing()
    if reason:
        print(f"gpu_static: cannot compile ahead of time here: {reason}", file=sys.stderr)
        return 2
    version = _triton_aot.installed_triton()
    if version not in _triton_aot.PROVEN_TRITON:  # still compile: this run is how a new release is proven
        print(f"gpu_static: triton {version} is not among the proven releases ({', '.join(_triton_aot.PROVEN_TRITON)}); "
              "when this run is clean, add it to _triton_aot.PROVEN_TRITON and pyproject.toml's gpu-static extra",
              file=sys.stderr)

    scenarios = _triton_aot.enumerate_scenarios(args.arch, full=not args.quick)
    t0 = time.time()
    print(f"compiling {len(scenarios)} op calls for sm_{', sm_'.join(map(str, args.arch))} on {args.workers} workers ...",
          file=sys.stderr)

    def progress(done, total):
        print(f"\r  {done}/{total} ({time.time() - t0:.0f} s)", end="", file=sys.stderr, flush=True)

    rows = _triton_aot.compile_scenarios(scenarios, workers=args.workers, progress=progress)
    print(file=sys.stderr)
    reach_archs = [a for a in args.reach_arch if a in args.arch]
    reached: dict = {}
    if reach_archs:
        print(f"reaching the dispatchers' grid on sm_{', sm_'.join(map(str, reach_archs))}, compiling what the matrix "
              "did not ...", file=sys.stderr)
        reached, extra = _reach.coverage(reach_archs, full=not args.quick, known_rows=rows, compile_unknown=True,
                                         workers=args.workers)
        rows += extra
    if not args.no_cuda:
        for arch in args.cuda_arch:
            rows += _triton_aot.nvcc_resource_usage(sorted(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu"))),
                                                    arch=arch)
    for r in rows:
        r.setdefault("roofline_assumes", _triton_aot.ROOFLINE_ASSUMES if r.get("roofline_us") else None)
    elapsed = time.time() - t0

    print(_triton_aot.summary_table(rows))
    print()
    print(_triton_aot.slow_variants_table(rows))
    bad = _triton_aot.violations(rows)
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; {len(bad)} violation(s)")
    for line in bad:
        print("  " + line)
    missing = _reach.uncovered(reached, rows)
    if reach_archs:
        broken = sorted({line for r in rows if (r["arch"], r.get("specialisation")) in reached
                         for line in _triton_aot.violations([r])})
        print(f"reached {len(reached)} specialisations, compiled {len(reached) - len(missing)}, uncovered {len(missing)}"
              f" (sm_{', sm_'.join(map(str, reach_archs))})")
        for e in missing:
            print(f"  uncovered: {e['text']}\n    first reached by: {e['call']}")
        for line in broken:
            print(f"  reached and over a limit: {line}")
    else:
        broken = []
    if args.json:
        _triton_aot.write_json(rows, args.json)
        print(f"wrote {args.json}")
    return 1 if (missing or broken or (args.strict and bad)) else 0


if __name__ == "__main__":
    sys.exit(main())
