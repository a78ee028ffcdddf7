"""Gradients of saved layer outputs, filled in by the backward pass that really runs.

A hook on each saved output writes into a :class:`GradientSlot` that the layer holds. The hook
references only the slot, never the layer or the tensor, so a history with gradients is still
free of reference cycles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

from lens_core.summaries import storage_intact

__all__ = ["GradientSlot"]


class GradientSlot:
    """Receives the gradient of the loss with respect to one layer output.

    Several backward passes through the same output (gradient accumulation, or backward from
    two different layers) add up, as ``.grad`` does; ``count`` says how many arrived. A gradient
    that the ``sink`` takes is not kept, so it does not add up with later ones. When the storage
    of the gradient held so far was freed before the next one arrives (``resize_(0)``), the sum
    is lost: the freed tensor stays, unread, and whoever reads it checks it (``storage_intact``).

    Args:
        unscale: returns the loss scale to divide by (a ``GradScaler``'s ``get_scale``), so the
            stored gradient is that of the unscaled loss; None stores gradients as they arrive.
        source: loads a gradient stored earlier, on first read of :attr:`value` (histories
            read from disk keep gradients on disk until asked for).
        count: how many backward passes the stored gradient adds up.
        sink: offered each arriving gradient (unscaled) first; when it returns True it has
            taken it (summarised it, say) and the slot keeps nothing.
    """

    __slots__ = ("_source", "_value", "count", "handle", "sink", "unscale")

    def __init__(
        self,
        unscale: Callable[[], float] | None = None,
        *,
        source: Callable[[], torch.Tensor] | None = None,
        count: int = 0,
        sink: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        self._value: torch.Tensor | None = None
        self._source = source
        self.count = count
        self.unscale = unscale
        self.sink = sink
        self.handle: RemovableHandle | None = None

    @property
    def value(self) -> torch.Tensor | None:
        """The gradient received so far (loaded from ``source`` the first time it is read)."""
        if self._value is None and self._source is not None:
            self._value = self._source()
            self._source = None
        return self._value

    @value.setter
    def value(self, tensor: torch.Tensor | None) -> None:
        self._value = tensor
        self._source = None

    @property
    def has_value(self) -> bool:
        """Whether a gradient is held (or stored), without loading a stored one."""
        return self._value is not None or self._source is not None

    @property
    def arrived(self) -> bool:
        """Whether a backward pass reached the output (its gradient may have gone to the sink)."""
        return self.count > 0 or self.has_value

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
        if not (self.sink is not None and self.sink(grad)):
            held = self.value
            if held is None:
                self.value = grad
            elif storage_intact(held):  # adding to freed memory would read it
                self.value = held + grad
        self.count += 1
