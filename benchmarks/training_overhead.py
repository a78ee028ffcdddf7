"""What LensCallback costs a Lightning run: steps per second, side by side in one run.

Per model, five configurations fit the same number of steps from the same start:
(a) no callback, (b) a callback that never fires, (c) capturing every 10th step,
(d) capturing every step (summaries only, all layers), (e) the same with the training-health
findings run on every capture (``FindingsTracker``, update ratios included), interleaved and
repeated, each
configuration in every place of the order in turn. A step is timed
from Lightning's batch start to its batch end (forward, backward, optimizer step and all the
callback's work); steps/s is one over the median step time (of every step but the first few of
each fit, all repeats together), which a busy machine's stalls do not move as they move a
whole fit's time. (c) is the mean of the median time of captured and uncaptured steps, weighted
1:9. The time the findings take per captured step (the rules, and the copy of the weights
the update ratio needs) is printed on its own too, as the median over every captured step of (e).

    python benchmarks/training_overhead.py [--steps 60] [--repeats 4] [--models cnn] [--quick]
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

from lens_callbacks import CaptureRecord, LensCallback
from lens_callbacks.findings import FindingsTracker

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
FINDINGS_SECONDS: list[float] = []
"""Seconds ``FindingsTracker.observe`` took, per captured step of configuration (e)."""


class FindingsTimer(pl.Callback):
    """A writer doing what ``findings=True`` does with each record, timed (a callback too, to
    learn the model the update ratios are measured on)."""

    save_tensors = False

    def __init__(self) -> None:
        self.tracker = FindingsTracker()
        self.model: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.model = pl_module

    def write(self, record: CaptureRecord) -> None:
        started = time.perf_counter()
        self.tracker.observe(record, self.model)
        FINDINGS_SECONDS.append(time.perf_counter() - started)

    def close(self) -> None:
        self.tracker.close()


def _with_findings() -> list[pl.Callback]:
    timer = FindingsTimer()
    return [LensCallback(every_n_steps=1, writers=[timer]), timer]


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "no callback": list,
    "never fires": lambda: [LensCallback(steps=[10**9], writers=[])],
    "every 10th step": lambda: [LensCallback(every_n_steps=10, writers=[])],
    "every step": lambda: [LensCallback(every_n_steps=1, writers=[])],
    "every step + findings": _with_findings,
}


class StepTimer(pl.Callback):
    """Wall time of each training step: put it first and ``timer.end`` last among the callbacks,
    so that the others' work at batch start and batch end is inside the time."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.started = 0.0
        self.end = _StepEnd(self)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.started = time.perf_counter()


class _StepEnd(pl.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.timer.times[trainer.global_step - 1] = time.perf_counter() - self.timer.started


WARMUP = 5  # first steps of each fit left out: allocator and caches settling


def step_times(name: str, callbacks: list[pl.Callback], steps: int, root: str) -> dict[int, float]:
    """Seconds per training step of one fit, by step number (warm-up steps left out)."""
    make_net, make_inputs = MODELS[name]
    torch.manual_seed(0)
    inputs = make_inputs(32 * 8)
    data = DataLoader(TensorDataset(inputs, torch.randint(0, 10, (len(inputs),))), batch_size=32)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[timer, *callbacks, timer.end],
    )
    trainer.fit(Classifier(make_net()), data)
    return {step: t for step, t in timer.times.items() if step >= WARMUP}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 steps, 1 repeat")
    args = parser.parse_args(argv)
    steps, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    head = ["model", *[f"{config} steps/s" for config in CONFIGS], "(b)/(a)", "(c)/(a)", "(d)/(a)", "(e)/(a)",
            "findings ms per capture"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            FINDINGS_SECONDS.clear()
            fits: dict[str, list[float]] = {config: [] for config in CONFIGS}  # mean step of each fit
            for repeat in range(repeats):  # interleaved, each in every place of the order in turn:
                order = list(CONFIGS)[repeat % len(CONFIGS):] + list(CONFIGS)[:repeat % len(CONFIGS)]
                for config in order:  # a machine that slows down or speeds up hits all alike
                    fits[config].append(_mean_step(config, step_times(name, CONFIGS[config](), steps, root)))
            # slowdowns compare the fits of one repeat, which ran minutes apart at most
            slowdowns = [
                statistics.median(t / base for t, base in zip(fits[config], fits["no callback"], strict=True))
                for config in ("never fires", "every 10th step", "every step", "every step + findings")
            ]
            rates = [f"{1 / statistics.median(fits[c]):.1f}" for c in CONFIGS]
            findings_ms = 1000 * statistics.median(FINDINGS_SECONDS)
            cells = rates + [f"{s:.3f}x" for s in slowdowns] + [f"{findings_ms:.2f}"]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{repeats} fits of {steps} steps per configuration, batch 32, CPU, {THREADS} threads, "
          f"torch {torch.__version__}, lightning {pl.__version__}; steps/s from median step times; "
          "(x)/(a): median over repeats of the slowdown against no callback. Captures keep summaries "
          "only, of every layer.")


def _mean_step(config: str, times: dict[int, float]) -> float:
    """Mean step time of a fit: the medians of its captured and uncaptured steps, weighted by
    how many there are."""
    captured = [t for step, t in times.items() if _captures(config, step)]
    plain = [t for step, t in times.items() if not _captures(config, step)]
    if not captured or not plain:
        return statistics.median(captured or plain)
    share = len(captured) / len(times)
    return share * statistics.median(captured) + (1 - share) * statistics.median(plain)


def _captures(config: str, step: int) -> bool:
    return config.startswith("every step") or (config == "every 10th step" and step % 10 == 0)


if __name__ == "__main__":
    main()
