"""Training captures hold the model's ops and the loss, the same labels at every captured step.

The oracle is a capture of the user's computation alone (the model and the loss, outside any
framework): a captured training step must have exactly its layers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import lens_core as lc
from lens_callbacks import CaptureRecord, Lens, LensCallback
from tests.callbacks.lightning_helpers import trainer
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints on tiny runs


@dataclass
class HistoryWriter:
    """Keeps the first micro-batch's history of every capture."""

    histories: dict[int, lc.ModelHistory] = field(default_factory=dict)

    def write(self, record: CaptureRecord) -> None:
        self.histories[record.step] = record.history

    def close(self) -> None:
        pass


def _demo() -> ModuleType:
    """The `make demo` job's module: its DigitsCNN logs its loss and has BatchNorm layers."""
    require(importlib.util.find_spec("sklearn") is not None, "scikit-learn is not installed")
    path = ROOT / "examples" / "lightning_quickstart.py"
    spec = importlib.util.spec_from_file_location("lightning_quickstart", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _oracle_labels(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    with lc.capture(model) as cap:
        F.cross_entropy(model(images), labels)
    return cap.history.layer_labels


def test_the_demo_s_captured_steps_hold_the_model_and_the_loss_only(tmp_path: Path) -> None:
    demo = _demo()
    torch.manual_seed(0)
    model, writer = demo.DigitsCNN(), HistoryWriter()
    trainer(tmp_path, [LensCallback(every_n_steps=2, writers=[writer])], max_steps=6).fit(
        model, demo.digits_loader()
    )
    assert sorted(writer.histories) == [0, 2, 4]
    images, labels = next(iter(demo.digits_loader()))
    expected = _oracle_labels(model.train(), images, labels)
    for step, history in writer.histories.items():
        assert history.layer_labels == expected, f"step {step}"
        assert not history.is_recurrent
        modules = {layer.module for layer in history if layer.module}
        assert modules <= {name for name, _ in model.named_modules()}
    assert [layer.layer_type for layer in writer.histories[4] if not layer.module] == [
        "input", "output", "input", "crossentropy",
    ]


def test_a_plain_loop_with_the_optimizer_inside_the_block(tmp_path: Path) -> None:
    demo = _demo()
    torch.manual_seed(0)
    model, writer = demo.DigitsCNN(), HistoryWriter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    lens = Lens(model, every_n_steps=1, writers=[writer], grad_scaler=scaler)
    batches = iter(demo.digits_loader())
    for step in range(3):
        images, labels = next(batches)
        with lens.step(step):
            loss = F.cross_entropy(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    lens.close()
    expected = _oracle_labels(model, images, labels)
    assert [writer.histories[step].layer_labels for step in range(3)] == [expected] * 3
