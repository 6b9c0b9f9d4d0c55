"""Stage 3 (optional): update the distilled images within the projector (HeLlO Sec. 3.4, Eq. 7), within a bound.

Minimises MSE(E_I(p), E_I(p_hat)) over the pixels p, where E_I is the projector's image tower
(with its LoRA) and p_hat is p down-sampled by `refine.downsample` and up-sampled back (after
LIC): the images move towards what the projector sees the same way at both scales, which
narrows the gap between the observer that picked the patches and the projector that labels them.

The paper gains 0.1 point from this step (Table 3), so a strong step can only lose: unbounded Adam
on raw pixels takes the images far from the selected real patches. Three bounds keep it a small
correction:
- a box: no pixel moves more than `max_delta` grey levels from the selected image (projected after
  every step), so PSNR >= 20 log10(255 / max_delta) (30.1 dB at 8 levels) whatever the step count;
- a fidelity term: loss = Eq7(p) / Eq7(p_selected) + fidelity * MSE(p, p_selected) / (max_delta/255)^2,
  so both terms are O(1) and `fidelity` 1 pulls as hard as Eq. 7 at the box's edge;
- keep the better (`keep_better`): a refined image replaces the selected one only if the
  projector's cross-entropy with the image's class is not higher on it (measured on the stored
  uint8 pixels); otherwise the selected image is kept. `steps` is the step budget.
The summary logs Eq. 7's loss, the projector's CE before and after, how many refined images were
kept, and the PSNR of the result against the selected images: of the whole set (from the mean
squared error over every pixel) and of the worst image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hello_fast._progress import log, progress
from hello_fast.data.distilled import load_distilled, save_distilled
from hello_fast.layout import artifact_path
from hello_fast.projector.artifact import load_projector
from hello_fast.stages.contract import Stage, StageInputs

NAME = "refine"
SELECT = "select"  # the stage whose images it refines
_PSNR_IDENTICAL = 100.0  # dB reported for an unchanged image (its MSE is 0)


def down_up(p: torch.Tensor, factor: int) -> torch.Tensor:
    size = p.shape[-1]
    small = F.interpolate(p, size=(max(1, size // factor),) * 2, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


def _psnr_of_mse(mse: torch.Tensor) -> torch.Tensor:
    out = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-12))
    return torch.where(mse > 0, out, torch.full_like(out, _PSNR_IDENTICAL))


def squared_error(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error in grey levels^2 of uint8 (B, 3, H, W) images."""
    return (a_uint8.float() - b_uint8.float()).pow(2).flatten(1).mean(1)


