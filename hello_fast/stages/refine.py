"""Stage 3 (optional): update the distilled images within the projector (HeLlO Sec. 3.4, Eq. 7).

Minimises MSE(E_I(p), E_I(p_hat)) over the pixels p, where E_I is the projector's image tower
(with its LoRA) and p_hat is p down-sampled by `refine.downsample` and up-sampled back (after
LIC): the images move towards what the projector sees the same way at both scales, which
narrows the gap between the observer that picked the patches and the projector that labels them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hello_fast._progress import log, progress
from hello_fast.data.distilled import load_distilled, save_distilled
from hello_fast.projector.artifact import load_projector

STAGE = "refine"


def down_up(p: torch.Tensor, factor: int) -> torch.Tensor:
    size = p.shape[-1]
    small = F.interpolate(p, size=(max(1, size // factor),) * 2, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


def refine_images(cfg, run, device, fingerprint: str, source_dir: str, artifact: str) -> dict:
    rc = cfg.refine
    distilled = load_distilled(source_dir)
    projector, _ = load_projector(artifact, device=device)
    tower = projector.visual
    mean, std = projector.mean, projector.std
    summary = {"steps": rc.steps, "loss_first": None, "loss_last": None}
    refined = []
    with run.stage(STAGE, fingerprint, summary) as out:
        chunks = list(torch.split(torch.arange(len(distilled)), rc.batch_size))
        first = last = 0.0
        for chunk in progress(chunks, desc="refine", unit="batch"):
            p = (distilled.images[chunk].float() / 255.0).to(device).requires_grad_(True)
            opt = torch.optim.Adam([p], lr=rc.lr)
            for step in range(rc.steps):
                x = p
                if projector.image_size and x.shape[-1] != projector.image_size:
                    x = F.interpolate(x, size=(projector.image_size,) * 2, mode="bilinear", align_corners=False)
                loss = F.mse_loss(tower((x - mean) / std).float(), tower((down_up(x, rc.downsample) - mean) / std).float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    p.clamp_(0, 1)
                if step == 0:
                    first += loss.item() * len(chunk)
                last_loss = loss.item()
            last += last_loss * len(chunk)
            refined.append((p.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu())
        summary["loss_first"] = first / len(distilled)
        summary["loss_last"] = last / len(distilled)
        save_distilled(out, torch.cat(refined), distilled.labels, distilled.class_names, {"method": "refined"})
        log(f"refine: Eq. 7 loss {summary['loss_first']:.5f} -> {summary['loss_last']:.5f} over {rc.steps} steps")
    return summary
