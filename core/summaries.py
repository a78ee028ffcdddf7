"""Statistics and histograms of many tensors, with one device-to-host transfer for all of them.

A training callback summarises every selected activation and gradient at a captured step:
millions of values per step, so the cost is memory passes, and this module is written to make
few of them, into reused buffers.

On an accelerator, reading each number with ``.item()`` would stall the device once per number;
instead every statistic, histogram edge and bin count stays a device tensor until they are
packed into one byte buffer and copied to the host with a single ``.cpu()`` (one per device the
tensors live on; ``lens_core._device_summaries``). On the CPU there is nothing to transfer:
results are read as they come (the code below), which lets a tensor with no NaN or infinity
(nearly all) skip the masking an accelerator always does.

Histograms are exact: edges run from the minimum to the maximum finite value, and the counts are
what ``numpy.histogram(values, bins=edges)`` gives (``lens_core._histogram`` says how: the bin of a
value is arithmetic, and the edges are derived from that arithmetic). ``torch.histc`` is not
used: it needs its range on the host (a sync per tensor) and bins with its own arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from lens_core import _device_summaries, _histogram, _passes
from lens_core._passes import Scratch

__all__ = ["Histogram", "TensorSummary", "summarize"]

# Most histogram bins: float32 arithmetic places values in this many bins exactly.
_MAX_BINS = 1 << 16
# Tensors of at most this many values are summarised together on the CPU (``_SmallTensors``):
# up to there, that is faster than one at a time.
_SMALL = 2048
# Interleaved copies of each histogram counted on the CPU (see ``_host_counts``).
_STRIPES = 8


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of values in equal-width bins, the layout TensorBoard and W&B histograms take."""

    edges: tuple[float, ...]
    """``bins + 1`` non-decreasing bin edges from the minimum to the maximum finite value,
    equally spaced up to rounding (empty when there is no finite value). Bin ``i`` is
    ``[edges[i], edges[i + 1])``; the last bin also holds its right edge, as in
    ``numpy.histogram``."""
    counts: tuple[int, ...]
    """Number of finite values in each bin (empty when there is no finite value)."""


