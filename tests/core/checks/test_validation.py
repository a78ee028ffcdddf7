"""validate_model_activations: passes on correct captures, and really fails on wrong ones."""

from __future__ import annotations

import copy
import random
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


def _found(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """Every attribute, parameter, buffer and cache entry of every module: the object and a copy."""
    found: dict[str, tuple[Any, Any]] = {}
    for prefix, module in model.named_modules():
        members = {**vars(module), **module._parameters, **module._buffers, **module._modules}
        for key, value in list(members.items()):
            if isinstance(value, dict):  # a cache: its entries, by identity
                members.update({f"{key}[{k!r}]": v for k, v in value.items()})
        for key, value in members.items():
            copied = value.detach().clone() if isinstance(value, torch.Tensor) else None
            found[f"{prefix}.{key}"] = (value, copied)
    return found


def _assert_as_found(model: nn.Module, before: dict[str, tuple[Any, Any]]) -> None:
    after = _found(model)
    assert after.keys() == before.keys(), after.keys() ^ before.keys()
    for name, (value, copied) in before.items():
        assert after[name][0] is value, name
        if copied is not None:
            assert torch.equal(value, copied), name


class WeightNormed(nn.Module):
    """Old-style weight_norm: ``fc.weight`` is a non-leaf attribute, recomputed by every pass."""

    def __init__(self) -> None:
        super().__init__()
        with pytest.warns(FutureWarning, match="deprecated"):
            self.fc = nn.utils.weight_norm(nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class Stateful(nn.Module):
    """Keeps what its pass makes: a running count and mean, a cache of a computed tensor, the last hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls: torch.Tensor
        self.mean: torch.Tensor
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(4))
        self.cache: dict[str, torch.Tensor] = {}
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.mean.data = torch.lerp(self.mean, x.mean(0), 0.1)  # rebound to new storage, no op seen
        if "scale" not in self.cache:
            self.cache["scale"] = self.fc.weight.abs().mean()
        self.last = self.fc(x) * self.cache["scale"]
        return self.last.relu()


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-a-pass"])
@pytest.mark.parametrize("make", [WeightNormed, Stateful])
def test_models_keeping_autograd_results_validate_and_are_left_as_found(make: Any, warm: bool) -> None:
    # copy.deepcopy refuses these models once they hold non-leaf tensors (weight_norm's always does)
    torch.manual_seed(0)
    model, x = make(), torch.randn(5, 4)
    if warm:
        model(x)
    before = _found(model)
    assert lc.validate_model_activations(model, x) is True
    _assert_as_found(model, before)
    assert lc.validate_model_activations(model.eval(), x) is True


def test_state_that_cannot_be_put_back_is_named() -> None:
    class NoCopy(torch.Tensor):
        """A tensor type that refuses to be copied."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.Tensor.clone:
                raise RuntimeError("NoCopy tensors cannot be cloned")
            return super().__torch_function__(func, types, args, kwargs or {})

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.calls = torch.zeros(1).as_subclass(NoCopy)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return self.fc(x)

    report = lc.validation_report(Counting(), torch.randn(2, 3))
    assert not report.ok
    assert report.unrestored == [
        "calls: changed by the pass, and its values could not be copied beforehand "
        "(RuntimeError: NoCopy tensors cannot be cloned)"
    ]
    assert "model state not put back: calls: changed by the pass" in str(report)


class Recurrent(nn.Module):
    """A 2-layer RNN with dropout between its layers: one random op with several outputs."""

    def __init__(self, kind: str, packed: bool) -> None:
        super().__init__()
        self.packed = packed
        self.rnn = getattr(nn, kind)(4, 5, num_layers=2, dropout=0.5, batch_first=True, bidirectional=packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            out, _ = self.rnn(x)
            return out
        lengths = torch.tensor([6, 4, 3])
        packed, _ = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True))
        return nn.utils.rnn.pad_packed_sequence(packed, batch_first=True)[0]


@pytest.mark.parametrize(("kind", "packed"), [("LSTM", False), ("GRU", False), ("LSTM", True)],
                         ids=["lstm", "gru", "packed-bidirectional-lstm"])
def test_every_output_of_a_random_op_replays_from_the_state_the_op_started_with(
    kind: str, packed: bool
) -> None:
    torch.manual_seed(0)
    model = Recurrent(kind, packed).train()
    report = lc.validation_report(model, torch.randn(3, 6, 4))
    assert report.ok, str(report)
    rnn_checks = [check for check in report.checks if check.label.startswith(kind.lower())]
    assert len(rnn_checks) == (3 if kind == "LSTM" else 2)  # output, h_n (, c_n)
    assert {check.status for check in rnn_checks} <= {"ok", "close"}


def test_host_random_draws_are_the_same_in_both_passes_and_left_as_found() -> None:
    numpy = pytest.importorskip("numpy")

    class HostRandom(nn.Module):
        """Draws on the host, like wav2vec2's SpecAugment masks and layer drop."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            keep = torch.from_numpy(numpy.random.rand(*x.shape) > 0.5)
            return x * keep * (2.0 if random.random() < 0.5 else 3.0)

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    report = lc.validation_report(HostRandom(), torch.randn(4, 5))
    assert report.ok, str(report)
    assert random.getstate() == python_state
    assert all(numpy.array_equal(a, b) if isinstance(a, numpy.ndarray) else a == b
               for a, b in zip(numpy.random.get_state(), numpy_state, strict=True))


def test_a_parent_used_too_weakly_to_prove_is_skipped_not_failed() -> None:
    torch.manual_seed(0)
    gate = nn.Linear(16, 16)  # as gMLP's spatial gates start: weights near zero, bias one
    nn.init.normal_(gate.weight, std=1e-6)
    nn.init.ones_(gate.bias)
    model, x = nn.Sequential(nn.Linear(4, 16), gate), torch.randn(2, 4)
    report = lc.validation_report(model, x)
    assert report.ok, str(report)
    check = next(c for c in report.checks if c.label == lc.get_model_metadata(model, x)["1"].label)
    assert check.status == "skipped"
    assert "only within float tolerance" in check.reason
