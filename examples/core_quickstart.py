"""Quickstart: record every op of a small CNN's forward pass, then of one real training step.

Run with `make demo`. Everything here uses random data and weights, so it runs offline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        return self.classifier(torch.flatten(self.features(x), 1))


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    images, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    # 1. One call: every op of a forward pass, TorchLens style.
    history = lc.log_forward_pass(model, images, layers_to_save="all")
    print(history)
    print()
    print(history["conv2d_2"])  # the second conv layer; also history["features.3"]

    # 2. The real training step: forward, loss and backward, recorded as they run.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with lc.capture(model, layers="conv") as cap:
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
    optimizer.step()
    step = cap.history
    print()
    print(f"Training step: {len(step)} ops recorded, {step.num_tensors_saved} saved: {step.layer_labels}")
    for layer in step.saved_layers:
        values = layer.tensor_contents.detach()
        print(f"  {layer.label:<12} {layer.module:<12} mean={values.mean():+.4f} std={values.std():.4f}")


if __name__ == "__main__":
    main()
