"""Summaries on the CPU: results read as they come, large tensors binned the moment they are made.

Nothing has to be transferred, so a tensor with no NaN or infinity (nearly all) skips the masking
an accelerator always does; only the histogram edges, found for all tensors together by
:func:`with_edges`, wait for the end of a step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from lens_core.summaries import _histogram, _passes
from lens_core.summaries._passes import Scratch
from lens_core.summaries.summary import Histogram, TensorSummary, no_finite_values

# Tensors of at most this many values are summarised together on the CPU (``_SmallTensors``):
# up to there, that is faster than one at a time.
SMALL = 2048
# Interleaved copies of each histogram counted on the CPU (see ``_host_counts``).
_STRIPES = 8


@dataclasses.dataclass(slots=True)
class _Finite:
    """The finite values of one tensor and what was set aside."""

    values: torch.Tensor
    numel: int
    nans: int
    infs: int
    low: float
    high: float


def bin_on_host(tensors: list[torch.Tensor], bins: int, scratch: Scratch) -> list[Binned]:
    found: dict[int, Binned] = {}
    for dtype, indices in _passes.by_compute_dtype(tensors):
        batch = _SmallTensors.of([i for i in indices if tensors[i].numel() <= SMALL], tensors, dtype)
        together = set(batch.indices) if batch is not None else set()
        finite: dict[int, _Finite] = {}
        for index in indices:
            if index in together:
                continue
            kept = _finite_values(tensors[index], dtype, scratch)
            if isinstance(kept, TensorSummary):
                found[index] = Binned(kept, dtype, None)
            else:
                finite[index] = kept
        low = torch.tensor([kept.low for kept in finite.values()], dtype=dtype)
        high = torch.tensor([kept.high for kept in finite.values()], dtype=dtype)
        if batch is not None:
            low, high = torch.cat((low, batch.low)), torch.cat((high, batch.high))
        if not low.numel():
            continue
        rows = _histogram.frames(low, high, bins)
        frames = _Frame.rows(rows)
        for (index, kept), frame in zip(finite.items(), frames[:len(finite)], strict=True):
            found[index] = _bin(kept, dtype, bins, frame, scratch)
        if batch is not None:
            first = len(finite)
            binned = batch.binned(rows, first, frames[first:], bins)
            for row, (index, item) in enumerate(zip(batch.indices, binned, strict=True)):
                if item is not None:
                    found[index] = item
                    continue
                # values whose squares over- or underflow float64: on their own, scaled
                tensor = tensors[index]
                alone = _Finite(tensor, tensor.numel(), 0, 0, batch.lows[row], batch.highs[row])
                found[index] = _bin(alone, dtype, bins, frames[first + row], scratch)
    return [found[index] for index in range(len(tensors))]


class _Frame(NamedTuple):
    """One row of ``_histogram.Frames``, on the host: how the values of one tensor are binned."""

    low: float
    high: float
    unit: float
    origin: float
    scale: float

    @classmethod
    def rows(cls, frames: _histogram.Frames) -> list[_Frame]:
        columns = (frames.low, frames.high, frames.unit, frames.origin, frames.scale)
        return [cls(*row) for row in zip(*(column.tolist() for column in columns), strict=True)]


@dataclasses.dataclass(frozen=True, slots=True)
class Binned:
    """A CPU summary with its bins counted, waiting for its histogram's edges (``with_edges``):
    the edges of all tensors are searched for together, which costs about what one tensor's do."""

    summary: TensorSummary
    """The summary, its histogram's edges still empty."""
    dtype: torch.dtype
    """The dtype of the binning arithmetic."""
    frame: _Frame | None
    """The binning arithmetic; None when there is nothing to bin (no finite value)."""


def _bin(kept: _Finite, dtype: torch.dtype, bins: int, frame: _Frame, scratch: Scratch) -> Binned:
    return Binned(_host_summary(kept, dtype, bins, frame, scratch), dtype, frame)


