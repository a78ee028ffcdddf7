"""Which ops are layers: the model's computation, not the framework code around it, nor bookkeeping."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc


@pytest.fixture
def trainkit(tmp_path: Path) -> Iterator[ModuleType]:
    """A real package on disk, ``trainkit``, standing for a training framework: it logs a loss
    the way Lightning's ``self.log`` does and moves tensors around, as frameworks do."""
    package = tmp_path / "trainkit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "logging.py").write_text(textwrap.dedent("""
        import copy
        import torch

        def log(value):
            kept = value.detach().clone().to(torch.float64)
            return copy.deepcopy(kept).mean()

        def prepare(x):
            return (x * 1.0).contiguous()
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("trainkit.logging")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "trainkit" or n.startswith("trainkit.")]:
            del sys.modules[name]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def _types(history: lc.ModelHistory) -> list[str]:
    return [layer.layer_type for layer in history]


def test_ops_issued_by_a_framework_package_are_not_layers(trainkit: ModuleType) -> None:
    model, x, y = Net(), torch.randn(2, 4), torch.tensor([0, 2])
    with lc.capture(model, framework=("trainkit",)) as cap:
        loss = F.cross_entropy(model(x), y)
        trainkit.log(loss)  # detach, clone, to, deepcopy (through the standard library), mean
    assert _types(cap.history) == ["input", "linear", "relu", "output", "input", "crossentropy"]
    with lc.capture(model, framework=()) as everything:
        trainkit.log(F.cross_entropy(model(x), y))
    assert {"detach", "clone", "to", "deepcopy", "mean"} <= set(_types(everything.history))


def test_a_framework_op_is_transparent_to_the_layers_that_read_its_output(trainkit: ModuleType) -> None:
    model = Net()
    with lc.capture(model, framework=("trainkit",)) as cap:
        x = torch.randn(2, 4)
        h = torch.tanh(x)
        model(trainkit.prepare(h))  # mul and contiguous by the framework, between tanh and fc
    history = cap.history
    assert history["fc"].parents == (history["tanh_1_1"].label,)
    assert "mul" not in _types(history)


def test_framework_option_forms(trainkit: ModuleType) -> None:
    model, x = Net(), torch.randn(2, 4)

    def run(framework: object) -> list[str]:
        with lc.capture(model, framework=framework) as cap:  # type: ignore[arg-type]
            trainkit.log(model(x))
        return _types(cap.history)

    model_only = ["input", "linear", "relu", "output"]
    assert run("trainkit") == model_only  # one package
    assert run(lambda module: module.startswith("trainkit")) == model_only  # a predicate
    assert run((*lc.FRAMEWORK_PACKAGES, "trainkit")) == model_only
    assert "clone" in run(lc.FRAMEWORK_PACKAGES)  # not a framework by default
    for bad in (3, b"trainkit", ["trainkit", 3], [""]):
        with pytest.raises(TypeError, match="framework"):
            lc.Capture(model, framework=bad)  # type: ignore[arg-type]


def test_torch_optim_steps_inside_a_capture_add_no_layers() -> None:
    model, x = Net(), torch.randn(2, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with lc.capture(model) as cap:
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _types(cap.history) == ["input", "linear", "relu", "output", "sum"]


def test_the_default_keeps_every_op_of_torch_nn_code_and_the_loss() -> None:
    # torch.nn's Python (functional wrappers, MultiheadAttention) is the model, not plumbing
    model = nn.Sequential(nn.LayerNorm(8), nn.Dropout(0.1), nn.TransformerEncoderLayer(8, 2, 16))
    x = torch.randn(3, 5, 8)

    def labels(framework: object) -> list[str]:
        torch.manual_seed(0)
        with lc.capture(model, framework=framework) as cap:  # type: ignore[arg-type]
            F.mse_loss(model(x), torch.zeros(3, 5, 8))
        return cap.history.layer_labels

    assert labels(lc.FRAMEWORK_PACKAGES) == labels(())
    assert len(labels(())) > 15


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_bookkeeping_of_buffers_is_not_a_layer() -> None:
    model, x = BatchNormNet().train(), torch.randn(2, 1, 4, 4)
    history = lc.log_forward_pass(model, x)
    assert _types(history) == ["input", "conv2d", "batchnorm", "output"]
    assert not history.is_recurrent
    assert model.bn.num_batches_tracked.item() == 1  # the update itself still ran
    kept = lc.log_forward_pass(model, x, bookkeeping=True)
    assert _types(kept) == ["input", "conv2d", "add", "batchnorm", "output"]
    assert kept["add_1_2"].buffers == ("bn.num_batches_tracked",)
    with pytest.raises(TypeError, match="bookkeeping"):
        lc.Capture(model, bookkeeping="no")  # type: ignore[arg-type]


def test_labels_are_stable_across_captures_of_a_batchnorm_model_in_training() -> None:
    model = BatchNormNet().train()
    labels = [lc.get_model_metadata(model, torch.randn(2, 1, 4, 4)).layer_labels for _ in range(3)]
    assert labels[0] == labels[1] == labels[2]
