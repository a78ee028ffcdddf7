"""Trains LitCNN on 2 CPU processes (gloo) with LensCallback; run by test_ddp.py.

Usage: python -m tests.callbacks.ddp_train ROOT STRATEGY RANKS
"""

from __future__ import annotations

import sys

import torch

from lens_callbacks import LensCallback
from tests.callbacks.lightning_helpers import LitCNN, loader, trainer


def main() -> None:
    root, strategy, ranks = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    callback = LensCallback(layers="conv", every_n_steps=2, ranks=ranks, log_dir=root)  # type: ignore[arg-type]
    run = trainer(root, [callback], devices=2, strategy=strategy, max_steps=3)
    run.fit(LitCNN(), loader())


if __name__ == "__main__":
    main()
