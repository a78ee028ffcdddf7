"""Findings in TensorBoard (text panel, scalars) and W&B (a table), read back from what was written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lens_callbacks import CaptureRecord, Lens, TensorBoardWriter
from lens_callbacks.findings import FindingsTracker

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class WithFindings:
    """What a driver with ``findings=True`` does: the record to the writer, then the findings it makes new."""

    writer: Any
    model: nn.Module
    tracker: FindingsTracker = field(default_factory=FindingsTracker)
    step: int = 0
    save_tensors = False

    def write(self, record: CaptureRecord) -> None:
        self.writer.write(record)
        self.step = record.step
        self.writer.write_findings(self.tracker.observe(record, self.model), record.step)

    def close(self) -> None:
        self.writer.write_findings(self.tracker.close(), self.step)
        self.writer.close()


def dead_relu_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    return model


def train(writer: Any, model: nn.Module, steps: int = 4) -> None:
    lens = Lens(model, every_n_steps=1, writers=[WithFindings(writer, model)], strict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randn(8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        with lens.step(step):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        optimizer.zero_grad()
    lens.close()


def test_tensorboard_gets_a_text_table_and_scalars_once_per_new_finding(tmp_path: Path) -> None:
    train(TensorBoardWriter(tmp_path, graphs=False, histograms=False), dead_relu_model())
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    (text,) = events.Tensors("lens.findings/text_summary")  # announced at step 0, not again
    assert text.step == 0
    table = text.tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| severity | rule | since | layers | finding |"
    assert "| WARNING | dead_units | 0 | relu_1_2 |" in table
    (score,) = events.Scalars("lens.findings/dead_units")
    assert score.step == 0
    assert score.value > 0
    assert [event.value for event in events.Scalars("lens.findings/new")] == [1]


def test_a_healthy_run_writes_no_findings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    healthy = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    train(TensorBoardWriter(tmp_path, graphs=False, histograms=False), healthy)
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert not [tag for tag in events.Tags()["tensors"] + events.Tags()["scalars"] if "findings" in tag]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for variable, folder in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                             ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    yield tmp_path
    if wandb.run is not None:
        wandb.run.finish()


def test_wandb_gets_a_findings_table_at_the_step(offline: Path) -> None:
    import wandb

    from lens_callbacks import WandbWriter
    from lens_callbacks.writers.wandb import FINDINGS_COLUMNS
    from tests.callbacks.writers import wandb_records

    run = wandb.init(project="lens-test", dir=offline)
    train(WandbWriter(run, graph=False), dead_relu_model(), steps=3)
    run.finish()
    rows = [row for row in wandb_records.history_rows(wandb_records.finished_records(offline))
            if "lens/findings" in row]
    assert len(rows) == 1
    (row,) = rows
    assert (row["lens/step"], row["lens/findings_new"]) == (0, 1)
    logged = row["lens/findings"]
    table = json.loads((wandb_records.run_file(offline).parent / "files" / logged["path"]).read_text())
    assert table["columns"] == list(FINDINGS_COLUMNS)
    (found,) = [dict(zip(FINDINGS_COLUMNS, data, strict=True)) for data in table["data"]]
    assert (found["severity"], found["rule"], found["since"], found["layers"]) == ("warning", "dead_units", 0,
                                                                                 "relu_1_2")