def with_edges(binned: Mapping[Hashable, Binned], bins: int) -> Iterator[tuple[Hashable, TensorSummary]]:
    """The summaries with their histograms' edges, searched for in one go per dtype."""
    groups: dict[torch.dtype, list[Hashable]] = {}
    for key, item in binned.items():
        if item.frame is None:
            yield key, item.summary
        else:
            groups.setdefault(item.dtype, []).append(key)
    for dtype, keys in groups.items():
        frames = [binned[key].frame for key in keys]
        rows = _histogram.Frames(*(torch.tensor(column, dtype=dtype) for column in zip(*frames, strict=True)))
        for key, edges in zip(keys, _histogram.edges(rows, bins, host=True).tolist(), strict=True):
            s = binned[key].summary  # rebuilt field by field: dataclasses.replace is 10x slower
            yield key, TensorSummary(
                s.numel, s.mean, s.std, s.min, s.max, s.mean_abs, s.l2_norm, s.zero_fraction,
                s.nan_count, s.inf_count, Histogram(tuple(edges), s.histogram.counts),
            )


class _SmallTensors:
    """Tensors of at most ``SMALL`` values (biases, norms' weights, scalars), summarised together.

    One at a time, each costs ~25 torch calls of a few microseconds, far more than the work on
    its values; as the rows of one zero-padded matrix they all take ~25 calls: sums by row (in
    float64), and one ``bincount`` whose bins are offset by ``bins + 1`` per row.
    """

    def __init__(self, indices: list[int], tensors: list[torch.Tensor], values: torch.Tensor) -> None:
        self.indices = indices
        """Positions of the tensors in the ``summarize`` call."""
        self.tensors = tensors
        self.values = values  # (tensors, longest), zeros after each tensor's values
        self.sizes = torch.tensor([tensor.numel() for tensor in tensors])
        self.inside = torch.arange(values.shape[1]) < self.sizes[:, None]
        self.low = torch.where(self.inside, values, math.inf).amin(1)
        self.high = torch.where(self.inside, values, -math.inf).amax(1)
        self.lows: list[float] = self.low.tolist()
        self.highs: list[float] = self.high.tolist()

    @classmethod
    def of(cls, indices: list[int], tensors: list[torch.Tensor], dtype: torch.dtype) -> _SmallTensors | None:
        """The batch of ``tensors[i]`` for ``i`` in ``indices`` that hold no NaN or infinity."""
        if not indices:
            return None
        values = pad_sequence([tensors[i].reshape(-1).to(dtype) for i in indices], batch_first=True)
        finite = torch.isfinite(values).all(1).tolist()  # the others go on their own
        if not any(finite):
            return None
        kept = [i for i, ok in zip(indices, finite, strict=True) if ok]
        if len(kept) < len(indices):
            values = values[torch.tensor(finite)]
        return cls(kept, [tensors[i] for i in kept], values)

    def binned(
        self, rows: _histogram.Frames, first: int, frames: list[_Frame], bins: int
    ) -> list[Binned | None]:
        """The summaries, binned by ``rows`` from row ``first`` on (``frames`` on the host);
        None for values too large or too small for float64 sums."""
        n = self.sizes.double()
        wide = self.values.double()  # the values themselves when they are float64: not in place
        mean = wide.sum(1) / n
        deviations = torch.where(self.inside, wide - mean[:, None], 0)
        shift = deviations.sum(1)  # the rounding of the mean, taken back below
        variance = ((deviations.square_().sum(1) - shift.square() / n) / n).clamp_(min=0)
        mean_abs = wide.abs().sum(1) / n
        zeros = (self.values == 0).logical_and_(self.inside).sum(1)
        l2_norm = (n * (variance + mean.square())).sqrt()
        arithmetic = (part[first:, None] for part in (rows.unit, rows.origin, rows.scale))
        placed = torch.where(self.inside, self.values, rows.low[first:, None])  # padding: in bin 0
        index = _histogram.positions(placed, *arithmetic).long()  # truncates: the bin
        index += torch.arange(len(self.tensors))[:, None] * (bins + 1)  # in this tensor's bins
        counts = torch.bincount(index.reshape(-1), minlength=len(self.tensors) * (bins + 1))
        counts = counts.view(-1, bins + 1)
        counts[:, 0] -= self.values.shape[1] - self.sizes  # the padding, out again
        counts[:, bins - 1] += counts[:, bins]  # the maximum's bin: the last bin holds its right edge
        found: list[Binned | None] = []
        columns = (mean, variance.sqrt(), mean_abs, l2_norm)
        for tensor, low, high, moments, zero_count, binned, frame in zip(
            self.tensors, self.lows, self.highs, zip(*(c.tolist() for c in columns), strict=True),
            zeros.tolist(), counts[:, :bins].tolist(), frames, strict=True,
        ):
            # sums that overflowed, or squares that underflow even in float64: on their own
            if not all(math.isfinite(m) for m in moments) or _unit(max(-low, high), torch.float64) != 1:
                found.append(None)
                continue
            mean_value, std, absolute, l2 = moments
            summary = TensorSummary(
                numel=tensor.numel(), mean=mean_value, std=std, min=low, max=high, mean_abs=absolute,
                l2_norm=l2, zero_fraction=zero_count / tensor.numel(), nan_count=0, inf_count=0,
                histogram=Histogram((), tuple(binned)),
            )
            found.append(Binned(summary, self.values.dtype, frame))
        return found


