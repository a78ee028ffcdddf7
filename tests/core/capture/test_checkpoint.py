"""Activation checkpointing: gradients of the ops inside a checkpointed block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lens_core as lc


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.block, self.head, self.reentrant = Block(), nn.Linear(4, 1), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.head(self.block(x))
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


def _oracle(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the loss with respect to each layer's output, in a run without checkpointing."""
    torch.manual_seed(0)
    model = Checkpointed(None)
    with lc.capture(model) as cap:
        loss = model(x).sum()
    history = cap.history
    labels = [layer.label for layer in history if layer.layer_type in ("linear", "tanh")]
    outputs = [history[label].tensor_contents for label in labels]
    return dict(zip(labels, torch.autograd.grad(loss, outputs), strict=True))


def _captured(reentrant: bool) -> lc.ModelHistory:
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    with lc.capture(model, gradients=True) as cap:
        model(X).sum().backward()
    return cap.history


X = torch.randn(3, 4, requires_grad=True)


def test_non_reentrant_checkpoint_records_every_gradient() -> None:
    history = _captured(reentrant=False)
    for label, expected in _oracle(X).items():
        assert torch.allclose(history[label].gradient, expected, atol=1e-6), label
    assert [layer.layer_type for layer in history].count("linear") == 3  # nothing recomputed


def test_reentrant_checkpoint_records_its_output_s_gradient_and_names_the_rest() -> None:
    with pytest.warns(RuntimeWarning, match=r"2 layers ran inside a reentrant .*linear_1_1, tanh_1_2"):
        history = _captured(reentrant=True)
    oracle = _oracle(X)
    for label in ("linear_2_3", "linear_3_4"):  # the block's output and what follows it
        assert torch.allclose(history[label].gradient, oracle[label], atol=1e-6), label
    assert history["linear_1_1"].gradient is None
    assert [layer.layer_type for layer in history].count("linear") == 3
