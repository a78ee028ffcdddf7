"""Statistics and histograms of many tensors, with one device-to-host transfer for all of them.

A training callback summarises every selected activation and gradient at a captured step.
Reading each number with ``.item()`` would stall the accelerator once per number; instead every
statistic, histogram edge and bin count stays a device tensor until they are packed into one
byte buffer and copied to the host with a single ``.cpu()`` (one per device the tensors live on).

Histograms are exact: the edges come from the on-device minimum and maximum of the finite
values, and each value's bin, found by arithmetic, is checked against those very edges, so the
counts are what ``numpy.histogram(values, bins=edges)`` gives. ``torch.histc`` is not used: it needs
its range on the host (a sync per tensor) and bins with its own arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Histogram", "TensorSummary", "summarize"]

# Integer results per tensor, before the bin counts.
_INT_STATS = ("nan_count", "inf_count", "zero_count")
# Float results per tensor, before the bin edges.
_FLOAT_STATS = ("mean", "std", "mean_abs", "l2_norm", "min", "max")
# Elements binned per step: bounds the int64 bin indices of a huge tensor to 32 MB at a time.
_CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of values in equal-width bins, the layout TensorBoard and W&B histograms take."""

    edges: tuple[float, ...]
    """``bins + 1`` increasing bin edges from the minimum to the maximum finite value (empty
    when there is no finite value). Bin ``i`` is ``[edges[i], edges[i + 1])``; the last bin
    also holds its right edge, as in ``numpy.histogram``."""
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


