"""A module's own forward hooks: its output layer is what the call returned, their ops are inside it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lens_core as lc


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def test_a_hook_that_replaces_the_output_gives_the_module_s_output_layer() -> None:
    model, x = TwoLayers(), torch.randn(3, 4)
    returned: list[torch.Tensor] = []

    def shift(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        shifted = output + 100
        returned.append(shifted)
        return shifted

    handle = model.fc1.register_forward_hook(shift)
    history = lc.log_forward_pass(model, x)
    handle.remove()
    fc1 = history["fc1"]
    assert torch.equal(fc1.tensor_contents, returned[0])  # the hook's result, not the linear's
    assert fc1.layer_type == "add"
    assert fc1.module == "fc1"  # the hook's op ran inside the module call
    assert history["fc2"].parents == (fc1.label,)
    modules = [layer.module for layer in history if layer.layer_type in ("linear", "add")]
    assert modules == ["fc1", "fc1", "fc2"]


def test_hooks_that_only_watch_change_nothing_and_ours_are_removed() -> None:
    model, x = TwoLayers(), torch.randn(3, 4)
    seen: list[torch.Tensor] = []
    model.fc1.register_forward_hook(lambda module, args, output: seen.append(output))
    plain = lc.log_forward_pass(model, x, layers_to_save=None).layer_labels
    unhooked = lc.log_forward_pass(TwoLayers(), x, layers_to_save=None).layer_labels
    assert plain == unhooked
    assert len(seen) == 1
    assert len(model.fc1._forward_hooks) == 1  # only the user's hook is left


def test_our_hooks_are_removed_when_the_forward_fails() -> None:
    model = TwoLayers()
    model.fc1.register_forward_hook(lambda module, args, output: output * 2)

    def fail(module: nn.Module, args: object, output: torch.Tensor) -> None:
        raise ValueError("hook failure")

    model.fc2.register_forward_hook(fail)
    with pytest.raises(ValueError, match="hook failure"):
        lc.log_forward_pass(model, torch.randn(3, 4))
    assert len(model.fc1._forward_hooks) == 1
    assert len(model.fc2._forward_hooks) == 1
