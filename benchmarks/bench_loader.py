"""Loaders: images/s of the DALI pipeline against a torchvision DataLoader, and of the DALI student-loop backend against the resident set.

    python benchmarks/bench_loader.py [--quick] [--images N] [--folder DIR] [--out DIR]

1. Training passes over a folder of ImageNet-sized JPEGs (generated once, 500x375 by default, or
   --folder): the torch loader (FileImageSet + torchvision RandomResizedCrop/flip in DataLoader
   workers, one per core) against hello_fast's DALI pipeline (GPU decode with `device="mixed"` when
   CUDA is present, else DALI's CPU pipeline with one thread per core), both at 224 px, both
   delivering uint8 batches on the compute device. One warm-up epoch, then the median of the
   timed epochs.
2. The student loop's batches from a distilled set (100 images at 224 px by default): the resident
   uint8 set + one fused augment_mix call against DaliDistilledSet (DALI crop/flip/two
   normalisations, CutMix after), both writing the student's and CLIP's views.
Writes results/loader_<device>[_quick].json and .csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import _results  # noqa: E402

STUDENT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def make_folder(root: str, n: int, width: int, height: int, classes: int = 10) -> str:
    """n JPEGs (quality 90) of natural-ish content: smooth colour fields, gratings and grain, in class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        d = os.path.join(root, f"class_{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{i:06d}.jpg")
        if os.path.exists(path):
            continue
        f = rng.uniform(0.005, 0.05, size=3)
        phase = rng.uniform(0, 6.3, size=3)
        angle = rng.uniform(0, 3.14)
        u = xs * np.cos(angle) + ys * np.sin(angle)
        img = np.stack([127 + 90 * np.sin(f[c] * u + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def _epoch_rate(make_batches, device, epochs: int) -> tuple[float, int]:
    rates, n = [], 0
    for e in range(epochs + 1):  # epoch 0 warms up (workers, pipeline build, decoder handles)
        start = time.perf_counter()
        n = 0
        for images, _, _ in make_batches(e):
            images = images.to(device, non_blocking=True)
            n += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if e > 0:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), n


def folder_rows(folder: str, device, batch: int, epochs: int, cores: int) -> list[dict]:
    from hello_fast.data import dali
    from hello_fast.data.loader import batches
    from hello_fast.data.sources import FileImageSet, _scan_class_folders
    from hello_fast.data.spec import DataPass

    classes, files, labels = _scan_class_folders(folder, None)  # every image of the folder, in the package's class order
    images = FileImageSet(files, labels, classes)
    rows = []
    common = dict(batch_size=batch, train=True, seed=0)
    torch_pass, dali_pass = (DataPass(224, loader=loader, workers=cores) for loader in ("torch", "dali"))
    torch_rate, n = _epoch_rate(lambda e: batches(images, torch_pass, epoch=e, **common), device, epochs)
    row = {"pass": "folder-train-224", "images": n, "batch": batch, "workers": cores,
           "torch_img_per_s": round(torch_rate, 1)}
    print(f"folder: torch DataLoader ({cores} workers) {torch_rate:.0f} img/s")
    if dali.available():
        dali_rate, _ = _epoch_rate(lambda e: batches(images, dali_pass, epoch=e, device=device, **common), device, epochs)
        row.update(dali_img_per_s=round(dali_rate, 1), dali_device="gpu (mixed decode)" if device.type == "cuda" else "cpu",
                   dali_speedup=round(dali_rate / torch_rate, 2))
        print(f"folder: DALI ({row['dali_device']}) {dali_rate:.0f} img/s ({dali_rate / torch_rate:.2f}x)")
    rows.append(row)
    return rows


def student_rows(device, batch: int, res: int, steps: int, cores: int) -> list[dict]:
    from hello_fast.data import dali
    from hello_fast.data.resident import ResidentSet
    from hello_fast.data.sources import procedural_images
    from hello_fast.data.spec import AugmentRecipe

    images, labels = procedural_images(10, 10, res)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    views = [(*STUDENT, dtype), (*CLIP, dtype)]
    recipe = AugmentRecipe(res, scale=(0.5, 1.0), flip=True, mix="cutmix", alpha=1.0)

    def rate(source) -> float:
        times = []
        while len(times) < steps + 2:
            for index in source.epoch_order(batch):
                p = source.draw(index)
                t = time.perf_counter()
                b = source.make(index, p, views=views)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t, b.index.numel()))
        timed = times[2:]  # warm-up steps
        return sum(n for _, n in timed) / sum(t for t, _ in timed)

    row = {"pass": f"student-loop-{res}", "batch": batch, "distilled_images": len(images),
           "resident_fused_img_per_s": round(rate(ResidentSet(images, labels, device, recipe)), 1)}
    print(f"student loop: resident + augment_mix {row['resident_fused_img_per_s']:.0f} img/s")
    if dali.available():
        d = dali.DaliDistilledSet(images, labels, device, recipe, batch_size=batch, views=views, num_threads=cores)
        row["dali_img_per_s"] = round(rate(d), 1)
        row["resident_over_dali"] = round(row["resident_fused_img_per_s"] / row["dali_img_per_s"], 2)
        print(f"student loop: DALI backend {row['dali_img_per_s']:.0f} img/s")
    return [row]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a CPU-sized run: 96 images, batch 32, 1 timed epoch")
    ap.add_argument("--images", type=int, default=None, help="JPEGs in the generated folder (default 2560; quick 96)")
    ap.add_argument("--folder", default=None, help="an existing ImageNet-style folder (default: generate one in a temp dir)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 256; quick 32)")
    ap.add_argument("--out", default=_results.RESULTS_DIR, help="results folder")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    n = args.images or (96 if args.quick else 2560)
    batch = args.batch or (32 if args.quick else 256)
    epochs = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_folder(os.path.join(tmp, "jpegs"), n, 500, 375)
        rows = folder_rows(folder, device, batch, epochs, cores)
    rows += student_rows(device, batch, 64 if args.quick else 224, 4 if args.quick else 30, cores)
    name = f"loader_{device.type}" + ("_quick" if args.quick else "")
    jpath, _ = _results.write(name, rows, {"cores": cores, "jpeg_size": "500x375"}, out_dir=args.out)
    print(f"wrote {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
