"""Each pathology, produced by real training, is named with the right layers and steps;
healthy runs are silent."""

from __future__ import annotations

import pytest

from lens_callbacks.findings import Finding, Severity
from tests.callbacks.findings import runs


def _rules(findings: list[Finding]) -> set[str]:
    return {finding.rule for finding in findings}


def test_deep_sigmoid_mlp_has_vanishing_gradients_in_its_early_layers() -> None:
    run = runs.deep_sigmoid_mlp()
    assert _rules(run.findings) == {"vanishing_gradients"}
    (finding,) = run.findings
    assert finding.steps == (0, 2, 4, 6)  # at every captured step, from the first
    assert finding.layers[0] == "linear_1_1"  # the first layer with parameters
    assert "linear_11_21" not in finding.layers  # the last one is the reference
    assert "1.2e-09" in finding.message or "e-" in finding.message
    assert [f.key for f in run.live] == [finding.key]  # announced once, at the first capture


def test_large_negative_bias_kills_the_relus_after_it() -> None:
    run = runs.dead_relus()
    assert _rules(run.findings) == {"dead_units"}
    (finding,) = run.findings
    assert finding.layers == ("relu_2_4",)  # the ReLU after the layer with the bias, not the first one
    assert finding.steps == (0, 2, 4, 6)
    assert "every captured step" in finding.message
    assert "(in 3)" in finding.message  # the module the op ran in


def test_too_high_learning_rate_shows_as_update_ratios_and_explosion() -> None:
    run = runs.too_high_learning_rate()
    assert run.losses[-1] > 1e6 * run.losses[0]  # it did diverge
    found = _rules(run.findings)
    assert {"update_ratio", "exploding_gradients"} <= found
    assert run.findings[0].rule == "exploding_gradients"  # an error: ranked first
    (updates,) = [f for f in run.findings if f.rule == "update_ratio"]
    assert set(updates.layers) == {"0.weight", "2.weight", "4.weight"}  # weight matrices only
    assert updates.since == 0  # the very first update is already too large
    (exploding,) = [f for f in run.findings if f.rule == "exploding_gradients"]
    assert exploding.severity is Severity.ERROR
    assert exploding.steps[-1] == 7
    assert exploding.since > 0  # grows from an early baseline
    assert "non_finite" not in found  # the run stopped before Inf: the findings saw it coming


def test_fp16_values_near_overflow() -> None:
    run = runs.fp16_near_overflow()
    headroom = [f for f in run.findings if f.rule == "numeric_headroom"]
    assert {f.subject for f in headroom} == {"activation of linear_2_3", "activation of relu_2_4"}
    assert all(f.steps == (0, 1, 2, 3) for f in headroom)
    assert "float16's maximum" in headroom[0].message
    # the loss is divided by 1000 on the way out: its float16 gradients underflow
    assert {f.layers[0] for f in run.findings if f.rule == "fp16_underflow"} >= {"linear_2_3"}
    assert "vanishing_gradients" not in _rules(run.findings)


def test_scaled_attention_logits_saturate_the_softmax_and_collapse_its_entropy() -> None:
    run = runs.saturating_attention()
    collapse = [f for f in run.findings if f.rule == "attention_entropy_collapse"]
    assert {f.layers for f in collapse} == {("softmax_1_12",), ("softmax_2_30",)}  # both blocks' softmax
    assert {(f.since, f.steps[-1]) for f in collapse} == {(6, 8)}  # the scale is 64 x at step 6
    saturated = [f for f in run.findings if f.rule == "saturation"]
    assert saturated
    assert all(f.layers[0].startswith("softmax") for f in saturated)
    assert "one-hot" in saturated[0].message
    assert _rules(run.findings) == {"attention_entropy_collapse", "saturation"}


@pytest.mark.parametrize("make", [runs.healthy_cnn, runs.healthy_transformer],
                         ids=["demo_cnn", "transformer"])
def test_healthy_runs_have_no_findings(make: object) -> None:
    run = make()  # type: ignore[operator]
    assert run.losses[-1] < 0.2 * run.losses[0]  # they did learn
    assert run.findings == []
    assert run.live == []
    assert any(step.updates for step in run.steps)  # the update ratios were measured, and fine
