"""A tiny LightningModule and a quiet Trainer factory for the callback tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.callbacks.helpers import SmallCNN


class LitCNN(pl.LightningModule):
    def __init__(self, dict_batches: bool = False) -> None:
        super().__init__()
        self.net = SmallCNN()
        self.dict_batches = dict_batches
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["image"], batch["label"]) if self.dict_batches else batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = (batch["image"], batch["label"]) if self.dict_batches else batch
        F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class DictDataset(TensorDataset):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        image, label = super().__getitem__(index)
        return {"image": image, "label": label}


def loader(n: int = 32, dict_batches: bool = False, seed: int = 0, batch_size: int = 4) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    dataset = (DictDataset if dict_batches else TensorDataset)(images, labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def trainer(root: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_steps": 4, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "default_root_dir": str(root), "deterministic": True, "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
