"""validate_model_activations: passes on correct captures, and really fails on wrong ones."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core.checks import validation


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        h = h.mean(dim=(2, 3))
        h[:, 0] = h[:, 0] * 2  # item assignment
        return self.fc(h) + torch.rand(1)  # a random op outside any module


@pytest.fixture
def model() -> Small:
    torch.manual_seed(0)
    return Small()


@pytest.mark.parametrize("training", [True, False])
def test_correct_capture_validates(model: Small, training: bool) -> None:
    model.train(training)
    report = lc.validation_report(model, torch.randn(2, 3, 6, 6))
    assert report.ok, str(report)
    assert {check.status for check in report.checks} <= {"ok", "close"}
    assert lc.validate_model_activations(model, torch.randn(2, 3, 6, 6)) is True


def test_validation_changes_nothing(model: Small) -> None:
    x = torch.randn(2, 3, 6, 6)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    lc.validate_model_activations(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training


def _tampered(change: Any) -> Any:
    def run_forward(cap: lc.Capture, args: Any, kwargs: Any) -> Any:
        history, output = validation_run_forward(cap, args, kwargs)
        change(history)
        return history, output

    return run_forward


validation_run_forward = validation.run_forward


def test_a_wrong_saved_value_is_caught(model: Small, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(history: lc.ModelHistory) -> None:
        history["conv"].tensor_contents = history["conv"].tensor_contents + 1e-3

    monkeypatch.setattr(validation, "run_forward", _tampered(corrupt))
    with pytest.warns(RuntimeWarning, match=r"conv2d_1_1: failed: replay differs"):
        assert lc.validate_model_activations(model, torch.randn(2, 3, 6, 6)) is False


def test_a_parent_that_was_not_really_used_is_caught(model: Small, monkeypatch: pytest.MonkeyPatch) -> None:
    def ignore_parents(history: lc.ModelHistory) -> None:
        layer = history["fc"]  # now "computed" without looking at its input
        saved = layer.tensor_contents
        layer.func = lambda *args, **kwargs: saved.detach().clone()

    monkeypatch.setattr(validation, "run_forward", _tampered(ignore_parents))
    x = torch.randn(2, 3, 6, 6)
    report = lc.validation_report(model, x)
    assert not report.ok
    assert [check.label for check in report.failures] == [lc.get_model_metadata(model, x)["fc"].label]
    assert "does not change when its parents change" in report.failures[0].reason


def test_output_mismatch_with_a_plain_run_is_reported(model: Small, monkeypatch: pytest.MonkeyPatch) -> None:
    def run_forward(cap: lc.Capture, args: Any, kwargs: Any) -> Any:
        history, output = validation_run_forward(cap, args, kwargs)
        return history, output + 1

    monkeypatch.setattr(validation, "run_forward", run_forward)
    report = lc.validation_report(model, torch.randn(2, 3, 6, 6))
    assert "differs from a plain run" in report.output_problem
    assert "FAILED" in str(report)
