"""RelabelMix against timm's Mixup + a separate labeler call on a torchvision-augmented batch: images/s of one training loop.

    python benchmarks/bench_relabel_mix.py [--quick] [--out DIR]

Both loops train the same timm student from the same uint8 batches held in memory, with the same
labeler (a Relabeler on the tiny CLIP configuration, random weights: speed only), the same
mixing options (Mixup 0.8 / CutMix 1.0, switch 0.5, one lambda per batch), crops (scale 0.5-1)
and flips, and the same loss (temperature-KL to the labels + 0.1 x the mixed hard-label CE):
- relabel_mix: `x, soft = relabel_mix(images)` (one augment_mix pass writes the student's and
  CLIP's views of the same mixed crops; the labeler labels them) and `RelabelMixLoss` (the fused
  soft_label_loss op);
- timm_mixup: torchvision v2 RandomResizedCrop + RandomHorizontalFlip per image (in this process,
  as a DataLoader with num_workers=0), timm's `Mixup` on the float batch, one Normalize per view,
  the labeler on the CLIP view, KL + SoftTargetCrossEntropy on timm's mixed targets in PyTorch.
Each row times both loops in the same run, one step of each in turn (median after a warm-up step),
and their ratio, and the same for making the batch and its labels alone (`*_batch_ms`: no student step);
`load_average_1min` says how busy the machine was (shared CI machines are).
Writes results/relabel_mix_<device>[_quick].json and .csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _results  # noqa: E402

STUDENT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch")
T, BETA = 4.0, 0.1


def _labeler(classes: int, device):
    """A Relabeler on the tiny CLIP configuration with non-zero LoRA adapters."""
    from hello_fast.models.clip import load_clip
    from hello_fast.projector.model import build_projector
    from hello_fast.relabel import Relabeler

    g = torch.Generator().manual_seed(0)
    backbone = load_clip("hello-tiny-rn", None, 0)
    head = F.normalize(torch.randn(classes, backbone.model.visual.output_dim, generator=g), dim=-1)
    names = [f"c{i}" for i in range(classes)]
    projector = build_projector(backbone, names, ["{}"], conv_rank=4, head_rank=8, head_weight=head)
    with torch.no_grad():
        for _, m in projector.lora_modules():
            m.lora_b.normal_(std=0.01, generator=g)
    meta = {"class_names": names, "image_size": backbone.image_size, "mean": list(backbone.mean), "std": list(backbone.std)}
    return Relabeler(projector, meta, device=device)


def _student(name: str, classes: int, device):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=classes).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def relabel_mix_step(relabel, images, target, out, model, opt):
    """(the training step, the batch alone: the student's view and the soft labels)."""
    from hello_fast import RelabelMix, RelabelMixLoss

    mixer = RelabelMix(relabel, **MIX, out_size=out, scale=(0.5, 1.0), hflip=0.5, seed=0)
    criterion = RelabelMixLoss(mixer, mode="kl", temperature=T, beta=BETA)

    def step():
        x, soft = mixer(images)
        loss = criterion(model(x), soft, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, lambda: mixer(images)


def timm_mixup_step(relabel, images, target, out, model, opt, classes):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from torchvision.transforms import v2

    augment = v2.Compose([v2.RandomResizedCrop(out, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    mixup = Mixup(**MIX, label_smoothing=0.0, num_classes=classes)
    ce = SoftTargetCrossEntropy()
    student_norm = v2.Normalize(*STUDENT)
    clip_norm = v2.Normalize(relabel.mean, relabel.std)

    def batch():
        x = torch.stack([augment(img) for img in images]).float().div_(255)
        x, mixed = mixup(x, target)
        with torch.no_grad():
            soft = relabel(clip_norm(x))
        return student_norm(x), soft, mixed

    def step():
        x, soft, mixed = batch()
        logits = model(x)
        loss = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(soft / T, 1), reduction="batchmean", log_target=True)
        loss = loss + BETA * ce(logits, mixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch


def _interleaved_ms(fns: dict, rounds: int) -> dict:
    """Median ms of each function, timed in alternation (one call of each per round, after one warm-up call each):
    on a shared machine both see the same load, so their ratio holds even when the absolute times drift."""
    def timed(fn):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        return (time.perf_counter() - t) * 1e3

    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rows(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = 100
    relabel = _labeler(classes, device)
    settings = [("test_resnet", 128, 40, 32), ("resnet18", 64, 80, 64)]  # student, batch, source px, crop px
    out = []
    for student, B, src, res in settings[:1] if quick else settings:
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (B, 3, src, src), dtype=torch.uint8, generator=g).to(device)
        target = torch.randint(0, classes, (B,), generator=g).to(device)
        rounds = 4 if quick else 15
        loops = {}
        for loop in ("relabel_mix", "timm_mixup"):
            model, opt = _student(student, classes, device)
            loops[loop] = (relabel_mix_step(relabel, images, target, res, model, opt) if loop == "relabel_mix"
                           else timm_mixup_step(relabel, images, target, res, model, opt, classes))
        ms = _interleaved_ms({k: v[0] for k, v in loops.items()}, rounds)
        batch_ms = _interleaved_ms({k: v[1] for k, v in loops.items()}, rounds)
        row = {"student": student, "batch": B, "source_px": src, "crop_px": res, "labeler": "hello-tiny-rn Relabeler",
               "classes": classes, "threads": torch.get_num_threads(),
               "relabel_mix_ms": round(ms["relabel_mix"], 2), "timm_mixup_ms": round(ms["timm_mixup"], 2),
               "relabel_mix_img_per_s": round(B / ms["relabel_mix"] * 1e3, 1),
               "timm_mixup_img_per_s": round(B / ms["timm_mixup"] * 1e3, 1),
               "speedup": round(ms["timm_mixup"] / ms["relabel_mix"], 2),
               "relabel_mix_batch_ms": round(batch_ms["relabel_mix"], 2), "timm_mixup_batch_ms": round(batch_ms["timm_mixup"], 2),
               "batch_speedup": round(batch_ms["timm_mixup"] / batch_ms["relabel_mix"], 2),
               "load_average_1min": round(os.getloadavg()[0], 2)}
        print(f"{student} B={B} {src}->{res}px: RelabelMix {row['relabel_mix_img_per_s']:.0f} img/s, timm Mixup + "
              f"torchvision + labeler {row['timm_mixup_img_per_s']:.0f} img/s ({row['speedup']:.2f}x); the batch and its "
              f"labels alone {row['relabel_mix_batch_ms']:.0f} vs {row['timm_mixup_batch_ms']:.0f} ms ({row['batch_speedup']:.2f}x)")
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small setting, short timing")
    parser.add_argument("--out", default=_results.RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"relabel_mix_{device}{'_quick' if args.quick else ''}"
    loops = {"relabel_mix": "RelabelMix (one augment_mix pass, both views) + RelabelMixLoss (fused soft_label_loss)",
             "timm_mixup": "torchvision v2 RandomResizedCrop + flip per image, timm Mixup, two Normalize, labeler call, "
                           "KL + SoftTargetCrossEntropy in PyTorch"}
    jpath, _ = _results.write(name, rows(args.quick), {"loops": loops}, out_dir=args.out)
    print(f"wrote {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
