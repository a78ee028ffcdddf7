"""Findings as training runs: Lens and LensCallback run the rules by default and say what is new."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lens_callbacks import CaptureRecord, Lens, LensCallback
from lens_callbacks.findings import Finding
from tests.callbacks.helpers import batches
from tests.callbacks.lightning_helpers import LitCNN, loader, trainer
from tests.callbacks.test_lens import nothing_installed


@dataclass
class FindingsWriter:
    """A writer that also takes findings, as TensorBoard's and W&B's do."""

    findings: list[tuple[int, Finding]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def write(self, record: CaptureRecord) -> None:
        self.steps.append(record.step)

    def write_findings(self, findings: list[Finding], step: int) -> None:
        self.findings += [(step, finding) for finding in findings]

    def close(self) -> None:
        pass


def _dead_relu_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].bias.fill_(-50.0)
    return model


def test_lens_announces_each_new_finding_once(caplog: pytest.LogCaptureFixture) -> None:
    model, writer = _dead_relu_model(), FindingsWriter()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    lens = Lens(model, every_n_steps=1, writers=[writer])
    with caplog.at_level(logging.WARNING, logger="lens_callbacks.findings"):
        for step, (x, y) in enumerate(batches(4)):
            with lens.step(step):
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            optimizer.zero_grad()
        lens.close()
    assert writer.steps == [0, 1, 2, 3]
    dead = [(step, f) for step, f in writer.findings if f.rule == "dead_units"]
    assert [step for step, _ in dead] == [0]  # announced once, at the first step that shows it
    assert "relu_1_3" in dead[0][1].layers
    assert sum("dead_units" in message for message in caplog.messages) == 1
    assert nothing_installed(model)


def test_healthy_training_and_findings_false_say_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lens_callbacks.findings"):
        writer = FindingsWriter()
        trainer(tmp_path, [LensCallback(every_n_steps=1, writers=[writer])]).fit(LitCNN(), loader())
        assert writer.steps == [0, 1, 2, 3]
        assert writer.findings == []
        quiet = FindingsWriter()
        model = _dead_relu_model()
        lens = Lens(model, every_n_steps=1, writers=[quiet], findings=False)
        for step, (x, y) in enumerate(batches(2)):
            with lens.step(step):
                F.cross_entropy(model(x), y).backward()
        lens.close()
        assert quiet.findings == []
    assert caplog.messages == []
