"""``str(history)``: the TorchLens-style text, in time linear in the number of layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core.capture.history import ModelHistory


class Chain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(50):
            x = x + 1
        return x


def test_str_reads_each_whole_history_count_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # a count over all layers read once per layer made str() quadratic (16k layers: 20 s)
    history = lc.log_forward_pass(Chain(), torch.zeros(2), layers_to_save=[1])
    reads = []
    counted = ModelHistory.num_tensors_saved

    def count(self: ModelHistory) -> int:
        reads.append(1)
        return counted.fget(self)  # type: ignore[no-any-return, misc]

    monkeypatch.setattr(ModelHistory, "num_tensors_saved", property(count))
    text = str(history)
    assert len(reads) == 1
    assert "\t\t1: add_1_1:1\n" in text  # the saved pass
    assert "\t\t50: add_1_1:50 (not saved)" in text
