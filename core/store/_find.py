"""Which saved capture a path names: the folder itself, one micro-batch of a step, or none.

Users pass whatever folder a writer left them: a capture, a step folder (``step_000100/``, or
a W&B ``lens-capture`` artifact, which holds the same files), or a whole run. A folder is judged
by what it holds before its name, so that a damaged capture is called damaged and a folder
that holds several captures, or none, is called that instead.
"""

from __future__ import annotations

from pathlib import Path

from lens_core.store._layout import (
    FILES,
    HISTORY,
    TEMPORARY,
    TENSORS,
    CaptureFormatError,
    SeveralCapturesError,
    corrupted,
)
from lens_core.store.folders import (
    STEP_SUMMARIES,
    StepFolder,
    is_step_name,
    is_unfinished_micro_batch,
    micro_batch_folders,
    micro_batch_index,
    micro_batch_name,
    read_step_summaries,
    step_folders,
)

# Step folders of more micro-batches than this list the first and last calls only.
_LISTED = 8
_ANOMALY = "anomaly.json"


def find_capture(path: Path, micro_batch: int | None, reader: str) -> Path:
    """The capture folder ``reader`` (``"load"``, ``"load_extra"``...) is to read for ``path``.

    Raises:
        TypeError, ValueError: ``micro_batch`` is not an index, or given for a single capture.
        SeveralCapturesError: ``path`` is a step of several micro-batches (``micro_batch`` not
            given) or a run folder.
        CaptureFormatError: ``path`` holds no capture, an unfinished one or a damaged one.
    """
    _check_micro_batch(micro_batch)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a folder"
        hint = f" (pass the folder that holds it, {path.parent})" if path.name in FILES else ""
        raise CaptureFormatError(
            f"{path} {what}{hint}; a saved capture is a folder written by lens_core.save(history, path) "
            "or a step folder a writer of lens_callbacks made."
        )
    if TEMPORARY.match(path.name):
        raise CaptureFormatError(
            f"{path} is the temporary folder of a save that did not finish; delete it and save "
            "the history again (lens_core.save)."
        )
    names = {entry.name for entry in path.iterdir()}
    if HISTORY in names:
        if micro_batch is not None:
            raise ValueError(
                f"micro_batch={micro_batch}: {path} is one saved capture (it has {HISTORY}), not a step "
                f"folder of micro-batches; call lens_core.{reader}({str(path)!r}) without micro_batch."
            )
        return path
    batches = micro_batch_folders(path)
    linked = sorted(name for name in names
                    if micro_batch_index(name) is not None and (path / name).is_symlink())
    if linked:
        raise CaptureFormatError(
            f"{path / linked[0]} is a symbolic link, and loading follows none: it reads a capture only "
            "from the folders and regular files inside the path it is given, so that a capture cannot "
            "make it read anything else. Replace the link by a copy of the folder, if you trust it."
        )
    pending = sorted(filter(is_unfinished_micro_batch, names))
    if batches or pending:
        return _micro_batch(path, names, batches, pending, micro_batch, reader)
    steps = step_folders(path)
    if steps:
        raise _run_folder(path, steps, reader)
    if names & FILES:
        if TENSORS not in names and _holds_step_summaries(path):
            raise CaptureFormatError(
                f"{path} is a damaged step folder: it has the step's {STEP_SUMMARIES} but no "
                f"{micro_batch_name(0)}/ (its micro-batch folders were removed or moved); capture that "
                "step again."
            )
        raise corrupted(path, f"{HISTORY} is missing")
    if is_step_name(path.name):
        held = (f"only the anomaly report of that step ({_ANOMALY}; the step was not captured)"
                if _ANOMALY in names else "no saved micro-batch")
        raise CaptureFormatError(
            f"{path} is a step folder with {held}: a captured step holds {micro_batch_name(0)}/. "
            f"lens_core.store.step_folders({str(path.parent)!r}) lists the captured steps of its run."
        )
    raise CaptureFormatError(
        f"{path} is not a saved capture (it has no {HISTORY} and no {micro_batch_name(0)}/); pass a "
        "folder written by lens_core.save(history, path) or a step folder a writer of lens_callbacks "
        f"made.{_run_hint(path)}"
    )


