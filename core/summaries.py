"""Statistics and histograms of many tensors, with one device-to-host transfer for all of them.

A training callback summarises every selected activation and gradient at a captured step:
millions of values per step, so the cost is memory passes, and this module is written to make
few of them, into reused buffers.

On an accelerator, reading each number with ``.item()`` would stall the device once per number;
instead every statistic, histogram edge and bin count stays a device tensor until they are
packed into one byte buffer and copied to the host with a single ``.cpu()`` (one per device the
tensors live on). On the CPU there is nothing to transfer: results are read as they come, which
lets a tensor with no NaN or infinity (nearly all) skip the masking an accelerator always does.

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

from lens_core import _histogram

__all__ = ["Histogram", "TensorSummary", "summarize"]

# Integer results per tensor, before the bin counts.
_INT_STATS = ("nan_count", "inf_count", "zero_count")
# Float results per tensor, before the bin edges.
_FLOAT_STATS = ("mean", "std", "mean_abs", "l2_norm", "min", "max")
# Elements per pass that needs a buffer: bounds the scratch memory of a huge tensor.
_CHUNK = 1 << 22
# Most histogram bins: float32 arithmetic places values in this many bins exactly.
_MAX_BINS = 1 << 16
# Interleaved copies of each histogram counted on the CPU (see ``_host_counts``).
_STRIPES = 8


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
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= _MAX_BINS:
        raise ValueError(f"bins={bins!r}: use an int from 1 to {_MAX_BINS} (64 is the default).")
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is summarised in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _by_compute_dtype(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    groups: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(_compute_dtype(tensor.dtype), []).append(index)
    return list(groups.items())


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

    def stripes(self, dtype: torch.dtype, size: int, width: int) -> torch.Tensor:
        """``0, width, 2 * width, ...`` for ``_STRIPES`` values, repeated to ``size`` values."""
        pattern = self.buffers.get("stripes")
        if pattern is None or pattern.dtype != dtype or pattern.numel() < size:
            step = torch.arange(_STRIPES, dtype=dtype, device=self.device) * width
            pattern = self.buffers["stripes"] = step.repeat(-(-size // _STRIPES))
        return pattern[:size]

    def flat(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` as a contiguous 1-d tensor of ``dtype`` (a copy only when it must be)."""
        if tensor.dtype == dtype and tensor.is_contiguous():
            return tensor.reshape(-1)
        copy = self.take("values", dtype, tensor.numel())
        copy.view(tensor.shape).copy_(tensor)
        return copy


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
    for dtype, indices in _by_compute_dtype(tensors):
        scratch = _Scratch(torch.device("cpu"))
        finite: dict[int, _Finite] = {}
        for index in indices:
            kept = _finite_values(tensors[index], dtype, scratch)
            if isinstance(kept, TensorSummary):
                found[index] = kept
            else:
                finite[index] = kept
        if not finite:
            continue
        low = torch.tensor([kept.low for kept in finite.values()], dtype=dtype)
        high = torch.tensor([kept.high for kept in finite.values()], dtype=dtype)
        rows = _histogram.frames(low, high, bins)
        all_edges = _histogram.edges(rows, bins).tolist()
        arithmetic = zip(*(row.tolist() for row in (rows.unit, rows.origin, rows.scale)), strict=True)
        for (index, kept), edges, frame in zip(finite.items(), all_edges, arithmetic, strict=True):
            found[index] = _host_summary(kept, dtype, bins, edges, frame, scratch)
    return [found[index] for index in range(len(tensors))]


def _finite_values(tensor: torch.Tensor, dtype: torch.dtype, scratch: _Scratch) -> _Finite | TensorSummary:
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
    scratch: _Scratch,
) -> TensorSummary:
    x = scratch.flat(kept.values, dtype)
    count = x.numel()
    signed = kept.low < 0 < kept.high
    moments = _host_moments(x, signed, 1.0, scratch)
    if not all(math.isfinite(m) for m in moments):  # sums past the dtype's largest value
        peak = max(abs(kept.low), abs(kept.high))
        moments = _host_moments(x, signed, 2.0 ** (1 - math.frexp(peak)[1]), scratch)  # exact scaling
    mean, std, mean_abs, l2_norm = moments
    zeros = _host_zeros(x, scratch) if kept.low <= 0 <= kept.high else 0
    counts = _host_counts(x, frame, bins, scratch)
    return TensorSummary(
        numel=kept.numel, mean=mean, std=std, min=kept.low, max=kept.high, mean_abs=mean_abs,
        l2_norm=l2_norm, zero_fraction=zeros / count, nan_count=kept.nans, inf_count=kept.infs,
        histogram=Histogram(tuple(edges), tuple(counts)),
    )


