"""The drop-in relabeler: soft labels for your augmented batches from a label artifact, at the projector's full speed.

    relabel = Relabeler.from_artifact("artifact.safetensors", device="cuda")
    logits = relabel(clip_view)          # (B, C) float32, for images normalised for CLIP

At load the LoRA is merged into the weights (the labels cost one plain forward of the CLIP tower),
the tower runs in bf16 and channels-last on a GPU (fp32 on the CPU), and `capture=True` records
the forward in a CUDA graph per batch shape (static shapes replay without launch gaps).
A projector handed to `Relabeler(projector, meta)` is left as it was: the relabeler merges and
casts its own copy.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from hello_fast.distributed import resolve_device
from hello_fast.errors import HelloError
from hello_fast.projector.artifact import load_projector


class Relabeler:
    def __init__(self, projector, meta: dict, *, device=None, dtype=None, capture: bool = False):
        """Label with `projector` (a Projector); the caller's projector is not changed (its copy is merged and cast)."""
        self._adopt(copy.deepcopy(projector), meta, device, dtype, capture)

    def _adopt(self, projector, meta: dict, device, dtype, capture: bool) -> None:
        """Take ownership of `projector`: merge its LoRA, freeze it and cast it for labeling (in place)."""
        device = resolve_device(str(device or "auto"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.meta = meta
        self.device = device
        self.dtype = dtype
        projector = projector.to(device).eval()
        projector.merge()  # one plain forward: no LoRA branch at label time
        for p in projector.parameters():
            p.requires_grad_(False)
        projector.visual.to(dtype)
        if device.type == "cuda":
            projector.visual.to(memory_format=torch.channels_last)
        self.projector = projector
        self.capture = capture and device.type == "cuda"
        self._graphs: dict = {}

    @classmethod
    def from_artifact(cls, path: str, *, backbone_weights: str | None = None, device=None, dtype=None,
                      capture: bool = False) -> "Relabeler":
        """Build the projector of a label artifact on its backbone (CLIP, or the image classifier it names).

        `backbone_weights`: a local checkpoint (or CLIP tag) for the artifact's backbone when its
        recorded source is not available here; its sha256 must match the artifact's.
        """
        projector, meta = load_projector(path, clip_pretrained=backbone_weights, device="cpu")
        relabel = cls.__new__(cls)
        relabel._adopt(projector, meta, device, dtype, capture)  # a projector nobody else holds: no copy
        return relabel

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def mean(self) -> tuple:
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple:
        return tuple(self.meta["std"])

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the CLIP view this relabeler expects (resized to its resolution if needed)."""
        return self.projector.normalize(images_uint8.to(self.device))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C), float32, of CLIP-normalised images (B, 3, H, W)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise HelloError(f"Relabeler: expected images (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise HelloError("Relabeler: expected CLIP-normalised float images; use relabel.normalize(uint8_images) first")
        x = images.to(self.device, self.dtype, non_blocking=True)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.capture:
            return self._forward(x).float()
        return self._replay(x)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (cuDNN/cuBLAS workspaces, Triton compiles)
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in).float()
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()