@dataclass(frozen=True, slots=True)
class TensorSummary:
    """Summary statistics and histogram of one tensor.

    Every statistic except ``numel``, ``nan_count`` and ``inf_count`` is over the finite values
    only, so one overflow does not turn the whole summary into NaN. With no finite value (an
    empty tensor, or one of only NaN/Inf) the averages and extremes are NaN, ``l2_norm`` is 0
    (an empty sum) and the histogram is empty.

    Integer and bool tensors are summarised as float32, float64 tensors in float64, the other
    floating types (bf16, fp16, fp8) in float32.
    """

    numel: int
    mean: float
    std: float
    """Population standard deviation (``correction=0``): defined for a single value too."""
    min: float
    max: float
    mean_abs: float
    l2_norm: float
    zero_fraction: float
    """Fraction of the finite values that are exactly zero (sparsity of a ReLU output)."""
    nan_count: int
    inf_count: int
    """Number of ``+inf`` and ``-inf`` values."""
    histogram: Histogram

    @property
    def finite_count(self) -> int:
        """Number of finite values: what the statistics and the histogram are computed over."""
        return self.numel - self.nan_count - self.inf_count

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (strict JSON: NaN and infinities are written as strings)."""
        data: dict[str, Any] = {"numel": self.numel}
        for name in ("mean", "std", "min", "max", "mean_abs", "l2_norm", "zero_fraction"):
            data[name] = _encode(getattr(self, name))
        data["nan_count"] = self.nan_count
        data["inf_count"] = self.inf_count
        data["histogram"] = {
            "edges": [_encode(edge) for edge in self.histogram.edges],
            "counts": list(self.histogram.counts),
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSummary:
        """Rebuilds a summary from :meth:`to_dict`'s output.

        Raises:
            ValueError: ``data`` lacks a field or holds a value of the wrong type.
        """
        try:
            histogram = data["histogram"]
            return cls(
                numel=_int(data["numel"]),
                mean=_decode(data["mean"]),
                std=_decode(data["std"]),
                min=_decode(data["min"]),
                max=_decode(data["max"]),
                mean_abs=_decode(data["mean_abs"]),
                l2_norm=_decode(data["l2_norm"]),
                zero_fraction=_decode(data["zero_fraction"]),
                nan_count=_int(data["nan_count"]),
                inf_count=_int(data["inf_count"]),
                histogram=Histogram(
                    tuple(_decode(edge) for edge in histogram["edges"]),
                    tuple(_int(count) for count in histogram["counts"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"TensorSummary.from_dict: {type(error).__name__}: {error}. Pass a dict made by "
                "TensorSummary.to_dict()."
            ) from None


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf"


def _decode(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def check_bins(bins: Any) -> int:
    """``bins`` if it is a number of histogram bins :func:`summarize` takes, else ValueError."""
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= _MAX_BINS:
        raise ValueError(f"bins={bins!r}: use an int from 1 to {_MAX_BINS} (64 is the default).")
    return bins


def summarize(tensors: Mapping[str, torch.Tensor], bins: int = 64) -> dict[str, TensorSummary]:
    """Summarises every tensor of ``tensors``, reading the results back in one transfer.

    Use it at a captured step on all the activations and gradients at once: the work runs on
    the tensors' device and the host waits once, not once per tensor or per statistic.
    Tensors that are views of the same elements (a reshape, a transpose) are summarised once.

    Args:
        tensors: name -> dense real tensor (any shape, dtype, device; ``requires_grad`` is
            fine, nothing is recorded by autograd).
        bins: number of histogram bins.

    Returns:
        name -> :class:`TensorSummary`, in the order of ``tensors``.

    Raises:
        TypeError: a value is not a tensor, or is complex.
        ValueError: ``bins`` is not an int from 1 to 65536.

    Example::

        summaries = summarize({"conv1": layer.tensor_contents, "grad/conv1": layer.gradient})
        summaries["conv1"].histogram.counts
    """
    check_bins(bins)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}.")
    keys: dict[str, _Key] = {}
    distinct: dict[_Key, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor.")
        if tensor.is_complex():
            raise TypeError(
                f"tensors[{name!r}] is complex ({tensor.dtype}); summarise a real view of it, "
                "e.g. tensor.abs() or torch.view_as_real(tensor)."
            )
        if tensor.numel():
            keys[name] = _elements(tensor)
            distinct.setdefault(keys[name], tensor.detach())
    by_device: dict[torch.device, list[_Key]] = {}
    for key, tensor in distinct.items():
        by_device.setdefault(tensor.device, []).append(key)
    found: dict[_Key, TensorSummary] = {}
    with torch.no_grad():
        for device, group in by_device.items():
            summarise = _summarize_on_host if device.type == "cpu" else _summarize_on_device
            found.update(zip(group, summarise([distinct[key] for key in group], bins), strict=True))
    return {name: found[keys[name]] if name in keys else _no_finite_values(0, 0, 0) for name in tensors}


# What identifies the elements of a tensor: its device, dtype, first element and the
# (size, stride) of its dimensions in any order (a permutation of the same elements has the same
# summary).
_Key = tuple[torch.device, torch.dtype, int, bool, tuple[tuple[int, int], ...]]


def _elements(tensor: torch.Tensor) -> _Key:
    dims = sorted(dim for dim in zip(tensor.shape, tensor.stride(), strict=True) if dim[0] != 1)
    return (tensor.device, tensor.dtype, tensor.data_ptr(), tensor.is_neg(), tuple(dims))


# -- on the CPU: values are read as they are computed -------------------------------------------
#
# There is no transfer to save on the CPU, and reading a result lets a tensor without NaN or
# infinity (nearly all of them) skip every masking pass; sums run on the values themselves.


@dataclass(slots=True)
class _Finite:
    """The finite values of one tensor and what was set aside."""

    values: torch.Tensor
    numel: int
    nans: int
    infs: int
    low: float
    high: float


def _summarize_on_host(tensors: list[torch.Tensor], bins: int) -> list[TensorSummary]:
    found: dict[int, TensorSummary] = {}
    for dtype, indices in _passes.by_compute_dtype(tensors):
        scratch = Scratch(torch.device("cpu"))
        batch = _SmallTensors.of([i for i in indices if tensors[i].numel() <= _SMALL], tensors, dtype)
        together = set(batch.indices) if batch is not None else set()
        finite: dict[int, _Finite] = {}
        for index in indices:
            if index in together:
                continue
            kept = _finite_values(tensors[index], dtype, scratch)
            if isinstance(kept, TensorSummary):
                found[index] = kept
            else:
                finite[index] = kept
        low = torch.tensor([kept.low for kept in finite.values()], dtype=dtype)
        high = torch.tensor([kept.high for kept in finite.values()], dtype=dtype)
        if batch is not None:
            low, high = torch.cat((low, batch.low)), torch.cat((high, batch.high))
        if not low.numel():
            continue
        rows = _histogram.frames(low, high, bins)
        all_edges = _histogram.edges(rows, bins).tolist()
        arithmetic = list(zip(*(row.tolist() for row in (rows.unit, rows.origin, rows.scale)), strict=True))
        for row, (index, kept) in enumerate(finite.items()):
            found[index] = _host_summary(kept, dtype, bins, all_edges[row], arithmetic[row], scratch)
        if batch is not None:
            first = len(finite)
            summaries = batch.summaries(rows, first, all_edges[first:], bins)
            for row, (index, summary) in enumerate(zip(batch.indices, summaries, strict=True)):
                if summary is not None:
                    found[index] = summary
                    continue
                # values whose squares over- or underflow float64: the one-tensor code scales them
                tensor, j = tensors[index], first + row
                kept = _Finite(tensor, tensor.numel(), 0, 0, batch.lows[row], batch.highs[row])
                found[index] = _host_summary(kept, dtype, bins, all_edges[j], arithmetic[j], scratch)
    return [found[index] for index in range(len(tensors))]


class _SmallTensors:
    """Tensors of at most ``_SMALL`` values (biases, norms' weights, scalars), summarised together.

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

    def summaries(
        self, rows: _histogram.Frames, first: int, edges: list[list[float]], bins: int
    ) -> list[TensorSummary | None]:
        """The summaries, from row ``first`` of ``rows`` on; None for values too large or small."""
        n = self.sizes.double()
        wide = self.values.double()  # the values themselves when they are float64: not in place
        mean = wide.sum(1) / n
        deviations = torch.where(self.inside, wide - mean[:, None], 0)
        shift = deviations.sum(1)  # the rounding of the mean, taken back below
        variance = ((deviations.square_().sum(1) - shift.square() / n) / n).clamp_(min=0)
        mean_abs = wide.abs().sum(1) / n
        zeros = (self.values == 0).logical_and_(self.inside).sum(1)
        l2_norm = (n * (variance + mean.square())).sqrt()
        frame = (part[first:, None] for part in (rows.unit, rows.origin, rows.scale))
        placed = torch.where(self.inside, self.values, rows.low[first:, None])  # padding: in bin 0
        index = _histogram.positions(placed, *frame).long()  # truncates: the bin
        index += torch.arange(len(self.tensors))[:, None] * (bins + 1)  # in this tensor's bins
        counts = torch.bincount(index.reshape(-1), minlength=len(self.tensors) * (bins + 1))
        counts = counts.view(-1, bins + 1)
        counts[:, 0] -= self.values.shape[1] - self.sizes  # the padding, out again
        counts[:, bins - 1] += counts[:, bins]  # the maximum's bin: the last bin holds its right edge
        found: list[TensorSummary | None] = []
        columns = (mean, variance.sqrt(), mean_abs, l2_norm)
        for tensor, low, high, moments, zero_count, binned, row_edges in zip(
            self.tensors, self.lows, self.highs, zip(*(c.tolist() for c in columns), strict=True),
            zeros.tolist(), counts[:, :bins].tolist(), edges, strict=True,
        ):
            # sums that overflowed, or squares that underflow even in float64: on their own
            if not all(math.isfinite(m) for m in moments) or _unit(max(-low, high), torch.float64) != 1:
                found.append(None)
                continue
            mean_value, std, absolute, l2 = moments
            found.append(TensorSummary(
                numel=tensor.numel(), mean=mean_value, std=std, min=low, max=high, mean_abs=absolute,
                l2_norm=l2, zero_fraction=zero_count / tensor.numel(), nan_count=0, inf_count=0,
                histogram=Histogram(tuple(row_edges), tuple(binned)),
            ))
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
        return _no_finite_values(n, nans, n - nans)
    low, high = (value.item() for value in torch.aminmax(values))
    return _Finite(values, n, nans, n - nans - values.numel(), low, high)


def _host_summary(
    kept: _Finite,
    dtype: torch.dtype,
    bins: int,
    edges: list[float],
    frame: tuple[float, float, float],
    scratch: Scratch,
) -> TensorSummary:
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
        histogram=Histogram(tuple(edges), tuple(counts)),
    )


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


