"""Lightning quickstart (the `make demo` job): train a small CNN on scikit-learn's digits with
LensCallback capturing every op of chosen training steps, logging to TensorBoard, W&B (offline)
and disk, then say where to look.

    python examples/lightning_quickstart.py [--out out/demo] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lens_core as lc
from lens_callbacks import LensCallback


class DigitsCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def digits_loader(batch_size: int = 64) -> DataLoader[tuple[torch.Tensor, ...]]:
    digits = load_digits()  # 1,797 8x8 images shipped with scikit-learn: no download
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()

    os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network: a local run folder
    os.environ.setdefault("WANDB_SILENT", "true")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # With no writers given, LensCallback writes to disk and to each TensorBoard / W&B logger.
    lens = LensCallback(layers="all", every_n_steps=args.every, save_tensors=True, log_dir=args.out)
    wandb_logger = WandbLogger(project="lens-demo", save_dir=str(args.out), offline=True)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", enable_checkpointing=False, log_every_n_steps=5,
        logger=[TensorBoardLogger(args.out, name="tensorboard"), wandb_logger],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
        callbacks=[lens],
    )
    trainer.fit(DigitsCNN(), digits_loader())
    wandb_logger.experiment.finish()

    captures = sorted((args.out / "lens").glob("step_*"))
    last = lc.load(captures[-1])  # a step folder of one micro-batch loads as its history
    print(f"\nCaptured {len(captures)} training steps: {', '.join(p.name for p in captures)}")
    print(f"Last capture ({captures[-1].name}): {len(last)} ops, e.g.")
    for label in last.layer_labels[:6]:
        layer = last[label]
        grad = layer.gradient
        grad_text = f"grad norm {grad.norm():.4f}" if grad is not None else "no gradient"
        print(f"  {label:<22} {layer.shape!s:<22} {layer.module or '':<14} {grad_text}")
    graph = last.render_graph("unrolled", vis_outpath=str(args.out / "graph"), vis_fileformat="svg")
    print("\nWhere to look:")
    print(f"  graph of the last captured step: {graph}")
    print(f"  TensorBoard: .venv/bin/tensorboard --logdir {args.out / 'tensorboard'}  (Graphs, Histograms)")
    print(f"  W&B offline run: {args.out / 'wandb'}  (wandb sync <run folder> uploads it)")
    print(f"  captures on disk: {args.out / 'lens'}  (.venv/bin/lens inspect {captures[-1]})")
    print(f"  training health: .venv/bin/lens findings {args.out / 'lens'}  "
          f"(.venv/bin/lens report {args.out / 'lens'} -o report.html)")

if __name__ == "__main__":
    main()
