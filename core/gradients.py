"""Gradients of saved layer outputs, filled in by the backward pass that really runs.

A hook on each saved output writes into a :class:`GradientSlot` that the layer holds. The hook
references only the slot, never the layer or the tensor, so a history with gradients is still
free of reference cycles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["GradientSlot"]


class GradientSlot:
    """Receives the gradient of the loss with respect to one layer output.

    Several backward passes through the same output (gradient accumulation, or backward from
    two different layers) add up, as ``.grad`` does; ``count`` says how many arrived.

    Args:
        unscale: returns the loss scale to divide by (a ``GradScaler``'s ``get_scale``), so the
            stored gradient is that of the unscaled loss; None stores gradients as they arrive.
    """

    __slots__ = ("count", "handle", "unscale", "value")

    def __init__(self, unscale: Callable[[], float] | None = None) -> None:
        self.value: torch.Tensor | None = None
        self.count = 0
        self.unscale = unscale
        self.handle: RemovableHandle | None = None

    def attach(self, tensor: torch.Tensor) -> None:
        """Starts receiving gradients of ``tensor``."""
        self.handle = tensor.register_hook(self._receive)  # type: ignore[no-untyped-call]

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _receive(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        if self.unscale is not None:
            grad = grad / self.unscale()
        self.value = grad if self.value is None else self.value + grad
        self.count += 1