def _finite_values(tensor: torch.Tensor, dtype: torch.dtype, scratch: Scratch) -> _Finite | TensorSummary:
    """The finite values and their extremes, or the summary of a tensor without any."""
    values = tensor
    if tensor.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        values = scratch.flat(tensor, dtype)  # extremes as the summary sees the values
    low, high = (value.item() for value in torch.aminmax(values))  # NaN if there is one
    n = tensor.numel()
    if math.isfinite(low) and math.isfinite(high):
        return _Finite(tensor, n, 0, 0, low, high)
    nans = int(torch.count_nonzero(torch.isnan(values)))
    values = values[torch.isfinite(values)]  # rare: a copy of the finite values
    if not values.numel():
        return no_finite_values(n, nans, n - nans)
    low, high = (value.item() for value in torch.aminmax(values))
    return _Finite(values, n, nans, n - nans - values.numel(), low, high)


def _host_summary(
    kept: _Finite, dtype: torch.dtype, bins: int, frame: _Frame, scratch: Scratch
) -> TensorSummary:
    """The summary of finite values, but for the histogram's edges (left empty)."""
    x = scratch.flat(kept.values, dtype)
    count = x.numel()
    signed = kept.low < 0 < kept.high
    unit = _unit(max(abs(kept.low), abs(kept.high)), x.dtype)
    mean, std, mean_abs, l2_norm = _host_moments(x, signed, unit, scratch)
    zeros = _host_zeros(x, scratch) if kept.low <= 0 <= kept.high else 0
    counts = _host_counts(x, frame, bins, scratch)
    return TensorSummary(
        numel=kept.numel, mean=mean, std=std, min=kept.low, max=kept.high, mean_abs=mean_abs,
        l2_norm=l2_norm, zero_fraction=zeros / count, nan_count=kept.nans, inf_count=kept.infs,
        histogram=Histogram((), tuple(counts)),
    )


def stream(tensor: torch.Tensor, bins: int, scratch: Scratch) -> Binned | None:
    """A CPU tensor's summary but for the edges; None where it needs the general code."""
    dtype = _passes.compute_dtype(tensor.dtype)
    kept = _finite_values(tensor, dtype, scratch)
    if isinstance(kept, TensorSummary):  # no finite value: complete as it is
        return Binned(kept, dtype, None)
    arithmetic = _histogram.frame(kept.low, kept.high, bins, dtype)
    if arithmetic is None:
        return None
    origin, scale = arithmetic
    return _bin(kept, dtype, bins, _Frame(kept.low, kept.high, 1.0, origin, scale), scratch)


