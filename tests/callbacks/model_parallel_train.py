"""Trains an MLP with Lightning's ModelParallelStrategy (FSDP2 in ``configure_model``) on 2 CPU
processes with LensCallback on every rank; run by test_sharded.py.

Usage: python -m tests.callbacks.model_parallel_train ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lens_callbacks import LensCallback
from tests.callbacks.ddp_train import EndDistributed
from tests.callbacks.fsdp_train import MLP


class GradientOracle(pl.Callback):
    """Writes ``oracle_rank_<k>.json``: step -> name -> L2 norm of this rank's part of the whole
    gradient, gathered here (``full_tensor()``, a collective every rank joins) and cut by placement."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        norms = {}
        for name, param in pl_module.named_parameters():
            whole = param.grad.full_tensor()
            for placement in param.grad.placements:
                if placement.is_shard():
                    whole = torch.chunk(whole, world, dim=placement.dim)[rank]
            norms[name] = whole.double().norm().item()
        self.norms[trainer.global_step] = norms
        (self.root / f"oracle_rank_{rank}.json").write_text(json.dumps(self.norms))


class ShardedMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.net.up, self.net.down):
            fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = self.net(x).square().mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    root = Path(sys.argv[1])
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 8)), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
        callbacks=[
            LensCallback(every_n_steps=1, ranks="all", log_dir=root), GradientOracle(root), EndDistributed(),
        ],
    )
    trainer.fit(ShardedMLP(), data)


if __name__ == "__main__":
    main()
