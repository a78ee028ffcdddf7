"""Argument checks shared by ``Lens``, ``LensCallback``, ``LensTrainerCallback`` and the writers.

Each validates one user argument where it is given (a constructor, ``Lens.step``) and raises
``TypeError`` or ``ValueError`` naming the argument, the value and the fix; each returns the
value normalised (a numpy integer step becomes an ``int``), so callers keep what it returns.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Iterable
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from lens_callbacks.schedule import STAGES
from lens_callbacks.writers.base import Writer
from lens_core.capture.selection import Selection
from lens_core.errors import LayerNotFoundError


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool: ``"no"`` or ``1`` would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: use True or False.")
    return value


def check_step(step: object, name: str = "step") -> int:
    """``step`` as an int: any integral (numpy's too) >= 0, not a bool, a float or a string."""
    if isinstance(step, bool) or not isinstance(step, Integral):
        raise TypeError(
            f"{name}={step!r} ({type(step).__name__}): use an int >= 0, the optimizer step "
            "(numpy integers work too; a float such as 3.0 does not: int(...) it)."
        )
    value = operator.index(step)
    if value < 0:
        raise ValueError(f"{name}={value}: steps are ints >= 0 (optimizer steps counted from 0).")
    return value


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (numpy integers too)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or operator.index(value) < 1:
        raise ValueError(f"{name}={value!r}: use an int >= 1.")
    return operator.index(value)


def check_stage(stage: object, name: str = "stage") -> str:
    """``stage`` if it is one of :data:`~lens_callbacks.schedule.STAGES`."""
    if not isinstance(stage, str) or stage not in STAGES:
        raise ValueError(f"{name}={stage!r}: use one of {list(STAGES)}.")
    return stage


def check_path(name: str, value: object, *, optional: bool = False) -> Path | None:
    """``value`` as a ``Path``: a ``str`` or ``os.PathLike`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or value == "":
        default = "; None picks the default folder" if optional else ""
        raise TypeError(f"{name}={value!r}: use a folder path (a str or pathlib.Path){default}.")
    return Path(value)


def check_writers(writers: object) -> list[Writer] | None:
    """``writers`` as a list of writers, or None (the default writers)."""
    if writers is None:
        return None
    if isinstance(writers, Writer):
        raise TypeError(
            f"writers={type(writers).__name__}(...) is one writer: pass a list, "
            f"writers=[{type(writers).__name__}(...)]."
        )
    if isinstance(writers, (str, bytes)) or not isinstance(writers, Iterable):
        raise TypeError(
            f"writers={writers!r}: use a list of writers, e.g. [DiskWriter('runs/lens')], or None."
        )
    chosen = list(writers)
    for writer in chosen:
        if not isinstance(writer, Writer):
            raise TypeError(
                f"writers holds {writer!r}, which has no write(record) and close() methods "
                "(see lens_callbacks.Writer)."
            )
    return chosen


def check_layers(layers: object) -> None:
    """Checks the form of a layer selection before the model is known (a callback's).

    Names are matched against the model at the first captured step; only the form (a str,
    an int, a predicate or a list of them) is checked here.
    """
    with contextlib.suppress(LayerNotFoundError):  # a dotted module address: the model will tell
        Selection(layers, (), "layers")


def check_ranks(ranks: object) -> str:
    if ranks not in ("zero", "all"):
        raise ValueError(f"ranks={ranks!r}: use 'zero' (rank 0 captures) or 'all' (every rank).")
    return str(ranks)


def check_timeout(name: str, value: object) -> float | None:
    """``value`` as seconds > 0, or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: use a number of seconds > 0, or None for no limit.")
    return float(value)


def check_anomaly_options(on_anomaly: Any, check_gradients: object) -> None:
    """Validates ``on_anomaly`` and ``check_gradients`` together."""
    if on_anomaly not in (None, "raise", "skip", "continue"):
        raise ValueError(f"on_anomaly={on_anomaly!r}: use 'raise', 'skip', 'continue' or None.")
    check_bool("check_gradients", check_gradients)
    if check_gradients and on_anomaly is None:
        raise ValueError("check_gradients=True needs on_anomaly='raise', 'skip' or 'continue'.")