def _unit(peak: float, dtype: torch.dtype) -> float:
    """1, or the power of two that brings ``peak`` near 1 when squares of values that large (or
    that small) would overflow (or underflow) in ``dtype``; scaling by a power of two is exact."""
    exponent = math.frexp(peak)[1]  # peak = m * 2**exponent, 0.5 <= m < 1 (0 for peak 0)
    safe, most = (300, 1000) if dtype == torch.float64 else (40, 126)  # 2**most must fit in dtype
    return 1.0 if -safe <= exponent <= safe else 2.0 ** max(-most, min(most, -exponent))


def _host_moments(
    x: torch.Tensor, signed: bool, unit: float, scratch: Scratch
) -> tuple[float, float, float, float]:
    """Mean, std, mean magnitude and l2 norm of ``x``, summed as ``x * unit``.

    ``signed``: ``x`` holds negative and positive values (otherwise the magnitudes sum to the
    magnitude of the sum, and need no pass of their own).
    """
    n = x.numel()
    buffer = scratch.take("buffer", x.dtype, min(n, _passes.CHUNK))
    parts = torch.split(x, _passes.CHUNK)

    def scaled(part: torch.Tensor) -> torch.Tensor:
        return part if unit == 1.0 else torch.mul(part, unit, out=buffer[:part.numel()])

    total = sum(scaled(part).sum().item() for part in parts)
    mean = total / n
    deviations = squares = magnitudes = 0.0
    for part in parts:
        deviation = torch.sub(scaled(part), mean, out=buffer[:part.numel()])
        deviations += deviation.sum().item()
        squares += deviation.square_().sum().item()  # sum() adds pairwise: dot() loses digits
        if signed:
            magnitudes += torch.abs(scaled(part), out=buffer[:part.numel()]).sum().item()
    if not signed:
        magnitudes = abs(total)
    # the float mean is rounded: its error comes back as the deviations' own mean
    variance = max(squares - deviations * deviations / n, 0.0) / n
    return (mean / unit, math.sqrt(variance) / unit, magnitudes / n / unit,
            math.sqrt(n * (variance + mean * mean)) / unit)


def _host_zeros(x: torch.Tensor, scratch: Scratch) -> int:
    """The number of zeros, summed as floats 0/1 (exact per chunk).

    ``count_nonzero`` branches on each value: on ReLU outputs, half zeros at random, it is
    several times slower than a comparison and a sum.
    """
    buffer = scratch.take("buffer", x.dtype, min(x.numel(), _passes.CHUNK))
    parts = torch.split(x, _passes.CHUNK)
    return sum(int(torch.eq(part, 0, out=buffer[:part.numel()]).sum().item()) for part in parts)


def _host_counts(x: torch.Tensor, frame: _Frame, bins: int, scratch: Scratch) -> list[int]:
    """The bin counts of ``x``.

    ``bincount`` waits on its previous increment when consecutive values fall in one bin (half
    of the values of a ReLU output are 0): the bins are counted in ``_STRIPES`` interleaved
    copies of the histogram, so that neighbouring values increment different counters.
    """
    dtype = torch.int16 if _STRIPES * (bins + 1) <= 1 << 15 else torch.int32  # narrow: fewer bytes
    chunk = min(x.numel(), _passes.CHUNK)
    buffer, index = scratch.take("buffer", x.dtype, chunk), scratch.take("index", dtype, chunk)
    stripes = scratch.stripes(dtype, chunk, _STRIPES, bins + 1)
    counts = torch.zeros(_STRIPES * (bins + 1), dtype=torch.int64)
    for part in torch.split(x, _passes.CHUNK):
        m = part.numel()
        positions = _histogram.positions(part, frame.unit, frame.origin, frame.scale, out=buffer[:m])
        index[:m].copy_(positions)  # truncates: the bin
        counts += torch.bincount(index[:m].add_(stripes[:m]), minlength=counts.numel())
    *binned, top = counts.view(_STRIPES, bins + 1).sum(0).tolist()
    binned[-1] += top  # the maximum's bin: the last bin holds its right edge
    return binned
