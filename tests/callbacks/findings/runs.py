"""Short real training runs, each with a known pathology (or none), and what the findings saw."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lens_callbacks import CaptureRecord, DiskWriter, Lens, Writer
from lens_callbacks.findings import Finding, FindingsTracker, StepSummaries, find


@dataclass
class FindingsRecorder:
    """A writer doing what a driver with ``findings=True`` does: every record to a tracker."""

    model: nn.Module
    tracker: FindingsTracker = field(default_factory=FindingsTracker)
    steps: list[StepSummaries] = field(default_factory=list)
    live: list[Finding] = field(default_factory=list)
    save_tensors = False

    def write(self, record: CaptureRecord) -> None:
        self.live += self.tracker.observe(record, self.model)
        assert self.tracker.last is not None
        self.steps.append(self.tracker.last)

    def close(self) -> None:
        self.live += self.tracker.close()


@dataclass
class Run:
    steps: list[StepSummaries]
    live: list[Finding]
    losses: list[float]

    @property
    def findings(self) -> list[Finding]:
        return find(self.steps)

    def named(self, rule: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.rule == rule]


Batch = tuple[torch.Tensor, torch.Tensor]


def train(
    model: nn.Module,
    batch: Callable[[int], Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    every: int = 1,
    before_step: Callable[[int], None] | None = None,
    log_dir: Path | None = None,
) -> Run:
    recorder = FindingsRecorder(model)
    writers: list[Writer] = [recorder] if log_dir is None else [recorder, DiskWriter(log_dir)]
    lens = Lens(model, every_n_steps=every, writers=writers, findings=False)  # the recorder runs them
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x, y = batch(step)
        with lens.step(step):
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
    lens.close()
    return Run(recorder.steps, recorder.live, losses)


def _random_batches(inputs: int, classes: int, size: int = 16, seed: int = 0) -> Callable[[int], Batch]:
    generator = torch.Generator().manual_seed(seed)
    data = [(torch.randn(size, inputs, generator=generator),
             torch.randint(0, classes, (size,), generator=generator)) for _ in range(8)]
    return lambda step: data[step % len(data)]


# -- pathologies ----------------------------------------------------------------------------------


def deep_sigmoid_mlp(log_dir: Path | None = None) -> Run:
    """Ten sigmoid layers: the gradient shrinks by up to 4x per layer on its way down."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    return train(model, _random_batches(32, 4), F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                 steps=8, every=2, log_dir=log_dir)


def dead_relus(log_dir: Path | None = None) -> Run:
    """A hidden layer whose bias starts far below zero: every ReLU after it is off for good."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[2].bias.fill_(-20.0)
    return train(model, _random_batches(8, 3), F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.05),
                 steps=8, every=2, log_dir=log_dir)


def too_high_learning_rate() -> Run:
    """SGD with a learning rate a hundred times too high on a regression: the weights blow up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return train(model, lambda step: (x, y), F.mse_loss, torch.optim.SGD(model.parameters(), lr=1.5),
                 steps=8, every=1)


class LargeFp16(nn.Module):
    """A float16 model whose second layer's outputs reach tens of thousands (float16 stops at 65504)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.grow = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            self.grow.weight.mul_(3000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.grow(torch.relu(self.embed(x)))) / 1000.0)


def fp16_near_overflow() -> Run:
    torch.manual_seed(0)
    model = LargeFp16().half()
    batches = _random_batches(8, 2)

    def batch(step: int) -> Batch:
        x, y = batches(step)
        return x.half() * 4, y

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    return train(model, batch, loss_fn, torch.optim.SGD(model.parameters(), lr=1e-4), steps=4, every=1)


class Attention(nn.Module):
    """One head of self-attention with its softmax written out, and a temperature on its logits."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.register_buffer("logit_scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, dim)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) * self.logit_scale
        return self.out(scores.softmax(dim=-1) @ v)


class TinyTransformer(nn.Module):
    """Embedding, two pre-norm blocks (explicit attention, GELU MLP), mean-pooled classifier."""

    def __init__(
        self, vocab: int = 64, dim: int = 16, tokens: int = 8, classes: int = 4, blocks: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(tokens, dim) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "attention": Attention(dim), "norm2": nn.LayerNorm(dim),
            "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
        }) for _ in range(blocks))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (batch, tokens)
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = x + block["attention"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(x.mean(dim=1))


def _token_batches(seed: int = 0) -> Callable[[int], Batch]:
    """Sequences of 8 tokens of 64; the class is their sum mod 4."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(8):
        tokens = torch.randint(0, 64, (8, 8), generator=generator)
        data.append((tokens, tokens.sum(dim=1) % 4))
    return lambda step: data[step % len(data)]


def saturating_attention() -> Run:
    """The attention logits of every block are scaled up, x4 per captured step, until the softmax is
    one-hot."""
    torch.manual_seed(0)
    model = TinyTransformer()

    def heat(step: int) -> None:
        for block in model.blocks:
            block["attention"].logit_scale.fill_(4.0 ** (step // 2))

    return train(model, _token_batches(), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-3),
                 steps=10, every=2, before_step=heat)


# -- healthy runs ----------------------------------------------------------------------------------


def healthy_transformer(steps: int = 200, every: int = 10) -> Run:
    torch.manual_seed(0)
    model = TinyTransformer()
    return train(model, _token_batches(), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-3),
                 steps=steps, every=every)


class DigitsCNN(nn.Module):
    """The demo's CNN (examples/lightning_quickstart.py), in a plain loop."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        return self.classifier(self.features(x))


def digits_batches(size: int = 64) -> Callable[[int], Batch]:
    from sklearn.datasets import load_digits  # a dev dependency

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return lambda step: (images[order[step * size % 1700:][:size]], labels[order[step * size % 1700:][:size]])


def healthy_cnn(steps: int = 120, every: int = 5, log_dir: Path | None = None) -> Run:
    torch.manual_seed(0)
    model = DigitsCNN()
    return train(model, digits_batches(), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-3),
                 steps=steps, every=every, log_dir=log_dir)
