"""A hand-written training loop with lens_callbacks.Lens: the same captures as the Lightning
callback, written to disk and TensorBoard.

    python examples/plain_loop.py [--out out/plain_loop] [--steps 40] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lens_callbacks import DiskWriter, Lens, TensorBoardWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/plain_loop"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a few steps, for the smoke test")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps

    digits = load_digits()  # shipped with scikit-learn: no download
    images = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64) / 16.0
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    # Every 10th step: the forward, the loss and the backward inside the block are recorded.
    writers = [DiskWriter(args.out / "lens"), TensorBoardWriter(args.out / "tensorboard")]
    lens = Lens(model, layers="linear", every_n_steps=2 if args.quick else 10, writers=writers)
    for step in range(steps):
        batch = torch.randint(0, len(images), (64,))
        with lens.step(step):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()  # inside the block: its gradients are part of the capture
        optimizer.step()
        optimizer.zero_grad()
    lens.close()

    print(f"final loss {loss.item():.3f}; captures in {args.out / 'lens'}:")
    for folder in sorted((args.out / "lens").iterdir()):
        print(f"  {folder.name}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.out / 'tensorboard'}")


if __name__ == "__main__":
    main()