def _host_counts(
    x: torch.Tensor, frame: tuple[float, float, float], bins: int, scratch: Scratch
) -> list[int]:
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
        index[:m].copy_(_histogram.positions(part, *frame, out=buffer[:m]))  # truncates: the bin
        counts += torch.bincount(index[:m].add_(stripes[:m]), minlength=counts.numel())
    *binned, top = counts.view(_STRIPES, bins + 1).sum(0).tolist()
    binned[-1] += top  # the maximum's bin: the last bin holds its right edge
    return binned


# -- on an accelerator: everything stays on the device until one transfer ------------------------


def _summarize_on_device(tensors: list[torch.Tensor], bins: int) -> list[TensorSummary]:
    wide = torch.float32 if tensors[0].device.type == "mps" else torch.float64  # MPS: no float64
    packed, order = _device_summaries.pack(tensors, bins, wide)
    host = packed.cpu()  # the one transfer (and the one wait) for this device
    sizes = [tensors[index].numel() for index in order]
    found = dict(zip(order, _unpack(host, sizes, bins, wide), strict=True))
    return [found[index] for index in range(len(tensors))]


def _unpack(host: torch.Tensor, sizes: list[int], bins: int, wide: torch.dtype) -> Iterator[TensorSummary]:
    int_width = len(_device_summaries.INT_STATS) + bins
    float_width = len(_device_summaries.FLOAT_STATS) + bins + 1
    split = len(sizes) * int_width * 8
    ints = host[:split].view(torch.int64).tolist()
    floats = host[split:].view(wide).tolist()
    for row, numel in enumerate(sizes):
        nans, infs, zeros, *counts = ints[row * int_width:(row + 1) * int_width]
        mean, std, mean_abs, l2_norm, low, high, *edges = floats[row * float_width:(row + 1) * float_width]
        finite = numel - nans - infs
        if finite == 0:
            yield _no_finite_values(numel, nans, infs)
            continue
        yield TensorSummary(
            numel=numel, mean=mean, std=std, min=low, max=high, mean_abs=mean_abs, l2_norm=l2_norm,
            zero_fraction=zeros / finite, nan_count=nans, inf_count=infs,
            histogram=Histogram(tuple(edges), tuple(counts)),
        )


def _no_finite_values(numel: int, nans: int, infs: int) -> TensorSummary:
    nan = math.nan
    return TensorSummary(
        numel=numel, mean=nan, std=nan, min=nan, max=nan, mean_abs=nan, l2_norm=0.0,
        zero_fraction=nan, nan_count=nans, inf_count=infs, histogram=Histogram((), ()),
    )