def _check_micro_batch(micro_batch: object) -> None:
    if micro_batch is None:
        return
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int):
        raise TypeError(f"micro_batch={micro_batch!r}: pass the index of a micro-batch (0, 1, ...) or None.")
    if micro_batch < 0:
        raise ValueError(f"micro_batch={micro_batch}: micro-batches count from 0; pass 0, 1, ... or None.")


def _micro_batch(
    step: Path, names: set[str], batches: list[Path], pending: list[str], micro_batch: int | None, reader: str
) -> Path:
    """The chosen micro-batch of a step folder; without a choice, its only one."""
    by_index = {index: folder for folder in batches if (index := micro_batch_index(folder.name)) is not None}
    if micro_batch is not None:
        if micro_batch in by_index:
            return by_index[micro_batch]
        saved = ", ".join(map(str, by_index)) or "none"
        raise CaptureFormatError(
            f"{step} has no {micro_batch_name(micro_batch)}/ (micro_batch={micro_batch}); the micro-batches "
            f"saved there are: {saved}."
        )
    if pending or STEP_SUMMARIES not in names:
        what = (f"the save of {pending[0]} did not finish" if pending
                else f"its {STEP_SUMMARIES}, written last, is missing")
        fix = (f"load a micro-batch that was saved, e.g. lens_core.{reader}({str(step)!r}, "
               f"micro_batch={next(iter(by_index))}), or capture that step again") if by_index else (
               "capture that step again")
        raise CaptureFormatError(
            f"{step} is a half-written step folder: {what}. The run stopped while writing this step "
            f"(or is writing it now); {fix}."
        )
    if len(batches) == 1:
        return batches[0]
    calls = [f"lens_core.{reader}({str(step)!r}, micro_batch={index})" for index in by_index]
    if len(calls) > _LISTED:
        calls = [*calls[:2], "...", calls[-1]]
    raise SeveralCapturesError(
        f"{step} is a step folder of {len(batches)} micro-batches (gradient accumulation), each saved as "
        f"a capture of its own; load one of them: {', '.join(calls)} (or its folder, such as "
        f"{batches[-1]}).",
        batches,
    )


def _run_folder(run: Path, steps: list[StepFolder], reader: str) -> SeveralCapturesError:
    listed = [str(found.path.relative_to(run)) for found in steps[:_LISTED]]
    if len(steps) > _LISTED:
        listed.append(f"and {len(steps) - _LISTED} more")
    plural = "" if len(steps) == 1 else "s"
    return SeveralCapturesError(
        f"{run} is a run folder holding {len(steps)} captured step{plural} ({', '.join(listed)}), not one "
        f"capture; load a step, e.g. lens_core.{reader}({str(steps[-1].path)!r}) "
        f"(lens_core.store.step_folders({str(run)!r}) lists them all).",
        [found.path for found in steps],
    )


def _holds_step_summaries(folder: Path) -> bool:
    """Whether ``summaries.json`` there is a step's (pooled, with its step) and not a capture's."""
    try:
        document = read_step_summaries(folder)
    except CaptureFormatError:
        return False
    return document is not None and "step" in document and "activations" in document


def _run_hint(path: Path) -> str:
    """Points to a run folder one level down (a Lightning run keeps its captures in ``lens/``)."""
    below = sorted(child for child in path.iterdir()
                   if not child.is_symlink() and child.is_dir() and step_folders(child))
    if not below:
        return ""
    return (f" Its subfolder {below[0]} is a run folder: lens_core.store.step_folders({str(below[0])!r}) "
            "lists its steps.")
