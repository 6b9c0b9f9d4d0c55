"""augment_mix: the fused op against the PyTorch reference (CPU), and on a GPU against copy bandwidth, torchvision v2 and DALI.

    python benchmarks/bench_augment.py [--quick] [--out DIR]

CPU (always): the `cpp` kernel against the torch reference on this machine's cores, 2 views
(fp32 for the student, bf16 for CLIP), CutMix, at 224 px (batch 64) and 32 px (batch 256).
GPU (when CUDA is present): bytes moved per second by the Triton and CUDA kernels against the
device's measured copy bandwidth (reads of the crops + writes of both views, each once), and time
against torchvision.transforms.v2 on GPU tensors (per-sample RandomResizedCrop + flip, CutMix, two
Normalize) and against DALI's GPU random_resized_crop + crop_mirror_normalize (when installed).
Writes results/augment_mix_<device>.json and .csv.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import _results, _timing  # noqa: E402

STUDENT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _problem(B, out, device, S=512, H=256, W=256, seed=0):
    from hello_fast.ops import sample_augment_params

    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (S, 3, H, W), dtype=torch.uint8, generator=g).to(device)
    index = torch.randint(0, S, (B,), generator=g)
    p = sample_augment_params(index, H, W, out_size=out, scale=(0.5, 1.0), mode="cutmix", generator=g)
    views = [(*STUDENT, torch.float32), (*CLIP, torch.bfloat16)]
    return src, index.to(device), {k: v.to(device) for k, v in p.items()}, views


def cpu_rows(quick):
    from hello_fast.ops import augment_mix

    rows = []
    for B, out in ((64, 224), (256, 32)):
        src, index, p, views = _problem(B, out, "cpu")
        t = {}
        for backend in ("torch", "cpp"):
            t[backend] = _timing.median_ms(lambda: augment_mix(src, index, **p, mode="cutmix", out_size=out, views=views,
                                                               backend=backend), rep_ms=1000 if quick else 3000)
        rows.append({"device": "cpu", "threads": torch.get_num_threads(), "batch": B, "out_size": out, "mode": "cutmix",
                     "views": "fp32+bf16", "torch_reference_ms": round(t["torch"], 3), "cpp_ms": round(t["cpp"], 3),
                     "cpp_speedup": round(t["torch"] / t["cpp"], 2)})
        print(f"cpu B={B} out={out}: reference {t['torch']:.1f} ms, cpp {t['cpp']:.1f} ms ({t['torch'] / t['cpp']:.1f}x)")
    return rows


def copy_bandwidth_gbs() -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    ms = _timing.median_ms(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6


def torchvision_v2(src, index, p, out):
    """The plain GPU-tensor pipeline: per-sample RandomResizedCrop + flip, CutMix, then two Normalize."""
    from torchvision.transforms.v2 import functional as TF

    imgs = []
    for b in range(index.shape[0]):
        t, l, h, w = p["crop"][b].tolist()
        img = TF.resized_crop(src[index[b]], t, l, h, w, [out, out], antialias=False)
        imgs.append(TF.horizontal_flip(img) if bool(p["flip"][b]) else img)
    x = torch.stack(imgs).float() / 255
    t0, l0, b1, r1 = p["cut"][0].tolist()  # one box per batch (the peers' CutMix)
    x[:, :, t0:b1, l0:r1] = x[p["partner"], :, t0:b1, l0:r1]
    a = TF.normalize(x, list(STUDENT[0]), list(STUDENT[1]))
    b = TF.normalize(x, list(CLIP[0]), list(CLIP[1])).to(torch.bfloat16)
    return a, b


def dali_pipeline(B, out, H, W):
    """DALI on GPU tensors: random_resized_crop + crop_mirror_normalize twice (no CutMix: DALI has none)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None

    @pipeline_def(batch_size=B, num_threads=4, device_id=0)
    def pipe():
        images = fn.external_source(name="images", device="gpu", layout="CHW")
        crops = fn.random_resized_crop(fn.transpose(images, perm=[1, 2, 0]), size=(out, out), random_area=(0.5, 1.0))
        mirror = fn.random.coin_flip()
        a = fn.crop_mirror_normalize(crops, mirror=mirror, mean=[m * 255 for m in STUDENT[0]], std=[s * 255 for s in STUDENT[1]],
                                     dtype=types.FLOAT, output_layout="CHW")
        b = fn.crop_mirror_normalize(crops, mirror=mirror, mean=[m * 255 for m in CLIP[0]], std=[s * 255 for s in CLIP[1]],
                                     dtype=types.FLOAT16, output_layout="CHW")
        return a, b

    p = pipe(prefetch_queue_depth=1, exec_dynamic=True) if "exec_dynamic" in pipe.__code__.co_varnames else pipe()
    p.build()
    return p


def gpu_rows(quick):
    from hello_fast.ops import augment_mix

    bw = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {bw:.0f} GB/s")
    rows = []
    for B, out in ((256, 224), (64, 224), (256, 32)):
        src, index, p, views = _problem(B, out, "cuda")
        crop_bytes = int((p["crop"][:, 2] * p["crop"][:, 3]).sum()) * 3
        cut_bytes = int(((p["cut"][:, 2] - p["cut"][:, 0]) * (p["cut"][:, 3] - p["cut"][:, 1])).sum()) * 3
        out_bytes = B * 3 * out * out * (4 + 2)
        moved = crop_bytes + cut_bytes + out_bytes
        row = {"device": "cuda", "batch": B, "out_size": out, "mode": "cutmix", "views": "fp32+bf16", "bytes_moved": moved,
               "copy_bandwidth_gbs": round(bw, 1)}
        for backend in ("triton", "cuda"):
            try:
                ms = _timing.median_ms(lambda: augment_mix(src, index, **p, mode="cutmix", out_size=out, views=views,
                                                           backend=backend, check=False))
            except RuntimeError as e:
                print(f"  {backend}: not available ({e})")
                continue
            row[f"{backend}_ms"] = round(ms, 4)
            row[f"{backend}_gbs"] = round(moved / ms / 1e6, 1)
            row[f"{backend}_fraction_of_copy_bw"] = round(moved / ms / 1e6 / bw, 3)
        row["torchvision_v2_ms"] = round(_timing.median_ms(lambda: torchvision_v2(src, index, p, out), rep_ms=50 if quick else 200), 3)
        best = min(row.get("triton_ms", float("inf")), row.get("cuda_ms", float("inf")))
        row["speedup_over_torchvision_v2"] = round(row["torchvision_v2_ms"] / best, 2)
        dali = dali_pipeline(B, out, src.shape[2], src.shape[3])
        if dali is not None:
            batch = [src[i] for i in index.tolist()]

            def run_dali():
                dali.feed_input("images", batch)
                dali.run()

            row["dali_ms"] = round(_timing.median_ms(run_dali, rep_ms=50 if quick else 200), 3)
            row["speedup_over_dali"] = round(row["dali_ms"] / best, 2)
        else:
            row["dali_ms"] = None
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
        paths = _results.write("augment_mix_cpu", cpu_rows(args.quick), extra={"goal": "cpp >= 4x the torch reference"},
                               out_dir=args.out)
        print("wrote", *paths)
    if torch.cuda.is_available():
        goals = {"fraction_of_copy_bw_min": 0.70, "speedup_over_torchvision_v2_min": 5.0}
        paths = _results.write("augment_mix_cuda", gpu_rows(args.quick), extra={"goals": goals}, out_dir=args.out)
        print("wrote", *paths)
    else:
        print("bench_augment: no CUDA device here; the GPU comparisons (bandwidth, torchvision v2, DALI) were not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
