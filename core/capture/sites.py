"""Where ops are called from: worked out once per code path for the whole process.

The recorder walks the frames between an op and the module call it runs in for every op and
every module call. A code path (the code objects and instruction offsets of those frames, and
the key of the path outside them) is the same each time the same line runs, in every capture:
what it stands for is made the first time and shared after that. That is the stack as a
:class:`StackNode`, a small int key (equal keys mean equal stacks: the recurrence key of ops
without parameters), and whether framework code issued an op from there (see ``callers``).
"""

from __future__ import annotations

import weakref
from types import CodeType, FrameType

from lens_core.capture.callers import CallerFilter
from lens_core.capture.records import StackNode

__all__ = ["Site", "Sites", "sites_for"]

Site = tuple[StackNode, int, bool]
"""A code path's stack (innermost frame first), its key, and whether framework code is there."""

# Deepest stretch of stack kept per code path when the capture's own frame is not on the stack.
MAX_FRAMES = 64
# Code paths remembered at most; past it, the next capture starts afresh (dynamic code, which
# makes new code objects, would otherwise grow the table forever).
_MAX_SITES = 50_000


class Sites:
    """The code paths seen so far, for one framework filter."""

    def __init__(self, callers: CallerFilter) -> None:
        self.callers = callers
        self.known: dict[tuple[int, ...], Site] = {}
        """(key of the path outside, id(code), offset, id(code), offset, ...) -> its site. The
        nodes keep their code objects alive, so an id in a key is never another code's."""

    def add(self, path: tuple[int, ...], frame: FrameType | None, boundary: FrameType | None,
            outer: StackNode | None) -> Site:
        """The site of a new ``path``, walked from ``frame`` up to (not including) ``boundary``."""
        framework = not self.callers.everything and self.callers.issued_by_framework(frame)
        frames: list[tuple[CodeType, int]] = []
        while frame is not None and frame is not boundary and len(frames) < MAX_FRAMES:
            frames.append((frame.f_code, frame.f_lasti))
            frame = frame.f_back
        if frame is not boundary:  # not below the capture (or too deep): the frames seen only
            outer = None
        site = self.known[path] = (StackNode(tuple(frames), outer), len(self.known) + 1, framework)
        return site

    def trim(self) -> None:
        """Forgets every path if there are too many (between captures only: keys restart)."""
        if len(self.known) > _MAX_SITES:
            self.known.clear()


_SITES: weakref.WeakKeyDictionary[CallerFilter, Sites] = weakref.WeakKeyDictionary()


def sites_for(callers: CallerFilter) -> Sites:
    """The shared table of ``callers`` (a filter lives as long as the captures that use it)."""
    sites = _SITES.get(callers)
    if sites is None:
        sites = _SITES[callers] = Sites(callers)
    sites.trim()
    return sites
