"""The folders a training run keeps its captures in: steps of micro-batches, runs of steps.

A captured training step is one optimizer step, and with gradient accumulation that is several
forward passes, so the writers of ``lens_callbacks`` save one history per micro-batch::

    <run>/step_000100/              a step folder (``validate_step_000100/`` for other stages)
        micro_batch_0/              a saved capture (history.json, summaries.json, tensors...)
        micro_batch_1/              the next micro-batch, when gradients were accumulated
        summaries.json              the step's statistics pooled over its micro-batches; written
                                    last, so a step folder without it was not finished
    <run>/rank_1/step_000100/       the same per rank, when several ranks capture

This module names those folders and lists them; the writers, ``lens_core.load`` and the ``lens``
command all read the layout from here, so they agree on what a folder is. Listing follows no
symbolic link: a run folder from elsewhere cannot make it walk outside the run (the threat model
in the README), so a linked step or micro-batch folder is not one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_core.store._files import read_json
from lens_core.store._layout import SUMMARIES, CaptureFormatError

__all__ = [
    "STEP_SUMMARIES",
    "StepFolder",
    "is_step_name",
    "is_unfinished",
    "is_unfinished_micro_batch",
    "micro_batch_folders",
    "micro_batch_index",
    "micro_batch_name",
    "rank_folder_name",
    "read_step_summaries",
    "step_folder_name",
    "step_folders",
]

STEP_SUMMARIES = SUMMARIES
"""The step's pooled statistics: the same name as a capture's summaries, another content."""

# Matched whole (fullmatch: "$" would let a trailing newline in) and in ASCII digits only.
_MICRO_BATCH = re.compile(r"micro_batch_(?P<index>[0-9]{1,9})")
_STEP = re.compile(r"(?:(?P<stage>[a-z_]+)_)?step_(?P<step>[0-9]{1,18})")
_RANK = re.compile(r"rank_(?P<rank>[0-9]{1,9})")
# Hidden entries of a write in progress: save's ".micro_batch_0.tmp-<hex>", a writer's
# ".summaries.json.tmp".
_UNFINISHED = re.compile(r"\..+\.tmp(-.*)?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class StepFolder:
    """One captured step of a run, as :func:`step_folders` finds it."""

    path: Path
    """The step folder, holding ``micro_batch_<i>/`` folders."""
    step: int
    """The trainer's step, from the folder's name."""
    stage: str
    """``train``, or the stage its name starts with (``validate_step_...``)."""
    rank: int | None
    """From the ``rank_<k>`` folder it is in; None when the run was not written per rank."""


def micro_batch_name(index: int) -> str:
    """``micro_batch_0``: the folder of one micro-batch's history in a step folder."""
    return f"micro_batch_{index}"


def step_folder_name(step: int, stage: str = "train") -> str:
    """``step_000100`` for training, ``validate_step_000100`` for the other stages."""
    prefix = "" if stage == "train" else f"{stage}_"
    return f"{prefix}step_{step:06d}"


def rank_folder_name(rank: int) -> str:
    """``rank_1``: the folder of one rank's steps when a run is written per rank."""
    return f"rank_{rank}"


def micro_batch_index(name: str) -> int | None:
    """The index in a micro-batch folder's name (``micro_batch_3`` -> 3), else None."""
    match = _MICRO_BATCH.fullmatch(name)
    return int(match["index"]) if match else None


def is_step_name(name: str) -> bool:
    """Whether ``name`` is the name of a step folder (``step_000100``, ``validate_step_000100``)."""
    return bool(_STEP.fullmatch(name))


def is_unfinished(name: str) -> bool:
    """Whether ``name`` is the hidden file or folder of a write still in progress (or cut short)."""
    return bool(_UNFINISHED.fullmatch(name))


def is_unfinished_micro_batch(name: str) -> bool:
    """Whether ``name`` is the hidden folder of a micro-batch being saved (or whose save was cut short)."""
    return is_unfinished(name) and ".micro_batch_" in name


def micro_batch_folders(step: str | os.PathLike[str]) -> list[Path]:
    """The finished ``micro_batch_<i>`` folders of a step folder, by index; empty for any other.

    Each one loads with ``lens_core.load``; so does ``lens_core.load(step, micro_batch=i)``.
    """
    root = Path(step)
    if not root.is_dir():
        return []
    found = [(index, entry) for entry in root.iterdir()
             if (index := micro_batch_index(entry.name)) is not None and _is_folder(entry)]
    return [entry for _, entry in sorted(found)]


def read_step_summaries(step: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The step's pooled statistics (its ``summaries.json``), read as :func:`lens_core.load`
    reads a capture's files; None when the step has none yet (it is not finished).

    Raises:
        CaptureFormatError: the file is no regular file, too large, not JSON, too deeply nested,
            or not a JSON object.
    """
    root = Path(step)
    try:
        document = read_json(root, STEP_SUMMARIES)
    except FileNotFoundError:
        return None
    if not isinstance(document, dict):
        raise CaptureFormatError(
            f"{root / STEP_SUMMARIES} is not the summaries of a step (a JSON object written by DiskWriter); "
            "capture that step again."
        )
    return document


def step_folders(run: str | os.PathLike[str]) -> list[StepFolder]:
    """The step folders of a run folder, also those in its ``rank_<k>`` folders.

    Sorted by step, training before the other stages, then by rank. Empty when ``run`` holds
    none (a step folder, a capture, anything else).

    Example::

        for found in lens_core.store.step_folders("out/demo/lens"):
            history = lens_core.load(found.path, micro_batch=0)
    """
    root = Path(run)
    if not root.is_dir():
        return []
    found: list[StepFolder] = []
    for child in root.iterdir():
        if not _is_folder(child):
            continue
        if step := _STEP.fullmatch(child.name):
            found.append(_step_folder(child, step, None))
        elif rank := _RANK.fullmatch(child.name):
            found += [_step_folder(folder, step, int(rank["rank"])) for folder in child.iterdir()
                      if _is_folder(folder) and (step := _STEP.fullmatch(folder.name))]
    return sorted(found, key=lambda f: (f.step, f.stage != "train", f.stage, -1 if f.rank is None else f.rank,
                                        str(f.path)))


def _is_folder(path: Path) -> bool:
    """A folder itself, not a link to one (which could lead anywhere)."""
    return not path.is_symlink() and path.is_dir()


def _step_folder(path: Path, match: re.Match[str], rank: int | None) -> StepFolder:
    return StepFolder(path=path, step=int(match["step"]), stage=match["stage"] or "train", rank=rank)