def summarize(tensors: Mapping[str, torch.Tensor], bins: int = 64) -> dict[str, TensorSummary]:
    """Summarises every tensor of ``tensors``, reading the results back in one transfer.

    Use it at a captured step on all the activations and gradients at once: the work runs on
    the tensors' device and the host waits once, not once per tensor or per statistic.

    Args:
        tensors: name -> dense real tensor (any shape, dtype, device; ``requires_grad`` is
            fine, nothing is recorded by autograd).
        bins: number of histogram bins.

    Returns:
        name -> :class:`TensorSummary`, in the order of ``tensors``.

    Raises:
        TypeError: a value is not a tensor, or is complex.
        ValueError: ``bins`` is not a positive int.

    Example::

        summaries = summarize({"conv1": layer.tensor_contents, "grad/conv1": layer.gradient})
        summaries["conv1"].histogram.counts
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r}: use an int >= 1 (64 is the default).")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}.")
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor.")
        if tensor.is_complex():
            raise TypeError(
                f"tensors[{name!r}] is complex ({tensor.dtype}); summarise a real view of it, "
                "e.g. tensor.abs() or torch.view_as_real(tensor)."
            )
        if tensor.numel():
            by_device.setdefault(tensor.device, []).append(name)
    found: dict[str, TensorSummary] = {}
    with torch.no_grad():
        for device, names in by_device.items():
            wide = _wide_dtype(device)
            packed = _pack([tensors[name] for name in names], bins, wide)
            host = packed.cpu()  # the one transfer (and the one wait) for this device
            sizes = [tensors[name].numel() for name in names]
            found.update(zip(names, _unpack(host, sizes, bins, wide), strict=True))
    return {name: found[name] if name in found else _no_finite_values(0, 0, 0) for name in tensors}


def _wide_dtype(device: torch.device) -> torch.dtype:
    """Dtype the results travel in: float64, except where the device has none (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class _Scratch:
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


def _pack(tensors: list[torch.Tensor], bins: int, wide: torch.dtype) -> torch.Tensor:
    """Every tensor's results in one uint8 device tensor: all int64 rows, then all float rows."""
    scratch = _Scratch(tensors[0].device)
    int_rows, float_rows = zip(*(_device_stats(t, bins, wide, scratch) for t in tensors), strict=True)
    ints = torch.stack(int_rows).reshape(-1)  # (tensors * (3 + bins),) int64
    floats = torch.stack(float_rows).reshape(-1)  # (tensors * (6 + bins + 1),) wide
    # int64 first: its byte length is a multiple of 8, so the floats stay aligned for .view()
    return torch.cat((ints.view(torch.uint8), floats.view(torch.uint8)))


def _device_stats(
    tensor: torch.Tensor, bins: int, wide: torch.dtype, scratch: _Scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of one non-empty tensor as two device vectors, with no host sync.

    Written for memory passes, which are the cost: ``nan_to_num`` moves non-finite values out of
    the way where ``where`` would (several times faster on the CPU), counts use ``count_nonzero``,
    and every pass writes into scratch buffers.
    """
    compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    x = tensor.detach().reshape(-1)
    n = x.numel()
    if x.dtype != compute:
        x = scratch.take("x", compute, n).copy_(x)
    a, b = scratch.take("a", compute, n), scratch.take("b", compute, n)
    finite, flag = scratch.take("finite", torch.bool, n), scratch.take("flag", torch.bool, n)
    torch.lt(torch.abs(x, out=a), math.inf, out=finite)  # isfinite, faster
    count = torch.count_nonzero(finite)
    nans = torch.count_nonzero(torch.ne(x, x, out=flag))
    infs = n - count - nans
    zeros = torch.count_nonzero(torch.eq(x, 0, out=flag))
    any_finite = count > 0
    low = torch.where(any_finite, torch.nan_to_num(x, math.inf, math.inf, math.inf, out=a).amin(), 0)
    high = torch.where(any_finite, torch.nan_to_num(x, -math.inf, -math.inf, -math.inf, out=a).amax(), 0)
    # Sums run over values divided by the largest magnitude, so sums of squares of values
    # near the dtype's maximum (a diverging bf16 run) stay finite; `wide` takes the scale back.
    peak = torch.maximum(low.abs(), high.abs())
    scale = torch.where(peak > 0, peak, 1)
    scaled = torch.nan_to_num(x, 0.0, 0.0, 0.0, out=a).div_(scale)  # non-finite values count as 0
    mean = scaled.sum() / count  # NaN when nothing is finite; the host replaces it
    # the non-finite values' (0 - mean)^2 terms are taken back out of the sum of squares
    squares = torch.sub(scaled, mean, out=b).square_().sum() - (n - count) * mean.square()
    std = (squares.clamp(min=0) / count).sqrt()
    l2_norm = torch.linalg.vector_norm(scaled)
    mean_abs = scaled.abs_().sum() / count
    moments = torch.stack((mean, std, mean_abs, l2_norm)).to(wide) * scale.to(wide)
    edges = _edges(low, high, bins)
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=x.device)
    for part, keep in zip(torch.split(x, _CHUNK), torch.split(finite, _CHUNK), strict=True):
        counts += _bin_counts(part, keep, edges, bins, scratch)
    ints = torch.cat((torch.stack((nans, infs, zeros)), counts[:bins]))
    floats = torch.cat((moments, torch.stack((low, high)).to(wide), edges.to(wide)))
    return ints, floats


def _bin_counts(
    part: torch.Tensor, keep: torch.Tensor, edges: torch.Tensor, bins: int, scratch: _Scratch
) -> torch.Tensor:
    """How many values fall in each bin (bin ``bins`` collects the non-finite ones).

    The bin comes from arithmetic (fast: a few elementwise passes), then moves by one where
    rounding put a value next to an edge on the wrong side, checked against the edges
    themselves: the counts are exactly those of ``numpy.histogram(values, edges)``.
    """
    m = part.numel()
    position, bound = scratch.take("position", part.dtype, m), scratch.take("bound", part.dtype, m)
    index, step = scratch.take("index", torch.int64, m), scratch.take("step", torch.int64, m)
    below = scratch.take("below", torch.bool, m)
    low, high = edges[0] / 2, edges[-1] / 2  # halves: a range near the dtype's maximum fits
    torch.nan_to_num(part, 0.0, 0.0, 0.0, out=position).mul_(0.5).sub_(low).mul_(bins / (high - low))
    index.copy_(position.floor_().clamp_(0, bins - 1))
    torch.lt(part, torch.index_select(edges, 0, index, out=bound), out=below)  # under its edge
    index.sub_(step.copy_(below)).clamp_(min=0)
    torch.ge(part, torch.index_select(edges, 0, torch.add(index, 1, out=step), out=bound), out=below)
    index.add_(step.copy_(below)).clamp_(max=bins - 1)  # at or past the next edge
    index.masked_fill_(torch.logical_not(keep, out=below), bins)
    if index.device.type == "cpu":  # bincount needs its output size: a sync, except on the CPU
        return torch.bincount(index, minlength=bins + 1)
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(m)
    return torch.zeros(bins + 1, dtype=torch.int64, device=index.device).scatter_add_(0, index, ones)


def _edges(low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins + 1`` non-decreasing edges from ``low`` to ``high``, computed on their device."""
    same = low == high  # one distinct value: a unit-wide range around it, as numpy does
    low = torch.where(same, low - 0.5, low)
    high = torch.where(same, high + 0.5, high)
    step = torch.arange(bins + 1, dtype=low.dtype, device=low.device) / bins
    # low * (1 - t) + high * t cannot overflow where high - low would (range near dtype max);
    # clamping and cummax keep the rounded edges inside the range and in order.
    inner = torch.minimum(torch.maximum(low * (1 - step) + high * step, low), high)[1:-1]
    edges = torch.cat((low.reshape(1), inner, high.reshape(1)))
    return torch.cummax(edges, 0).values


def _unpack(host: torch.Tensor, sizes: list[int], bins: int, wide: torch.dtype) -> Iterator[TensorSummary]:
    int_width, float_width = len(_INT_STATS) + bins, len(_FLOAT_STATS) + bins + 1
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