def _host_moments(
    x: torch.Tensor, signed: bool, unit: float, scratch: _Scratch
) -> tuple[float, float, float, float]:
    """Mean, std, mean magnitude and l2 norm of ``x``, summed as ``x * unit``.

    ``signed``: ``x`` holds negative and positive values (otherwise the magnitudes sum to the
    magnitude of the sum, and need no pass of their own).
    """
    n = x.numel()
    buffer = scratch.take("buffer", x.dtype, min(n, _CHUNK))
    parts = torch.split(x, _CHUNK)

    def scaled(part: torch.Tensor) -> torch.Tensor:
        return part if unit == 1.0 else torch.mul(part, unit, out=buffer[:part.numel()])

    total = sum(scaled(part).sum().item() for part in parts)
    mean = total / n
    deviations = squares = magnitudes = 0.0
    for part in parts:
        deviation = torch.sub(scaled(part), mean, out=buffer[:part.numel()])
        deviations += deviation.sum().item()
        squares += torch.dot(deviation, deviation).item()
        if signed:
            magnitudes += torch.abs(scaled(part), out=buffer[:part.numel()]).sum().item()
    if not signed:
        magnitudes = abs(total)
    # the float mean is rounded: its error comes back as the deviations' own mean
    variance = max(squares - deviations * deviations / n, 0.0) / n
    return (mean / unit, math.sqrt(variance) / unit, magnitudes / n / unit,
            math.sqrt(n * (variance + mean * mean)) / unit)


def _host_zeros(x: torch.Tensor, scratch: _Scratch) -> int:
    """The number of zeros, summed as floats 0/1 (exact per chunk).

    ``count_nonzero`` branches on each value: on ReLU outputs, half zeros at random, it is
    several times slower than a comparison and a sum.
    """
    buffer = scratch.take("buffer", x.dtype, min(x.numel(), _CHUNK))
    parts = torch.split(x, _CHUNK)
    return sum(int(torch.eq(part, 0, out=buffer[:part.numel()]).sum().item()) for part in parts)


def _host_counts(
    x: torch.Tensor, frame: tuple[float, float, float], bins: int, scratch: _Scratch
) -> list[int]:
    """The bin counts of ``x``.

    ``bincount`` waits on its previous increment when consecutive values fall in one bin (half
    of the values of a ReLU output are 0): the bins are counted in ``_STRIPES`` interleaved
    copies of the histogram, so that neighbouring values increment different counters.
    """
    dtype = torch.int16 if _STRIPES * (bins + 1) <= 1 << 15 else torch.int32  # narrow: fewer bytes
    chunk = min(x.numel(), _CHUNK)
    buffer, index = scratch.take("buffer", x.dtype, chunk), scratch.take("index", dtype, chunk)
    stripes = scratch.stripes(dtype, chunk, bins + 1)
    counts = torch.zeros(_STRIPES * (bins + 1), dtype=torch.int64)
    for part in torch.split(x, _CHUNK):
        m = part.numel()
        index[:m].copy_(_histogram.positions(part, *frame, out=buffer[:m]))  # truncates: the bin
        counts += torch.bincount(index[:m].add_(stripes[:m]), minlength=counts.numel())
    *binned, top = counts.view(_STRIPES, bins + 1).sum(0).tolist()
    binned[-1] += top  # the maximum's bin: the last bin holds its right edge
    return binned


# -- on an accelerator: everything stays on the device until one transfer ------------------------


def _summarize_on_device(tensors: list[torch.Tensor], bins: int) -> list[TensorSummary]:
    wide = torch.float32 if tensors[0].device.type == "mps" else torch.float64  # MPS: no float64
    packed, order = _pack(tensors, bins, wide)
    host = packed.cpu()  # the one transfer (and the one wait) for this device
    sizes = [tensors[index].numel() for index in order]
    found = dict(zip(order, _unpack(host, sizes, bins, wide), strict=True))
    return [found[index] for index in range(len(tensors))]


def _pack(tensors: list[torch.Tensor], bins: int, wide: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """Every tensor's results in one uint8 device tensor: all int64 rows, then all float rows.

    Returns the buffer and the order of the tensors in it (grouped by the dtype they are
    summarised in).
    """
    order: list[int] = []
    int_rows: list[torch.Tensor] = []
    float_rows: list[torch.Tensor] = []
    for dtype, indices in _by_compute_dtype(tensors):
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
    scratch = _Scratch(tensors[0].device)
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


def _device_extremes(x: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """Minimum and maximum of the finite values (0 and 0 when there is none)."""
    a = scratch.take("a", x.dtype, x.numel())
    low = torch.nan_to_num(x, math.inf, math.inf, math.inf, out=a).amin()
    high = torch.nan_to_num(x, -math.inf, -math.inf, -math.inf, out=a).amax()
    return torch.where(torch.isinf(low), 0, torch.stack((low, high)))  # inf: nothing finite


def _device_stats(
    x: torch.Tensor, scale: torch.Tensor, rows: _histogram.Frames, row: int, bins: int, scratch: _Scratch
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
    l2_norm = torch.linalg.vector_norm(scaled)
    mean_abs = scaled.abs_().sum() / count
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=x.device)
    index = scratch.take("index", torch.int64, min(n, _CHUNK))
    frame = (rows.unit[row], rows.origin[row], rows.scale[row])
    for part, keep in zip(torch.split(x, _CHUNK), torch.split(finite, _CHUNK), strict=True):
        m = part.numel()
        placed = torch.where(keep, part, rows.low[row], out=a[:m])  # non-finite: in the first bin
        index[:m].copy_(_histogram.positions(placed, *frame, out=b[:m]))
        ones = torch.ones((), dtype=torch.int64, device=x.device).expand(m)
        counts.scatter_add_(0, index[:m], ones)  # bincount would sync to size its output
    counts[0] -= n - count  # the non-finite values, out again
    counts[bins - 1] += counts[bins]  # the maximum's bin: the last bin holds its right edge
    ints = torch.cat((torch.stack((nans, infs, zeros)), counts[:bins]))
    return ints, torch.stack((mean, std, mean_abs, l2_norm))


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
