"""The exceptions lens_core raises, kept shallow: one base class and a few specific ones."""

from __future__ import annotations

__all__ = ["CaptureError", "LayerNotFoundError", "LensError"]


class LensError(Exception):
    """Base class of every error lens_core raises on purpose."""


class CaptureError(LensError, RuntimeError):
    """A capture was used in a way it cannot support (nested, concurrent, not started...)."""


class LayerNotFoundError(LensError, KeyError):
    """A layer name, module address or ordinal names no layer of the history."""

    def __str__(self) -> str:
        # KeyError quotes its message with repr(); ours is a sentence meant to be read.
        return str(self.args[0]) if self.args else ""
