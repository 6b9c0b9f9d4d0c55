"""Soft labels from a HeLlO label artifact inside a plain torchvision training loop.

    python examples/relabel_in_your_loop.py ARTIFACT IMAGE_FOLDER [EPOCHS]
"""
import sys

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from hello_fast import Relabeler

artifact, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2
relabel = Relabeler.from_artifact(artifact)  # LoRA merged; bf16 + channels-last on a GPU
device = relabel.device
augment = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(relabel.image_size, scale=(0.5, 1), antialias=True),
                      v2.RandomHorizontalFlip()])
loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, augment), batch_size=32, shuffle=True)
student = torchvision.models.resnet18(num_classes=relabel.num_classes).to(device)
opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)
mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
for epoch in range(epochs):
    for images, _ in loader:  # uint8 crops; the folder's labels are not needed
        images = images.to(device)
        soft = relabel(relabel.normalize(images))  # (B, C) soft labels for exactly these crops
        logits = student((images.float() / 255 - mean) / std)
        loss = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(soft / 4, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
