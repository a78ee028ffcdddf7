"""A capture that summarises outputs as they are made and gradients as they arrive.

The reference is the same pass captured the usual way (every output and gradient kept), whose
tensors are then summarised: the summaries must be the same, bit for bit, and nothing large
may be kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core.summaries import summarize


class ConvNet(nn.Module):
    """Outputs of 8192 values (summarised at once) and a small head (kept); ReLU in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)  # overwrites the BatchNorm output after it was summarised
        self.head = nn.Linear(8 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))).flatten(1))


def _captured_step(summaries: lc.Summaries | None, layers: lc.selection.LayerSpec = "all") -> lc.ModelHistory:
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 16, 16)
    with lc.capture(model, layers, gradients=True, summaries=summaries) as cap:
        loss = model(x).square().mean()
    loss.backward()
    return cap.history


def test_large_outputs_and_their_gradients_are_summarised_and_not_kept() -> None:
    summaries = lc.Summaries()
    history = _captured_step(summaries)
    reference = _captured_step(None)
    found = summaries.result()
    streamed = [layer for layer in history.layer_list if layer.summarized]
    assert {layer.layer_type for layer in streamed} == {"input", "conv2d", "batchnorm", "relu", "flatten"}
    learned = [layer for layer in streamed if not layer.is_input]  # the input needs no gradient
    assert set(found) == {("activation", layer.index) for layer in streamed} | {
        ("gradient", layer.index) for layer in learned
    }
    for layer in learned:
        assert layer.tensor_contents is None
        assert layer.gradient is None
        assert layer.gradient_slot is not None
        assert layer.gradient_slot.arrived
        twin = reference[layer.label]
        expected = summarize({"activation": twin.tensor_contents, "gradient": twin.gradient})
        assert found["activation", layer.index] == expected["activation"], layer.label
        assert found["gradient", layer.index] == expected["gradient"], layer.label
    # the BatchNorm output is summarised as it was before ReLU overwrote it
    assert found["activation", history["batchnorm_1"].index].min < 0
    assert found["activation", history["relu_1"].index].min == 0
    small = [layer for layer in history.layer_list if layer.has_saved_activations]
    assert small
    assert all(layer.tensor_contents.numel() <= 2048 for layer in small)
    assert history.layer_labels == reference.layer_labels


def test_outputs_the_selection_does_not_pick_leave_no_summary() -> None:
    summaries = lc.Summaries()  # a negative ordinal is known at the end: everything is summarised in case
    history = _captured_step(summaries, layers=[-5])
    (picked,) = [layer for layer in history.layer_list if layer.summarized]
    assert picked.label == history.layer_list[-5].label
    assert set(summaries.result()) == {("activation", picked.index), ("gradient", picked.index)}
    assert history.layer_labels == [picked.label]


def test_a_second_backward_pass_warns_that_the_summary_is_of_the_first() -> None:
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 16, 16)
    summaries = lc.Summaries()
    with lc.capture(model, gradients=True, summaries=summaries) as cap:
        out = model(x)
    out.sum().backward(retain_graph=True)
    first = summaries.result()
    with pytest.warns(RuntimeWarning, match="second backward pass reached layer"):
        (2 * out).sum().backward()
    assert summaries.result() == first
    assert cap.history["conv2d_1_1"].gradient_slot.count == 2  # type: ignore[union-attr]


def test_capture_refuses_summaries_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"summaries must be a lens_core\.Summaries or None, got dict"):
        lc.Capture(ConvNet(), summaries={})  # type: ignore[arg-type]


def test_the_printed_history_says_which_outputs_were_summarised() -> None:
    history = _captured_step(lc.Summaries())
    text = str(history)
    assert f"{history['conv2d_1'].index}: {history['conv2d_1'].label} (summarised, not kept)" in text
    assert f"{history['linear_1'].index}: {history['linear_1'].label}\n" in text  # small: kept


def test_an_output_picked_at_the_op_and_again_as_a_module_output_is_summarised_once() -> None:
    summaries = lc.Summaries()  # "batchnorm" picks the op as it runs, "bn" the module's output
    history = _captured_step(summaries, layers=["bn", "batchnorm"])
    (picked,) = [layer for layer in history.layer_list if layer.summarized]
    assert picked.label == history["bn"].label
    assert set(summaries.result()) == {("activation", picked.index), ("gradient", picked.index)}
    assert picked.gradient_slot is not None
    assert picked.gradient_slot.count == 1  # one hook, not two


def test_a_saved_history_remembers_which_outputs_were_summarised(tmp_path: Path) -> None:
    history = _captured_step(lc.Summaries())
    loaded = lc.load(lc.save(history, tmp_path / "capture"))
    flags = [layer.summarized for layer in history.layer_list]
    assert any(flags)
    assert [layer.summarized for layer in loaded.layer_list] == flags
    assert loaded.layer_labels == history.layer_labels
