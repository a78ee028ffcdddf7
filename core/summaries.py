"""Statistics and histograms of many tensors, with one device-to-host transfer for all of them.

A training callback summarises every selected activation and gradient at a captured step:
millions of values per step, so the cost is memory passes, and this module is written to make
few of them, into reused buffers.

On an accelerator, reading each number with ``.item()`` would stall the device once per number;
instead every statistic, histogram edge and bin count stays a device tensor until they are
packed into one byte buffer and copied to the host with a single ``.cpu()`` (one per device the
tensors live on; ``lens_core._device_summaries``). On the CPU there is nothing to transfer:
results are read as they come (the code below), which lets a tensor with no NaN or infinity
(nearly all) skip the masking an accelerator always does, and a large tensor can be summarised
the moment it is handed over (:class:`Summaries`), while its values are in cache, and then let
go; only the histogram edges, found for all tensors together, wait for the end.

Histograms are exact: edges run from the minimum to the maximum finite value, and the counts are
what ``numpy.histogram(values, bins=edges)`` gives (``lens_core._histogram`` says how: the bin of a
value is arithmetic, and the edges are derived from that arithmetic). ``torch.histc`` is not
used: it needs its range on the host (a sync per tensor) and bins with its own arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch
from torch.nn.utils.rnn import pad_sequence

from lens_core import _device_summaries, _histogram, _passes
from lens_core._passes import Scratch

__all__ = ["Histogram", "Summaries", "TensorSummary", "summarize"]

# Most histogram bins: float32 arithmetic places values in this many bins exactly.
_MAX_BINS = 1 << 16
# Tensors of at most this many values are summarised together on the CPU (``_SmallTensors``):
# up to there, that is faster than one at a time.
_SMALL = 2048
# Interleaved copies of each histogram counted on the CPU (see ``_host_counts``).
_STRIPES = 8


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of values in equal-width bins, the layout TensorBoard and W&B histograms take."""

    edges: tuple[float, ...]
    """``bins + 1`` non-decreasing bin edges from the minimum to the maximum finite value,
    equally spaced up to rounding (empty when there is no finite value). Bin ``i`` is
    ``[edges[i], edges[i + 1])``; the last bin also holds its right edge, as in
    ``numpy.histogram``."""
    counts: tuple[int, ...]
    """Number of finite values in each bin (empty when there is no finite value)."""


@dataclasses.dataclass(frozen=True, slots=True)
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
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}.")
    summaries = Summaries(bins)
    for name, tensor in tensors.items():
        summaries.add(name, tensor)
    return cast(dict[str, TensorSummary], summaries.result())


