"""A writer that remembers what it was given (without tensors), and small models to train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lens_callbacks import CaptureRecord


@dataclass
class Seen:
    step: int
    stage: str
    rank: int
    micro_batches: int
    labels: list[str]
    activations: dict[str, Any]
    gradients: dict[str, Any]
    parameter_gradients: dict[str, Any]
    dtypes: dict[str, torch.dtype]


@dataclass
class ListWriter:
    """Keeps the facts of every capture; fails on purpose at the steps in ``fail_at``."""

    seen: list[Seen] = field(default_factory=list)
    fail_at: set[int] = field(default_factory=set)
    closed: bool = False

    def write(self, record: CaptureRecord) -> None:
        if record.step in self.fail_at:
            raise OSError(f"disk full at step {record.step}")
        self.seen.append(Seen(
            record.step, record.stage, record.rank, len(record.histories),
            list(record.history.layer_labels), dict(record.activations), dict(record.gradients),
            dict(record.parameter_gradients),
            {layer.label: layer.dtype for layer in record.history},
        ))

    def close(self) -> None:
        self.closed = True

    @property
    def steps(self) -> list[int]:
        return [seen.step for seen in self.seen]


@dataclass
class RecordWriter:
    """Keeps every record a capture hands over, tensors and all, to compare with an oracle."""

    records: list[CaptureRecord] = field(default_factory=list)

    def write(self, record: CaptureRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


class SummariesOnly(ListWriter):
    """Reads summaries, never tensors, and says so: captures may then summarise as they run."""

    save_tensors = False


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def batches(n: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 3, (size,), generator=generator))
        for _ in range(n)
    ]
