"""Code paths are worked out once per process and shared by every capture that walks them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core.capture import sites
from lens_core.capture.callers import caller_filter


class Branches(nn.Module):
    """One helper called from two lines: two layers, told apart only by their code paths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @staticmethod
    def helper(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.helper(self.fc(x))
        b = self.helper(a)
        return a + b


def _stacks(history: lc.ModelHistory) -> dict[str, list[tuple[str, int, str]]]:
    return {
        layer.label: [(f.call_fname, f.call_linenum, f.function) for f in layer.func_call_stack]
        for layer in history.layer_list
    }


def test_a_second_capture_reuses_the_first_one_s_code_paths() -> None:
    model, x = Branches(), torch.randn(2, 4)
    first = lc.get_model_metadata(model, x)
    second = lc.get_model_metadata(model, x)
    assert first.layer_labels == second.layer_labels
    tanh = [layer.label for layer in first.layer_list if layer.layer_type == "tanh"]
    assert tanh == ["tanh_1_2", "tanh_2_3"]
    assert _stacks(first) == _stacks(second)
    for a, b in zip(first.layer_list, second.layer_list, strict=True):
        assert a.frames is b.frames  # the same node, not an equal copy


def test_a_full_table_starts_afresh_and_labels_stay_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Branches(), torch.randn(2, 4)
    before = lc.get_model_metadata(model, x)
    table = sites.sites_for(caller_filter(lc.FRAMEWORK_PACKAGES))
    assert len(table.known) > 0
    monkeypatch.setattr(sites, "_MAX_SITES", 0)
    after = lc.get_model_metadata(model, x)  # the table is cleared as this capture starts
    assert after.layer_labels == before.layer_labels
    assert _stacks(after) == _stacks(before)
    assert len(table.known) < 20  # this capture's paths only


def test_filters_of_the_same_packages_are_one_filter() -> None:
    assert caller_filter(("trainkit", "mylib")) is caller_filter(["trainkit", "mylib"])
    assert caller_filter(lc.FRAMEWORK_PACKAGES) is caller_filter(tuple(lc.FRAMEWORK_PACKAGES))
    assert caller_filter(("trainkit",)) is not caller_filter(("mylib",))
    predicate = caller_filter(lambda module: module.startswith("trainkit"))
    assert predicate is not caller_filter(lambda module: module.startswith("trainkit"))


def test_a_capture_without_its_own_frame_walks_a_bounded_stack() -> None:
    """``Capture.start()`` with no frame to stop at (as training callbacks start it), deep in a
    recursion: each op keeps its nearest frames only, and repeats are recognised."""
    model, x = Branches(), torch.randn(2, 4)

    def deep(depth: int) -> lc.ModelHistory:
        if depth:
            return deep(depth - 1)
        cap = lc.capture(model).start()
        model(x).sum()
        return cap.stop()

    first, second = deep(200), deep(200)
    assert first.layer_labels == second.layer_labels
    # the nearest MAX_FRAMES above the model, and the few between the op and its module
    assert all(len(list(layer.frames or ())) < sites.MAX_FRAMES + 10 for layer in first.layer_list)
    assert first.layer_labels[-1] == "sum_1_6"  # the loss, at top level