class Summaries:
    """Summaries of tensors handed over one at a time, as a training step makes them.

    :func:`summarize` takes every tensor at once; a captured training step would then hold
    each activation and gradient until its end, memory the backward pass cannot reuse (fresh
    pages at every step). :meth:`add` summarises a large CPU tensor at once instead, while its
    values are in cache, and keeps nothing of it: everything but the histogram's inner edges,
    which :meth:`result` works out for all tensors together. Other tensors are kept until
    :meth:`result`: small ones (cheaper together), those on an accelerator (they stay there
    until one transfer), sparse or quantized ones, and, as a copy, large ones that need the
    general binning (a single distinct value, a range so wide or so narrow that its width or
    scale overflows).

    A tensor whose elements and values are those of one added before (a view of it, with no
    write in between: a reshape, a transpose, a gradient passed on unchanged) shares its summary.

    Example::

        summaries = Summaries(bins=64)
        summaries.add("conv1", activation)  # summarised now if streams(activation)
        summaries.result()["conv1"].histogram.edges

    Args:
        bins: number of histogram bins.

    Raises:
        ValueError: ``bins`` is not an int from 1 to 65536.
    """

    def __init__(self, bins: int = 64) -> None:
        self.bins = check_bins(bins)
        self._keys: dict[Hashable, None] = {}  # every key, in the order added
        self._kept: dict[Hashable, torch.Tensor] = {}
        self._streamed: dict[Hashable, _Binned] = {}
        self._twins: dict[Hashable, Hashable] = {}  # key -> the key whose summary it shares
        self._seen: dict[_Key, tuple[weakref.ref[torch.UntypedStorage], int, Hashable]] = {}
        self._scratch = Scratch(torch.device("cpu"))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    @staticmethod
    def streams(tensor: torch.Tensor) -> bool:
        """Whether :meth:`add` summarises ``tensor`` at once: then the caller may free it or
        write to it afterwards; otherwise it must leave it as it is until :meth:`result`."""
        return (
            tensor.device.type == "cpu" and tensor.numel() > _SMALL and tensor.layout == torch.strided
            and not (tensor.is_complex() or tensor.is_quantized or tensor.is_nested)
        )

    def add(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Adds ``tensor``'s summary under ``key`` (see :meth:`streams` for when it is made).

        Raises:
            TypeError: ``tensor`` is not a tensor, or is complex.
            ValueError: ``key`` was added before.
        """
        if key in self._keys:
            raise ValueError(f"Summaries.add: {key!r} was added before; each key takes one tensor.")
        # the summary's own ops are not the model's: no capture records them, autograd neither
        with torch._C.DisableTorchFunction(), torch.no_grad():
            tensor = _checked(key, tensor).detach()
            twin = self._twin(key, tensor)
            if twin is not None:
                self._twins[key] = twin
            elif not self.streams(tensor):
                self._kept[key] = tensor
            else:
                streamed = _stream(tensor, self.bins, self._scratch)
                if streamed is None:
                    self._kept[key] = tensor.clone()  # for the general code, at the end
                else:
                    self._streamed[key] = streamed
        self._keys[key] = None

    def _twin(self, key: Hashable, tensor: torch.Tensor) -> Hashable | None:
        """The key of a tensor added before with the same elements, still holding the same values
        (its storage alive, its version unchanged); ``tensor`` becomes the one to match if none."""
        try:
            elements, storage, version = _elements(tensor), tensor.untyped_storage(), tensor._version
        except (RuntimeError, NotImplementedError):  # no storage, or no version (inference mode)
            return None
        seen = self._seen.get(elements)
        if seen is not None and seen[0]() is storage and seen[1] == version:
            return seen[2]
        self._seen[elements] = (weakref.ref(storage), version, key)
        return None

    def clear(self) -> None:
        """Forgets every summary, keeping the scratch memory for the next step's."""
        for table in (self._keys, self._kept, self._streamed, self._twins, self._seen):
            table.clear()

    def discard(self, key: Hashable) -> None:
        """Leaves ``key`` out of :meth:`result` (no error if it was not added)."""
        self._keys.pop(key, None)

    def result(self) -> dict[Hashable, TensorSummary]:
        """Every summary, in the order added (one transfer per accelerator holding tensors)."""
        found: dict[Hashable, TensorSummary] = {}
        binned: dict[Hashable, _Binned] = dict(self._streamed)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            by_device: dict[torch.device, list[Hashable]] = {}
            for key, tensor in self._kept.items():
                if tensor.numel():
                    by_device.setdefault(tensor.device, []).append(key)
                else:
                    found[key] = _no_finite_values(0, 0, 0)
            for device, group in by_device.items():
                tensors = [self._kept[key] for key in group]
                if device.type == "cpu":
                    binned.update(zip(group, _bin_on_host(tensors, self.bins, self._scratch), strict=True))
                else:
                    found.update(zip(group, _summarize_on_device(tensors, self.bins), strict=True))
            found.update(_with_edges(binned, self.bins))  # every CPU tensor's edges in one search
        return {key: found[self._twins.get(key, key)] for key in self._keys}


def _checked(name: Hashable, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensors[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor.")
    if tensor.is_complex():
        raise TypeError(
            f"tensors[{name!r}] is complex ({tensor.dtype}); summarise a real view of it, "
            "e.g. tensor.abs() or torch.view_as_real(tensor)."
        )
    return tensor


# What identifies the elements of a tensor: its device, dtype, first element and the memory it
# spans, as (stride, size) steps from the finest out, neighbours that continue each other merged:
# every shape and permutation of the same elements (a reshape, a transpose) has the same key.
_Key = tuple[torch.device, torch.dtype, int, bool, tuple[tuple[int, int], ...]]


def _elements(tensor: torch.Tensor) -> _Key:
    steps: list[tuple[int, int]] = []
    dims = zip(tensor.stride(), tensor.shape, strict=True)
    for stride, size in sorted(dim for dim in dims if dim[1] != 1):
        if steps and steps[-1][0] * steps[-1][1] == stride:  # continues the step before it
            steps[-1] = (steps[-1][0], steps[-1][1] * size)
        else:
            steps.append((stride, size))
    return (tensor.device, tensor.dtype, tensor.data_ptr(), tensor.is_neg(), tuple(steps))


# -- on the CPU: values are read as they are computed -------------------------------------------
#
# There is no transfer to save on the CPU, and reading a result lets a tensor without NaN or
# infinity (nearly all of them) skip every masking pass; sums run on the values themselves.


@dataclasses.dataclass(slots=True)
class _Finite:
    """The finite values of one tensor and what was set aside."""

    values: torch.Tensor
    numel: int
    nans: int
    infs: int
    low: float
    high: float


def _bin_on_host(tensors: list[torch.Tensor], bins: int, scratch: Scratch) -> list[_Binned]:
    found: dict[int, _Binned] = {}
    for dtype, indices in _passes.by_compute_dtype(tensors):
        batch = _SmallTensors.of([i for i in indices if tensors[i].numel() <= _SMALL], tensors, dtype)
        together = set(batch.indices) if batch is not None else set()
        finite: dict[int, _Finite] = {}
        for index in indices:
            if index in together:
                continue
            kept = _finite_values(tensors[index], dtype, scratch)
            if isinstance(kept, TensorSummary):
                found[index] = _Binned(kept, dtype, None)
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
class _Binned:
    """A CPU summary with its bins counted, waiting for its histogram's edges (``_with_edges``):
    the edges of all tensors are searched for together, which costs about what one tensor's do."""

    summary: TensorSummary
    """The summary, its histogram's edges still empty."""
    dtype: torch.dtype
    """The dtype of the binning arithmetic."""
    frame: _Frame | None
    """The binning arithmetic; None when there is nothing to bin (no finite value)."""


def _bin(kept: _Finite, dtype: torch.dtype, bins: int, frame: _Frame, scratch: Scratch) -> _Binned:
    return _Binned(_host_summary(kept, dtype, bins, frame, scratch), dtype, frame)


def _with_edges(binned: Mapping[Hashable, _Binned], bins: int) -> Iterator[tuple[Hashable, TensorSummary]]:
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

    def binned(
        self, rows: _histogram.Frames, first: int, frames: list[_Frame], bins: int
    ) -> list[_Binned | None]:
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
        found: list[_Binned | None] = []
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
            found.append(_Binned(summary, self.values.dtype, frame))
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


def _stream(tensor: torch.Tensor, bins: int, scratch: Scratch) -> _Binned | None:
    """A CPU tensor's summary but for the edges; None where it needs the general code."""
    dtype = _passes.compute_dtype(tensor.dtype)
    kept = _finite_values(tensor, dtype, scratch)
    if isinstance(kept, TensorSummary):  # no finite value: complete as it is
        return _Binned(kept, dtype, None)
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
