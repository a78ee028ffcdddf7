"""Summaries on an accelerator: every result stays on the device until one transfer.

Reading a number with ``.item()`` stalls the device until its queue is done; here nothing is
read back while the work is queued. Every statistic, bin count and edge of every tensor goes
into one byte buffer that :func:`summarize_on_device` copies to the host with a single ``.cpu()``.
Nothing being known on the host, every tensor goes through the masking of non-finite values;
the passes are cheap on an accelerator, the waits would not be.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lens_core.summaries import _histogram, _passes
from lens_core.summaries._passes import Scratch
from lens_core.summaries.summary import Histogram, TensorSummary, no_finite_values

# The layout of a tensor's row in the buffer: these integers, then the bin counts ...
INT_STATS = ("nan_count", "inf_count", "zero_count")
# ... and these floats, then the bin edges.
FLOAT_STATS = ("mean", "std", "mean_abs", "l2_norm", "min", "max")


def pack(tensors: list[torch.Tensor], bins: int, wide: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """Every tensor's results in one uint8 device tensor: all int64 rows, then all float rows.

    Returns the buffer and the order of the tensors in it (grouped by the dtype they are
    summarised in).
    """
    order: list[int] = []
    int_rows: list[torch.Tensor] = []
    float_rows: list[torch.Tensor] = []
    for dtype, indices in _passes.by_compute_dtype(tensors):
        ints, floats = _device_rows([tensors[index] for index in indices], dtype, bins, wide)
        order += indices
        int_rows.append(ints)
        float_rows.append(floats)
    ints = torch.cat(int_rows).reshape(-1)  # (tensors * (3 + bins),) int64
    floats = torch.cat(float_rows).reshape(-1)  # (tensors * (6 + bins + 1),) wide
    # int64 first: its byte length is a multiple of 8, so the floats stay aligned for .view()
    return torch.cat((ints.view(torch.uint8), floats.view(torch.uint8))), order


def _device_rows(
    tensors: list[torch.Tensor], dtype: torch.dtype, bins: int, wide: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every tensor's results as an int64 and a ``wide`` matrix, one row each, with no host sync.

    Nothing is known on the host, so every tensor goes through the masking of non-finite values;
    passes write into scratch buffers.
    """
    scratch = Scratch(tensors[0].device)
    extremes = torch.stack([_device_extremes(scratch.flat(tensor, dtype), scratch) for tensor in tensors])
    rows = _histogram.frames(extremes[:, 0], extremes[:, 1], bins)
    scales = _power_of_two_near(extremes.abs().amax(dim=1))
    int_rows, moment_rows = [], []
    for row, tensor in enumerate(tensors):
        x = scratch.flat(tensor, dtype)
        ints, moments = _device_stats(x, scales[row], rows, row, bins, scratch)
        int_rows.append(ints)
        moment_rows.append(moments)
    edges = _histogram.edges(rows, bins).to(wide)
    moments = torch.stack(moment_rows).to(wide) * scales.to(wide)[:, None]
    floats = torch.cat((moments, extremes.to(wide), edges), dim=1)
    return torch.stack(int_rows), floats


def _power_of_two_near(peaks: torch.Tensor) -> torch.Tensor:
    """A power of two in (peak / 2, peak] for each finite peak (1/2 for 0): dividing by it is exact."""
    _, exponents = torch.frexp(peaks)  # peak = m * 2**e, 0.5 <= m < 1
    return torch.ldexp(torch.ones_like(peaks), exponents - 1)


