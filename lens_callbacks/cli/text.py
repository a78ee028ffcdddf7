"""Plain-text tables and numbers for the ``lens`` command.

The command's output is read in a terminal and pasted into issues, so it is fixed-width text
with no colour and no dependency: columns padded to their widest cell, numbers in four
significant digits, a dash where a value does not exist (rather than 0, which would be a value).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

__all__ = ["MISSING", "human_bytes", "number", "percent", "table"]

MISSING = "-"
"""Cell text of a value that does not exist (a layer with no statistics, a rank not known)."""


def number(value: float | None) -> str:
    """Four significant digits, so columns of statistics stay narrow and comparable."""
    if value is None:
        return MISSING
    return f"{value:.4g}"


def percent(ratio: float) -> str:
    """A relative change as a signed percentage; ``+inf`` where there was nothing to divide by."""
    if math.isinf(ratio):
        return "+inf" if ratio > 0 else "-inf"
    return f"{ratio * 100:+.1f}%"


def human_bytes(size: int) -> str:
    """Sizes on disk in the largest unit under 1024 (``512 B``, ``3.2 MB``)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Collection[int] = ()) -> str:
    """Rows under a header, each column as wide as its widest cell.

    Args:
        headers: one title per column.
        rows: the cells, already formatted; every row has one per column.
        numeric: indices of the columns to right-align, so that digits line up.
    """
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])