def psnr(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 (B, 3, H, W) images (100 dB for identical ones)."""
    return _psnr_of_mse(squared_error(a_uint8, b_uint8))


def psnr_floor(max_delta: float) -> float:
    """The lowest PSNR the box bound allows: every pixel off by max_delta grey levels."""
    return 20 * math.log10(255.0 / max_delta)


def eq7_loss(projector, p: torch.Tensor, downsample: int) -> torch.Tensor:
    """Eq. 7: MSE between the tower's features of p and of p down- and up-sampled (p in [0, 1])."""
    x = p
    if projector.image_size and x.shape[-1] != projector.image_size:
        x = F.interpolate(x, size=(projector.image_size,) * 2, mode="bilinear", align_corners=False)
    tower, mean, std = projector.visual, projector.mean, projector.std
    return F.mse_loss(tower((x - mean) / std).float(), tower((down_up(x, downsample) - mean) / std).float())


@torch.no_grad()
def projector_ce(projector, images_uint8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy of the projector's logits with the images' classes."""
    return F.cross_entropy(projector(projector.normalize(images_uint8)).float(), labels, reduction="none")


def refine_batch(projector, images_uint8: torch.Tensor, labels: torch.Tensor, rc) -> tuple[torch.Tensor, dict]:
    """Refined uint8 images of one batch (each the refined or the selected one) and the batch's statistics."""
    eps = rc.max_delta / 255.0
    p0 = images_uint8.float() / 255.0
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=rc.lr)
    first = base = None
    for _ in range(rc.steps):
        eq7 = eq7_loss(projector, p, rc.downsample)
        if base is None:
            first = base = eq7.detach().clamp_min(1e-12)
        loss = eq7 / base + rc.fidelity * F.mse_loss(p, p0) / eps**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # project back into the box around the selected image, and into [0, 1]
            p.copy_(torch.maximum(torch.minimum(p, p0 + eps), p0 - eps).clamp_(0, 1))
    refined = (p.detach() * 255).round().clamp_(0, 255).to(torch.uint8)
    ce_before = projector_ce(projector, images_uint8, labels)
    ce_refined = projector_ce(projector, refined, labels)
    keep = ce_refined <= ce_before if rc.keep_better else torch.ones_like(ce_before, dtype=torch.bool)
    out = torch.where(keep[:, None, None, None], refined, images_uint8)
    with torch.no_grad():
        last = eq7_loss(projector, refined.float() / 255.0, rc.downsample) if rc.steps else None
    stats = {
        "loss_first": float(first) if first is not None else None, "loss_last": float(last) if last is not None else None,
        "ce_before": ce_before, "ce_after": torch.where(keep, ce_refined, ce_before), "kept": keep,
        "psnr": psnr(out, images_uint8), "mse": squared_error(out, images_uint8),
    }
    return out, stats


def refine_images(inputs: StageInputs, out: str) -> dict:
    """Refine the selected images within the projector (Eq. 7, bounded) and write them into `out`."""
    cfg, device = inputs.cfg, inputs.device
    rc = cfg.refine
    distilled = load_distilled(inputs.run.path(SELECT))
    projector, _ = load_projector(artifact_path(inputs.run), device=device)
    projector.eval()
    summary = {"steps": rc.steps, "max_delta": rc.max_delta, "fidelity": rc.fidelity, "keep_better": rc.keep_better,
               "loss_first": None, "loss_last": None}
    refined, per = [], {"ce_before": [], "ce_after": [], "kept": [], "psnr": [], "mse": []}
    first = last = 0.0
    for chunk in progress(list(torch.split(torch.arange(len(distilled)), rc.batch_size)), desc="refine", unit="batch"):
        images = distilled.images[chunk].to(device)
        labels = distilled.labels[chunk].to(device)
        batch, stats = refine_batch(projector, images, labels, rc)
        refined.append(batch.cpu())
        for k in per:
            per[k].append(stats[k].cpu())
        if stats["loss_first"] is not None:
            first += stats["loss_first"] * len(chunk)
            last += stats["loss_last"] * len(chunk)
    n = len(distilled)
    ps, mse = torch.cat(per["psnr"]), torch.cat(per["mse"])
    summary.update({
        "loss_first": first / n if rc.steps else None, "loss_last": last / n if rc.steps else None,
        "projector_ce_before": float(torch.cat(per["ce_before"]).mean()),
        "projector_ce_after": float(torch.cat(per["ce_after"]).mean()),
        "refined_kept": int(torch.cat(per["kept"]).sum()), "images": n,
        "psnr": float(_psnr_of_mse(mse.mean())), "psnr_min": float(ps.min()), "psnr_floor": psnr_floor(rc.max_delta),
    })
    save_distilled(out, torch.cat(refined), distilled.labels, distilled.class_names, {"method": "refined"})
    eq7 = f"Eq. 7 loss {summary['loss_first']:.5f} -> {summary['loss_last']:.5f} over {rc.steps} steps; " if rc.steps else ""
    log(f"refine: {eq7}kept {summary['refined_kept']}/{n} refined images (projector CE {summary['projector_ce_before']:.4f} "
        f"-> {summary['projector_ce_after']:.4f}); PSNR vs selected {summary['psnr']:.1f} dB (set), worst image "
        f"{summary['psnr_min']:.1f} dB (bound {summary['psnr_floor']:.1f} dB)")
    return summary


STAGE = Stage(NAME, options=("refine",), run=refine_images, reads=lambda cfg, unit: (SELECT, "projector"), collective=False,
              reads_data=False,  # it reads the distilled images, not the original set
              enabled=lambda cfg: cfg.refine.enabled,
              disabled_note="disabled in this config (refine.enabled: false), the selected images are used as they are")
