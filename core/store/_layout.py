"""The folder format of a saved capture (its files and version), and what reading and writing share."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from types import ModuleType

from lens_core.errors import LensError

FORMAT_VERSION = 1
"""Layout version of saved captures; ``load`` reads exactly this one."""

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

    Missing, half-written, corrupted, or written in another format version; the message names
    the path, what is wrong and what to do.
    """


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
