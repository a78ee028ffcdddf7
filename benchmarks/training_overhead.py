"""What LensCallback costs a Lightning run: steps per second, side by side in one run.

Per model, four configurations fit the same number of steps from the same start:
(a) no callback, (b) a callback that never fires, (c) capturing every 10th step,
(d) capturing every step (summaries only, all layers), each repeated and the median taken.

    python benchmarks/training_overhead.py [--steps 60] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lens_callbacks import LensCallback

THREADS = 2


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def cnn() -> nn.Module:
    """A mid-size CNN: 3 conv blocks with BatchNorm, 32x32 inputs."""
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.Flatten(), nn.Linear(128 * 16, 10))


class TinyTransformer(nn.Module):
    """A small transformer classifier over 32 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 128)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(128, 4, 256, batch_first=True), 2)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "cnn": (cnn, lambda n: torch.randn(n, 3, 32, 32)),
    "transformer": (TinyTransformer, lambda n: torch.randint(0, 100, (n, 32))),
}
CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "no callback": list,
    "never fires": lambda: [LensCallback(steps=[10**9], writers=[])],
    "every 10th step": lambda: [LensCallback(every_n_steps=10, writers=[])],
    "every step": lambda: [LensCallback(every_n_steps=1, writers=[])],
}


def steps_per_second(name: str, callbacks: list[pl.Callback], steps: int, root: str) -> float:
    make_net, make_inputs = MODELS[name]
    torch.manual_seed(0)
    inputs = make_inputs(32 * 8)
    data = DataLoader(TensorDataset(inputs, torch.randint(0, 10, (len(inputs),))), batch_size=32)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
    )
    model = Classifier(make_net())
    start = time.perf_counter()
    trainer.fit(model, data)
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 steps, 1 repeat")
    args = parser.parse_args(argv)
    steps, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    head = ["model", *[f"{config} steps/s" for config in CONFIGS], "(b)/(a)", "(c)/(a)", "(d)/(a)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    with tempfile.TemporaryDirectory() as root:
        for name in MODELS:
            rates: dict[str, list[float]] = {config: [] for config in CONFIGS}
            for _ in range(repeats):  # interleaved, so that drifting load hits all alike
                for config, callbacks in CONFIGS.items():
                    rates[config].append(steps_per_second(name, callbacks(), steps, root))
            median: dict[str, Any] = {config: statistics.median(r) for config, r in rates.items()}
            base = median["no callback"]
            slowdowns = [base / median[c] for c in ("never fires", "every 10th step", "every step")]
            cells = [f"{median[c]:.1f}" for c in CONFIGS] + [f"{s:.3f}x" for s in slowdowns]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nmedians of {repeats} fits of {steps} steps, batch 32, CPU, {THREADS} threads, "
          f"torch {torch.__version__}, lightning {pl.__version__}; (x)/(a) is the slowdown against no "
          "callback (time per step ratio). Captures keep summaries only, of every layer.")


if __name__ == "__main__":
    main()
