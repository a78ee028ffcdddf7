"""Plain-text tables and numbers for the ``lens`` command.

The command's output is read in a terminal and pasted into issues, so it is fixed-width text
with no colour and no dependency: columns padded to their widest cell, numbers in four
significant digits, a dash where a value does not exist (rather than 0, which would be a value).

Labels, module addresses, model names and paths come from captures that may come from anyone,
and a terminal obeys the control characters in what it prints (an escape sequence sets the
window title, clears the screen, moves the cursor to forge a line). So every such string is
printed through :func:`escape`, which :func:`table` applies to every cell.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

__all__ = ["MISSING", "escape", "human_bytes", "number", "percent", "table"]

MISSING = "-"
"""Cell text of a value that does not exist (a layer with no statistics, a rank not known)."""


def escape(text: str) -> str:
    """``text`` with each control or invisible character written as an escape (``\\x1b``, ``\\x0a``
    for a newline, ``\\u202e``), so that printing it shows it and the terminal obeys none of it."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


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
    """Rows under a header, each column as wide as its widest cell, every cell escaped (:func:`escape`).

    Args:
        headers: one title per column.
        rows: the cells, already formatted; every row has one per column.
        numeric: indices of the columns to right-align, so that digits line up.
    """
    headers = [escape(header) for header in headers]
    rows = [[escape(cell) for cell in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])
