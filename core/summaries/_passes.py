"""Scratch buffers and dtypes for the memory passes of ``lens_core.summaries``.

Summarising a captured step is a few elementwise passes over millions of values; what they
cost besides the arithmetic is allocation, and this module keeps it to one buffer per slot.
"""

from __future__ import annotations

import torch

# Elements per pass that needs a buffer: bounds the scratch memory of a huge tensor.
CHUNK = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is summarised in: float64 stays float64, every other one is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def by_compute_dtype(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    """The positions of ``tensors``, grouped by the dtype they are summarised in."""
    groups: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(compute_dtype(tensor.dtype), []).append(index)
    return list(groups.items())


class Scratch:
    """Buffers reused for every tensor of one ``summarize`` call.

    Fresh multi-megabyte temporaries cost more than the arithmetic on them (the allocator maps
    and the kernel zeroes new pages each time), so each pass writes into a buffer of its own
    slot, grown to the largest tensor seen, with ``out=``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, slot: str, dtype: torch.dtype, size: int) -> torch.Tensor:
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < size:
            buffer = self.buffers[slot] = torch.empty(size, dtype=dtype, device=self.device)
        return buffer[:size]

    def stripes(self, dtype: torch.dtype, size: int, copies: int, width: int) -> torch.Tensor:
        """``0, width, ..., (copies - 1) * width``, repeated to ``size`` values."""
        slot = f"stripes {copies} x {width}"
        pattern = self.buffers.get(slot)
        if pattern is None or pattern.dtype != dtype or pattern.numel() < size:
            step = torch.arange(copies, dtype=dtype, device=self.device) * width
            pattern = self.buffers[slot] = step.repeat(-(-size // copies))
        return pattern[:size]

    def flat(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` as a contiguous 1-d tensor of ``dtype`` (a copy only when it must be)."""
        if tensor.dtype == dtype and tensor.is_contiguous():
            return tensor.reshape(-1)
        copy = self.take("values", dtype, tensor.numel())
        copy.view(tensor.shape).copy_(tensor)
        return copy
