"""The folder format of a saved capture (its files and version), and what reading and writing share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType

from lens_core.errors import LensError

FORMAT_VERSION = 1
"""Layout version of saved captures; ``load`` reads exactly this one."""

# Limits of what loading reads before judging a file, so that a hostile capture cannot make it
# read or allocate without end (the threat model in the README). Real captures are far below:
# a 177-layer ResNet-50 history is 0.4 MB of JSON.
MAX_JSON_BYTES = 256 * 2**20
"""Largest history.json or summaries.json loading reads (a step's summaries.json too)."""
MAX_JSON_VALUES = 32_000_000
"""Most values (numbers, strings, lists, objects) such a file may hold: parsing takes up to about
80 bytes of memory per value, so this bounds it to about 2.5 GB even for a file of nothing but
``{},{},...``. A real history.json holds one value per 15 bytes (the 256 MiB limit comes first)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of lists and objects in those files (their own fields need 6 levels)."""
MAX_MODULE_DEPTH = 256
"""Most module calls a loaded layer may be nested in: the graph follows them recursively."""
MAX_HEADER_BYTES = 100_000_000
"""Largest header of tensors.safetensors, as the safetensors library itself allows."""

MAGIC = "lens-callbacks capture"
HISTORY = "history.json"
SUMMARIES = "summaries.json"
TENSORS = "tensors.safetensors"
FILES = frozenset((HISTORY, SUMMARIES, TENSORS))
GRAD_PREFIX = "grad/"
# Hidden sibling a save writes into before the rename: ".<name>.tmp-<hex>".
TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


class CaptureFormatError(LensError, ValueError):
    """A path holds no capture that :func:`load` can read.

    Missing, half-written, corrupted, written in another format version, or holding several
    captures (:class:`SeveralCapturesError`); the message names the path, what is wrong and
    what to do.
    """


class SeveralCapturesError(CaptureFormatError):
    """A path holds several captures, not one: a step folder of several micro-batches, or a run.

    Nothing is wrong with the folder; the message shows the call that loads each capture
    (``lens_core.load(step, micro_batch=1)``) and :attr:`captures` lists their folders.
    """

    def __init__(self, message: str, captures: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.captures: tuple[Path, ...] = tuple(captures)
        """The folders in ``path`` that each load: its micro-batches, or a run's step folders."""


def library_version() -> str:
    try:
        return metadata.version("lens-callbacks")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def safetensors_module() -> ModuleType:
    try:
        import safetensors.torch  # noqa: PLC0415  # optional: only captures with tensors need it
    except ImportError:
        raise ImportError(
            'Saving or loading tensors of a capture needs safetensors: pip install "lens-callbacks[all]" '
            "(or pip install safetensors)."
        ) from None
    return safetensors


def corrupted(root: Path, why: str) -> CaptureFormatError:
    return CaptureFormatError(
        f"{root} is a damaged capture: {why}. It was not written completely or was changed "
        "afterwards; save the history again (lens_core.save)."
    )
