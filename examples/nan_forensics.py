"""When training blows up, which op did it? A model that takes the log of a negative number on
one batch, and the report lens_callbacks gives about it.

    python examples/nan_forensics.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from lens_callbacks import Lens


class Fragile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.log(x.sum(1, keepdim=True))  # NaN as soon as a row sums below zero
        return self.fc(x) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for the smoke test")
    parser.parse_args()
    torch.manual_seed(0)
    model = Fragile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # No captures (steps=[]): only the NaN check, one scalar per step.
    lens = Lens(model, steps=[], on_anomaly="skip", writers=[])
    for step in range(5):
        x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        if step == 3:
            x[2] = -1.0  # a corrupted sample
        with lens.step(step):
            loss = F.cross_entropy(model(x), y)
            report = lens.check(loss, replay=lambda x=x, y=y: F.cross_entropy(model(x), y))
            if report is not None:  # "skip": leave this step out
                print(report)
                continue
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print("parameters finite:", all(bool(torch.isfinite(p).all()) for p in model.parameters()))


if __name__ == "__main__":
    main()
