"""Comparing the statistics of two captures, layer by layer: what ``lens diff`` ranks.

The question behind a diff is "which layer moved most between these two steps?", asked of
layers whose scales differ by orders of magnitude; so changes are relative to the first
capture's value, and ranked by their size whatever their sign.

The default statistic is ``mean_abs``, the mean magnitude of the values: unlike ``l2_norm`` it
does not grow with the number of elements (a smaller last batch is no change), unlike ``std``
it is not zero for a constant tensor, and unlike ``mean`` it does not cross zero, where any
relative change is huge. The others can be asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from lens_core.summaries import TensorSummary

__all__ = ["STATISTICS", "Change", "Comparison", "Statistic", "compare", "relative_change"]

Statistic = Literal["mean_abs", "std", "l2_norm", "mean", "min", "max"]
STATISTICS: tuple[Statistic, ...] = ("mean_abs", "std", "l2_norm", "mean", "min", "max")


@dataclass(frozen=True, slots=True)
class Change:
    """How one statistic of one layer (or parameter) moved from capture A to capture B."""

    name: str
    before: float
    after: float
    relative: float
    """``(after - before) / |before|``; infinite where ``before`` is 0 or only one side has a
    finite value (a layer that turned NaN ranks first), 0 where both have none."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """The changes of names found in both captures, largest first, and the names found in one."""

    changes: list[Change]
    only_in_a: list[str]
    only_in_b: list[str]


def relative_change(before: float, after: float) -> float:
    """``(after - before) / |before|``, never NaN, so that every change has a rank."""
    if math.isnan(before) and math.isnan(after):
        return 0.0
    if math.isnan(before) or math.isnan(after):
        return math.inf
    if before == after:  # also two equal infinities
        return 0.0
    if before == 0 or math.isinf(before) or math.isinf(after):
        return math.copysign(math.inf, after - before)
    return (after - before) / abs(before)


def compare(
    a: Mapping[str, TensorSummary],
    b: Mapping[str, TensorSummary],
    statistic: Statistic,
    order: Iterable[str] = (),
) -> Comparison:
    """Matches ``a`` and ``b`` by name and ranks the changes of ``statistic``.

    Args:
        a: name -> summary in the first capture.
        b: name -> summary in the second.
        statistic: the field of :class:`TensorSummary` compared.
        order: names in execution order; equal changes keep it (then the names of ``a``).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r}: choose from {list(STATISTICS)}.")
    position = {name: index for index, name in enumerate(dict.fromkeys([*order, *a, *b]))}
    common = sorted((name for name in a if name in b), key=position.__getitem__)
    changes = [_change(name, a[name], b[name], statistic) for name in common]
    changes.sort(key=lambda change: -abs(change.relative))  # stable: ties stay in execution order
    return Comparison(
        changes=changes,
        only_in_a=sorted((name for name in a if name not in b), key=position.__getitem__),
        only_in_b=sorted((name for name in b if name not in a), key=position.__getitem__),
    )


def _change(name: str, a: TensorSummary, b: TensorSummary, statistic: Statistic) -> Change:
    before: float = getattr(a, statistic)
    after: float = getattr(b, statistic)
    return Change(name, before, after, relative_change(before, after))
