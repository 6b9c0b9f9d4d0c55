"""Soft labels from a HeLlO label artifact in a timm training loop: RelabelMix where timm's Mixup would be.

    python examples/relabel_mix_timm.py ARTIFACT IMAGE_FOLDER [EPOCHS]
"""
import sys

import timm
import torch
import torchvision
from torchvision.transforms import v2

from hello_fast import RelabelMix, RelabelMixLoss

artifact, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2
# timm's Mixup options; the targets are the artifact's labels of the mixed crops, not mixed one-hots
relabel_mix = RelabelMix.from_artifact(artifact, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch",
                                       scale=(0.5, 1.0), hflip=0.5)
size = relabel_mix.relabeler.image_size
images = torchvision.datasets.ImageFolder(folder, v2.Compose([v2.PILToTensor(), v2.Resize((size, size))]))
loader = torch.utils.data.DataLoader(images, batch_size=32, shuffle=True)  # uint8; crops are made by RelabelMix
model = timm.create_model("resnet18", num_classes=relabel_mix.num_classes).to(relabel_mix.device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
criterion = RelabelMixLoss(relabel_mix, mode="kl", temperature=4.0, beta=0.1)  # + 0.1 x CE with the mixed hard labels
for epoch in range(epochs):
    for x, target in loader:  # the folder's classes in the artifact's (sorted) order
        x, soft = relabel_mix(x)  # one pass: crop, flip, mix; the student's view and the labels of the same mixed crops
        loss = criterion(model(x), soft, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