def _device_extremes(x: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Minimum and maximum of the finite values (0 and 0 when there is none)."""
    a = scratch.take("a", x.dtype, x.numel())
    low = torch.nan_to_num(x, math.inf, math.inf, math.inf, out=a).amin()
    high = torch.nan_to_num(x, -math.inf, -math.inf, -math.inf, out=a).amax()
    return torch.where(torch.isinf(low), 0, torch.stack((low, high)))  # inf: nothing finite


def _device_stats(
    x: torch.Tensor, scale: torch.Tensor, rows: _histogram.Frames, row: int, bins: int, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (NaN, inf, zero, bins) and moments of one tensor, the moments of ``x / scale``."""
    n = x.numel()
    a, b = scratch.take("a", x.dtype, n), scratch.take("b", x.dtype, n)
    finite, flag = scratch.take("finite", torch.bool, n), scratch.take("flag", torch.bool, n)
    torch.lt(torch.abs(x, out=a), math.inf, out=finite)  # isfinite, faster
    count = torch.count_nonzero(finite)
    nans = torch.count_nonzero(torch.ne(x, x, out=flag))
    infs = n - count - nans
    zeros = torch.count_nonzero(torch.eq(x, 0, out=flag))
    # Sums run over values divided by a power of two near the largest magnitude (exact), so
    # sums of squares of values near the dtype's maximum (a diverging bf16 run) stay finite.
    scaled = torch.nan_to_num(x, 0.0, 0.0, 0.0, out=a).div_(scale)  # non-finite values count as 0
    mean = scaled.sum() / count  # NaN when nothing is finite; the host replaces it
    deviations = torch.sub(scaled, mean, out=b)
    # the non-finite values' 0 - mean terms are taken out, and the rounding of the mean back
    outside = (n - count) * mean
    shift = deviations.sum() + outside
    squares = deviations.square_().sum() - outside * mean - shift.square() / count
    std = (squares.clamp(min=0) / count).sqrt()
    l2_norm = (squares.clamp(min=0) + count * mean.square()).sqrt()  # as the host's: vector_norm loses digits
    mean_abs = scaled.abs_().sum() / count
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=x.device)
    index = scratch.take("index", torch.int64, min(n, _passes.CHUNK))
    frame = (rows.unit[row], rows.origin[row], rows.scale[row])
    for part, keep in zip(torch.split(x, _passes.CHUNK), torch.split(finite, _passes.CHUNK), strict=True):
        m = part.numel()
        placed = torch.where(keep, part, rows.low[row], out=a[:m])  # non-finite: in the first bin
        index[:m].copy_(_histogram.positions(placed, *frame, out=b[:m]))
        ones = torch.ones((), dtype=torch.int64, device=x.device).expand(m)
        counts.scatter_add_(0, index[:m], ones)  # bincount would sync to size its output
    counts[0] -= n - count  # the non-finite values, out again
    counts[bins - 1] += counts[bins]  # the maximum's bin: the last bin holds its right edge
    ints = torch.cat((torch.stack((nans, infs, zeros)), counts[:bins]))
    return ints, torch.stack((mean, std, mean_abs, l2_norm))


def summarize_on_device(tensors: list[torch.Tensor], bins: int) -> list[TensorSummary]:
    wide = torch.float32 if tensors[0].device.type == "mps" else torch.float64  # MPS: no float64
    packed, order = pack(tensors, bins, wide)
    host = packed.cpu()  # the one transfer (and the one wait) for this device
    sizes = [tensors[index].numel() for index in order]
    found = dict(zip(order, _unpack(host, sizes, bins, wide), strict=True))
    return [found[index] for index in range(len(tensors))]


def _unpack(host: torch.Tensor, sizes: list[int], bins: int, wide: torch.dtype) -> Iterator[TensorSummary]:
    int_width = len(INT_STATS) + bins
    float_width = len(FLOAT_STATS) + bins + 1
    split = len(sizes) * int_width * 8
    ints = host[:split].view(torch.int64).tolist()
    floats = host[split:].view(wide).tolist()
    for row, numel in enumerate(sizes):
        nans, infs, zeros, *counts = ints[row * int_width:(row + 1) * int_width]
        mean, std, mean_abs, l2_norm, low, high, *edges = floats[row * float_width:(row + 1) * float_width]
        finite = numel - nans - infs
        if finite == 0:
            yield no_finite_values(numel, nans, infs)
            continue
        yield TensorSummary(
            numel=numel, mean=mean, std=std, min=low, max=high, mean_abs=mean_abs, l2_norm=l2_norm,
            zero_fraction=zeros / finite, nan_count=nans, inf_count=infs,
            histogram=Histogram(tuple(edges), tuple(counts)),
        )
