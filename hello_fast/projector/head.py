"""The projector's head initialisation (projector.head_init): CLIP's text embeddings, class prototypes, or a seeded random head.

- text (HeLlO Sec. 3.2): W[c] = normalize(mean_t normalize(E_T(template_t(class_c)))), the zero-shot
  classifier of CLIP (Prop. 1); rebuilt from the public backbone, never stored.
- prototypes: m = the training images' mean feature, W[c] = normalize(mean_c E_I(x) - m), applied
  to normalize(E_I(x) - m): the centred nearest-class-mean classifier of any image tower (no text
  tower needed; centring as SimpleShot's CL2N: without it every class shares one large common
  component and the logits one large offset, which the MSE to the teachers' logits then removes
  by collapsing the features). It depends on the training data, so the label artifact stores W and m.
- random: unit-norm rows drawn from a seed (the ablation without any prior on the head); rebuilt
  from the seed, never stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hello_fast._progress import progress
from hello_fast.errors import HelloError

HEAD_INITS = ("text", "prototypes", "random")  # what an artifact may record (the config adds auto)


@torch.no_grad()
def text_head_weight(backbone, class_names: list[str], templates: list[str], device="cpu", batch_texts: int = 512) -> torch.Tensor:
    """(C, d) float32 unit-norm text embeddings, one row per class, averaged over the templates."""
    model = backbone.model
    tokenizer = backbone.tokenizer()
    rows = []
    per_batch = max(1, batch_texts // len(templates))
    chunks = [class_names[i : i + per_batch] for i in range(0, len(class_names), per_batch)]
    for chunk in progress(chunks, desc="text head", unit="batch", disable_below=4):
        texts = [t.format(c) for c in chunk for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).reshape(len(chunk), len(templates), -1).mean(1)
        rows.append(F.normalize(emb, dim=-1))
    return torch.cat(rows).cpu()


@torch.no_grad()
def prototype_head(visual, batches, normalize, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, d), m (d,)) float32 over `batches` of (uint8 images, labels), in one pass: m the mean feature, W[c]
    the unit-norm centred mean feature of class c (each image weighs the same in m; each class in W).

    `normalize` turns uint8 images into the tower's input (its statistics and resolution). A class
    with no image refuses: its row would be undefined.
    """
    sums, counts = None, torch.zeros(num_classes, dtype=torch.float64)
    for images, labels in batches:
        features = visual(normalize(images)).double().cpu()
        if sums is None:
            sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels.cpu(), features)
        counts += torch.bincount(labels.cpu(), minlength=num_classes).double()
    empty = (counts == 0).nonzero().flatten().tolist()
    if sums is None or empty:
        raise HelloError(f"projector.head_init prototypes: no training image of class(es) {empty[:5] or 'any'}")
    center = sums.sum(0) / counts.sum()
    return F.normalize(sums / counts[:, None] - center, dim=-1).float(), center.float()


def random_head_weight(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """(C, d) float32 unit-norm rows from a seeded normal draw: the same head on every machine for one seed."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=-1).float()


@torch.no_grad()
def feature_dim(visual, image_size: int) -> int:
    """The width of the tower's features: one forward of a blank image at `image_size`."""
    param = next(visual.parameters())
    return int(visual(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)).shape[-1])
