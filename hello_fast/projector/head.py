"""The projector's head initialisation: normalised CLIP text embeddings of the class prompts (HeLlO Sec. 3.2).

W[c] = normalize(mean_t normalize(E_T(template_t(class_c)))): the zero-shot classifier of CLIP
(Prop. 1), so it is rebuilt from the public backbone and never stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hello_fast._progress import progress


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
