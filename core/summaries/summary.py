"""What a summary of a tensor is: statistics and a histogram, and how they are written as JSON."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_BINS", "Histogram", "LocalShard", "TensorSummary", "check_bins", "no_finite_values"]

# Most histogram bins: float32 arithmetic places values in this many bins exactly.
MAX_BINS = 1 << 16


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
class LocalShard:
    """Says that a summary is of one rank's part of a ``DTensor``, not of the whole tensor.

    Summaries never communicate (:func:`~lens_core.summaries.summarize` says why), so a
    ``DTensor`` split or partially summed over ranks is summarised by the values this rank holds
    (``to_local()``); its statistics are those of that shard alone.
    """

    placements: tuple[str, ...]
    """How the tensor is laid out, one placement per mesh dimension, as torch writes it:
    ``"Shard(dim=0)"`` (this rank holds a slice along dim 0), ``"Replicate()"`` (a full copy),
    ``"Partial(sum)"`` (a term of a sum over ranks)."""
    coordinate: tuple[int, ...]
    """This rank's position on the device mesh (empty when the rank is not in the mesh)."""


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
    shard: LocalShard | None = None
    """None: the summary is of the whole tensor. For a ``DTensor`` that is not replicated on
    every mesh dimension, which part of it: the summary is of this rank's local shard."""

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
        if self.shard is not None:  # absent for whole tensors: their files are as before
            shard = self.shard
            data["shard"] = {"placements": list(shard.placements), "coordinate": list(shard.coordinate)}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSummary:
        """Rebuilds a summary from :meth:`to_dict`'s output.

        Raises:
            ValueError: ``data`` lacks a field or holds a value of the wrong type.
        """
        try:
            histogram = data["histogram"]
            shard = data.get("shard")
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
                shard=None if shard is None else LocalShard(
                    tuple(_str(placement) for placement in shard["placements"]),
                    tuple(_int(position) for position in shard["coordinate"]),
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


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def check_bins(bins: Any) -> int:
    """``bins`` if it is a number of histogram bins :func:`summarize` takes, else ValueError."""
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins={bins!r}: use an int from 1 to {MAX_BINS} (64 is the default).")
    return bins


def no_finite_values(numel: int, nans: int, infs: int) -> TensorSummary:
    nan = math.nan
    return TensorSummary(
        numel=numel, mean=nan, std=nan, min=nan, max=nan, mean_abs=nan, l2_norm=0.0,
        zero_fraction=nan, nan_count=nans, inf_count=infs, histogram=Histogram((), ()),
    )
