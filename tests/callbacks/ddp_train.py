"""Trains LitCNN on 2 CPU processes (gloo) with LensCallback; run by test_ddp.py.

Usage: python -m tests.callbacks.ddp_train ROOT STRATEGY RANKS
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch

from lens_callbacks import LensCallback
from tests.callbacks.lightning_helpers import LitCNN, loader, trainer


class EndDistributed(pl.Callback):
    """Destroys the process group when the run ends. Lightning does that at exit for NCCL only;
    a gloo group left to the interpreter's exit now and then aborts a rank ("terminate called
    without an active exception", SIGABRT) after a successful fit."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main() -> None:
    root, strategy, ranks = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    callback = LensCallback(layers="conv", every_n_steps=2, ranks=ranks, log_dir=root)  # type: ignore[arg-type]
    run = trainer(root, [callback, EndDistributed()], devices=2, strategy=strategy, max_steps=3)
    run.fit(LitCNN(), loader())


if __name__ == "__main__":
    main()
