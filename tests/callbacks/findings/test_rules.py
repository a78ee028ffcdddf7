"""The rules on hand-made summaries: estimates, thresholds, edge cases; the tracker and the update meter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lens_callbacks import CaptureRecord
from lens_callbacks.findings import (
    DEFAULT_RULES,
    DeadUnits,
    FindingsTracker,
    LayerFacts,
    NonFinite,
    Saturation,
    Severity,
    StepSummaries,
    SuddenChange,
    UpdateMeter,
    UpdateRatio,
    VanishingGradients,
    find,
)
from lens_callbacks.findings.rules import _fraction_in, collision_entropy
from lens_core import log_forward_pass
from lens_core.summaries import TensorSummary, summarize


def summary(tensor: torch.Tensor) -> TensorSummary:
    return summarize({"x": tensor})["x"]


def facts(label: str, index: int, layer_type: str, shape: tuple[int, ...] = (4, 8), *, params: bool = False,
          children: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> LayerFacts:
    return LayerFacts(label, index, layer_type, None, dtype, shape, params, children)


def step(number: int, layers: list[LayerFacts], activations: dict[str, torch.Tensor],
         gradients: dict[str, torch.Tensor] | None = None, previous: int | None = None) -> StepSummaries:
    return StepSummaries(
        number, {f.label: f for f in layers}, {k: summary(v) for k, v in activations.items()},
        {k: summary(v) for k, v in (gradients or {}).items()}, {}, previous,
    )


def test_fraction_in_counts_the_overlap_of_each_bin() -> None:
    values = summary(torch.linspace(0, 1, 10_001))  # 64 even bins over [0, 1]
    assert _fraction_in(values, 0.0, 0.25) == pytest.approx(0.25, abs=1e-3)
    assert _fraction_in(values, 0.9, 2.0) == pytest.approx(0.1, abs=1e-3)
    assert _fraction_in(values, 2.0, 3.0) == 0.0
    assert _fraction_in(summary(torch.full((5,), 0.5)), 0.4, 0.6) == 1.0  # all in one zero-width bin


def test_collision_entropy_is_log_k_for_uniform_rows_and_zero_for_one_hot() -> None:
    assert collision_entropy(summary(torch.full((6, 8), 1 / 8)), 8) == pytest.approx(math.log(8))
    assert collision_entropy(summary(torch.eye(8)[:6]), 8) == pytest.approx(0.0, abs=1e-12)


def test_thresholds_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match=r"zero_fraction=1\.5"):
        DeadUnits(zero_fraction=1.5)
    with pytest.raises(ValueError, match="ratio=0"):
        VanishingGradients(ratio=0)
    with pytest.raises(ValueError, match="factor=1"):
        SuddenChange(factor=1)
    with pytest.raises(TypeError, match=r"not a lens_callbacks\.findings\.Rule"):
        FindingsTracker(rules=["dead_units"])  # type: ignore[list-item]


def test_every_rule_is_documented() -> None:
    names = [rule.name for rule in DEFAULT_RULES]
    assert len(set(names)) == len(names) == 10
    for rule in DEFAULT_RULES:
        assert rule.threshold
        assert rule.reason
        assert rule.source


def test_non_finite_names_the_first_op_and_ranks_above_everything() -> None:
    layers = [facts("linear_1_1", 1, "linear", params=True), facts("relu_1_2", 2, "relu"),
              facts("linear_2_3", 3, "linear", params=True)]
    broken = torch.tensor([[1.0, math.nan], [math.inf, 0.0]])
    healthy = {"linear_1_1": torch.ones(4, 8), "relu_1_2": torch.zeros(4, 8)}
    steps = [step(0, layers, healthy), step(5, layers, {**healthy, "linear_2_3": broken}, previous=0)]
    found = find(steps)
    assert [f.rule for f in found] == ["non_finite", "dead_units"]
    assert found[0].severity is Severity.ERROR
    assert found[0].steps == (5,)
    assert found[0].message.startswith("the activation of linear_2_3 first holds NaN or Inf at step 5")
    assert found[1].steps == (0, 5)
    assert "dead" in found[1].message  # zero at every captured step


def test_dead_units_leave_dropout_and_partial_sparsity_alone() -> None:
    layers = [facts("dropout_1_1", 1, "dropout"), facts("relu_1_2", 2, "relu")]
    sparse = torch.zeros(100)
    sparse[:10] = 1.0  # 90% zeros: below the 95% threshold
    assert find([step(0, layers, {"dropout_1_1": torch.zeros(100), "relu_1_2": sparse})]) == []


def test_sudden_change_compares_consecutive_captures_only() -> None:
    layers = [facts("linear_1_1", 1, "linear")]
    small, large = torch.full((4, 8), 0.01), torch.full((4, 8), 10.0)
    jumped = [step(0, layers, {"linear_1_1": small}), step(1, layers, {"linear_1_1": large}, previous=0)]
    (finding,) = find(jumped)
    assert (finding.rule, finding.steps, finding.layers) == ("sudden_change", (0, 1), ("linear_1_1",))
    assert "x1e+03" in finding.message
    apart = [step(0, layers, {"linear_1_1": small}), step(9, layers, {"linear_1_1": large}, previous=5)]
    assert find(apart) == []  # captures 5 (not kept) and 9 are the consecutive ones


def test_tanh_saturation_from_the_histogram() -> None:
    layers = [facts("tanh_1_1", 1, "tanh")]
    saturated = torch.cat([torch.full((80,), 0.995), torch.full((20,), 0.1)])
    (finding,) = find([step(0, layers, {"tanh_1_1": saturated})], [Saturation()])
    assert finding.message.startswith("80% of the output of tanh tanh_1_1 is within 2% of its bounds")
    assert find([step(0, layers, {"tanh_1_1": torch.linspace(-0.9, 0.9, 100)})], [Saturation()]) == []


def test_the_tracker_announces_each_finding_once_and_keeps_few_steps() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-50.0)
    history = log_forward_pass(model, torch.randn(2, 4), layers_to_save="all")
    tracker = FindingsTracker(measure_updates=False)
    announced = []
    for number in range(10):
        record = CaptureRecord(step=number, stage="train", rank=0, histories=[history],
                               activations={"relu_1_2": summary(torch.zeros(2, 4))})
        announced.append([f.key for f in tracker.observe(record)])
    assert announced[0] == [("dead_units", "relu_1_2")]
    assert announced[1:] == [[]] * 9
    assert len(tracker._window()) == 5  # the first three and the last two
    assert tracker.observe(CaptureRecord(step=10, stage="validate", rank=0, histories=[history])) == []


def test_the_update_meter_measures_one_optimizer_step_of_the_weight_matrices() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(5, 6)).square().sum().backward()
    expected = 0.5 * model.weight.grad.norm() / model.weight.detach().norm()  # type: ignore[union-attr]
    meter = UpdateMeter()
    meter.start(model, ["weight", "bias"])
    assert meter.pending
    other = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)  # another model's optimizer: ignored
    other.step()
    assert meter.pending
    optimizer.step()
    assert not meter.pending
    ratios = meter.take()
    assert list(ratios) == ["weight"]  # biases are left out
    assert ratios["weight"] == pytest.approx(float(expected), rel=1e-5)
    optimizer.step()  # the hook is gone: nothing more is measured
    assert meter.take() == {}


def test_update_ratio_flags_large_updates_only() -> None:
    layers = [facts("linear_1_1", 1, "linear")]
    quiet, loud = step(0, layers, {}), step(1, layers, {}, previous=0)
    quiet.updates.update({"0.weight": 1e-3})
    loud.updates.update({"0.weight": 2.0, "2.weight": 0.01})
    (finding,) = find([quiet, loud], [UpdateRatio()])
    assert (finding.layers, finding.steps) == (("0.weight",), (1,))
    assert NonFinite().check([quiet, loud]) == []
