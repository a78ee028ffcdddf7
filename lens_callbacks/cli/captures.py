"""Finding and opening captures on disk for the ``lens`` command.

Users point the command at whatever folder they have at hand: a run folder, a step folder
(``step_000100/``: pooled statistics in ``summaries.json`` and one saved history per
micro-batch) or a history folder (``micro_batch_0/``). This module decides which one a path is
and turns each way a folder can be wrong (missing, a run instead of a capture, half-written by
a run that stopped) into a :class:`CliError` that names the path and what to pass instead.
The layout of those folders is :mod:`lens_core.store.folders`, shared with the writers and
``lens_core.load``. Reading a history is :mod:`lens_core.store`'s job: its
``CaptureFormatError`` (damaged files, another format version) is passed on unchanged, since
its messages already say what to do. Captures may come from anyone, so every file is read
through :mod:`lens_core.store` (no link followed, nothing but regular files, within limits).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lens_core import store
from lens_core.capture.history import ModelHistory
from lens_core.capture.records import Layer
from lens_core.store.folders import (
    STEP_SUMMARIES,
    StepFolder,
    is_step_name,
    is_unfinished,
    is_unfinished_micro_batch,
    micro_batch_folders,
    micro_batch_index,
    micro_batch_name,
    read_step_summaries,
    step_folders,
)
from lens_core.summaries import TensorSummary, summarize

__all__ = ["CaptureView", "CliError", "RunEntry", "Statistics", "history_folder", "list_run", "open_capture"]

_HISTORY_FILES = frozenset(("history.json", "tensors.safetensors"))
_FIRST = micro_batch_name(0)
# lens_core.summarize's convention for keys of gradient summaries saved beside a history.
_GRAD_PREFIX = "grad/"
_KINDS = ("activations", "gradients", "parameter_gradients")
_WHAT_TO_PASS = (
    "pass a step folder (RUN_DIR/step_000100) or a history folder (RUN_DIR/step_000100/micro_batch_0); "
    "`lens list RUN_DIR` lists the captures of a run"
)


class CliError(Exception):
    """A path the command cannot use; the message names it and says what to do instead."""


@dataclass(frozen=True, slots=True)
class Statistics:
    """The statistics known for one capture, each keyed by what it describes."""

    activations: dict[str, TensorSummary]
    """Layer label -> statistics of the layer's output."""
    gradients: dict[str, TensorSummary]
    """Layer label -> statistics of the gradient of the loss with respect to that output."""
    parameter_gradients: dict[str, TensorSummary]
    """Parameter name -> statistics of its ``.grad`` (recorded in step folders only)."""
    source: str
    """Where they were read from, in words: pooled and per-micro-batch numbers differ."""


@dataclass(frozen=True, slots=True)
class CaptureView:
    """One capture as the command shows it: a history and the statistics that go with it."""

    path: Path
    """The folder the user named (a step folder or a history folder)."""
    history_path: Path
    """The history folder read (``micro_batch_0`` of a step folder)."""
    history: ModelHistory
    statistics: Statistics
    step: int | None
    stage: str | None
    rank: int | None
    micro_batches: int

    def describe(self) -> str:
        """``step 2, stage train, rank 0, 2 micro-batches``: what tells two captures apart."""
        facts = [f"{name} {value}" for name, value in
                 (("step", self.step), ("stage", self.stage), ("rank", self.rank)) if value is not None]
        plural = "" if self.micro_batches == 1 else "es"
        return ", ".join([*facts, f"{self.micro_batches} micro-batch{plural}"])


@dataclass(frozen=True, slots=True)
class RunEntry:
    """One step folder of a run, as ``lens list`` shows it."""

    path: Path
    step: int
    stage: str
    rank: int | None
    """From the ``rank_<k>`` folder, else from the capture; None if neither says."""
    micro_batches: int
    layers: int | None
    """Ops recorded in ``micro_batch_0`` (None if it cannot be read)."""
    selected: int | None
    """Layers selected for saving (``layers=``) in ``micro_batch_0``."""
    size: int
    """Bytes of every file under the folder."""
    problems: tuple[str, ...]
    """Why the capture cannot be read completely; empty for a complete one."""


# -- one capture ------------------------------------------------------------------------------


def history_folder(path: Path) -> Path:
    """The history folder of a capture: ``path`` itself, or ``micro_batch_0`` of a step folder.

    For what needs the history only (a graph): a step's ``summaries.json`` is not read.

    Raises:
        CliError: as :func:`open_capture`.
    """
    return path if _kind(path) == "history" else _first_micro_batch(path)


def open_capture(path: Path) -> CaptureView:
    """Reads the capture at ``path``: a step folder or a history folder.

    Raises:
        CliError: ``path`` is missing, not a capture, or a step folder left half-written.
        CaptureFormatError: the history is damaged or of another format version.
    """
    if _kind(path) == "history":
        return _open_history(path)
    return _open_step(path)


def _kind(path: Path) -> Literal["history", "step"]:
    """What ``path`` is meant to be, judged by its files first and its name second, so that a
    damaged capture is still recognised (and its damage reported) rather than called foreign."""
    if not path.exists():
        raise CliError(f"{path} does not exist; {_WHAT_TO_PASS}.")
    if not path.is_dir():
        if path.name in _HISTORY_FILES | {STEP_SUMMARIES}:
            raise CliError(f"{path} is a file of a capture; pass the folder that holds it: {path.parent}")
        raise CliError(f"{path} is a file, not a capture folder; {_WHAT_TO_PASS}.")
    names = {entry.name for entry in path.iterdir()}
    if names & _HISTORY_FILES or micro_batch_index(path.name) is not None or is_unfinished(path.name):
        return "history"  # a damaged or unfinished one included: store.load says what is wrong
    if STEP_SUMMARIES in names or is_step_name(path.name) or any(map(_is_micro_batch, names)):
        return "step"
    steps = step_folders(path)
    if steps:
        plural = "" if len(steps) == 1 else "s"
        raise CliError(
            f"{path} is a run folder holding {len(steps)} captured step{plural}, not one capture; pass "
            f"one of them, e.g. {steps[0].path} (`lens list {path}` lists them all)."
        )
    raise CliError(f"{path} is not a capture (no history.json, summaries.json or micro_batch_0/); "
                   f"{_WHAT_TO_PASS}.{_run_hint(path)}")


def _is_micro_batch(name: str) -> bool:
    """A finished micro-batch folder, or the hidden folder of one being saved."""
    return micro_batch_index(name) is not None or is_unfinished_micro_batch(name)


def _open_history(path: Path) -> CaptureView:
    history = store.load(path)
    extra = store.load_extra(path)
    return CaptureView(
        path=path, history_path=path, history=history,
        statistics=_history_statistics(history, store.load_summaries(path)),
        step=_int(extra.get("step")), stage=_str(extra.get("stage")), rank=_int(extra.get("rank")),
        micro_batches=1,
    )


def _history_statistics(history: ModelHistory, saved: dict[str, TensorSummary]) -> Statistics:
    """Saved summaries where there are some; the rest computed from the saved tensors.

    A history saved with tensors but without summaries (``lens_core.save`` by default) still
    gets its statistics shown; the source line says which numbers are which. Tensors are read
    one at a time and dropped once summarised, so memory holds one tensor, not the whole file.
    """
    activations = {name: s for name, s in saved.items() if not name.startswith(_GRAD_PREFIX)}
    gradients = {name.removeprefix(_GRAD_PREFIX): s for name, s in saved.items()
                 if name.startswith(_GRAD_PREFIX)}
    outputs: dict[str, TensorSummary] = {}
    grads: dict[str, TensorSummary] = {}
    for layer in history.layer_list:
        value = _read_output(layer) if layer.label not in activations else None
        if value is not None:
            outputs.update(summarize({layer.label: value}))
        gradient = _read_gradient(layer) if layer.label not in gradients else None
        if gradient is not None:
            grads.update(summarize({layer.label: gradient}))
    sources = [f"{what} {source}" for what, source in
               (("outputs", _source(activations, outputs)), ("gradients", _source(gradients, grads)))
               if source]
    return Statistics(
        activations={**activations, **outputs}, gradients={**gradients, **grads},
        parameter_gradients={},
        source="; ".join(sources) or "none (saved without summaries or tensors)",
    )


def _read_output(layer: Layer) -> torch.Tensor | None:
    """The layer's saved output, read from disk without being kept in the layer."""
    source = layer.tensor_source
    return source() if source is not None else layer.saved_tensor


def _read_gradient(layer: Layer) -> torch.Tensor | None:
    """The layer's gradient, dropped from the layer again: the command needs its statistics only."""
    slot = layer.gradient_slot
    if slot is None:
        return None
    gradient = slot.value
    slot.value = None
    return gradient


def _source(saved: dict[str, TensorSummary], computed: dict[str, TensorSummary]) -> str | None:
    """Where the statistics of one kind came from, for the reader."""
    places = [place for place, used in (("from summaries.json", saved),
                                        ("computed from tensors.safetensors", computed)) if used]
    return " and ".join(places) or None


def _first_micro_batch(step: Path) -> Path:
    """``micro_batch_0`` of a step folder, whose history stands for the step's graph and layers."""
    first = step / _FIRST
    if first.is_symlink():
        raise CliError(f"{first} is a symbolic link, which lens does not follow (a capture from elsewhere "
                       "could lead it anywhere); replace it by a copy of the folder, if you trust it.")
    if not first.is_dir():
        unfinished = sorted(entry.name for entry in step.iterdir()
                            if is_unfinished(entry.name) and _FIRST in entry.name)
        what = (f"{_FIRST}/ was never finished ({unfinished[0]} is its interrupted save)" if unfinished
                else f"it has no {_FIRST}/")
        raise CliError(_half_written(step, what, "capture that step again"))
    return first


def _open_step(path: Path) -> CaptureView:
    history = store.load(_first_micro_batch(path))
    document = _step_document(path)
    summaries = {kind: _step_summaries(path, document, kind) for kind in _KINDS}
    micro_batches = len(micro_batch_folders(path))
    plural = "" if micro_batches == 1 else "es"
    return CaptureView(
        path=path, history_path=path / _FIRST, history=history,
        statistics=Statistics(
            **summaries, source=f"summaries.json of the step, pooled over {micro_batches} micro-batch{plural}"
        ),
        step=_int(document.get("step")), stage=_str(document.get("stage")), rank=_int(document.get("rank")),
        micro_batches=micro_batches,
    )


def _half_written(path: Path, what: str, fix: str) -> str:
    return (f"{path} is a half-written step folder: {what}. The run stopped while writing this "
            f"step (or is writing it now); {fix}, or pick another step (`lens list {path.parent}`).")


def _step_document(path: Path) -> dict[str, Any]:
    """The step's ``summaries.json``, which DiskWriter writes last, once its histories are saved."""
    first = path / _FIRST
    try:
        document = read_step_summaries(path)
    except store.CaptureFormatError as error:
        raise CliError(f"{error} Inspect {first} for the history alone.") from None
    if document is None:
        raise CliError(_half_written(path, f"{STEP_SUMMARIES} is missing", f"inspect {first} for the "
                                     "history alone"))
    return document


def _step_summaries(path: Path, document: dict[str, Any], kind: str) -> dict[str, TensorSummary]:
    section = document.get(kind, {})
    try:
        if not isinstance(section, dict):
            raise ValueError(f"{kind!r} is {type(section).__name__}, not an object")
        return {str(name): TensorSummary.from_dict(data) for name, data in section.items()}
    except (AttributeError, ValueError) as error:
        raise CliError(f"{path / STEP_SUMMARIES} has damaged {kind} ({error}); inspect "
                       f"{path / _FIRST} for the history alone.") from None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


# -- a run ------------------------------------------------------------------------------------


def list_run(run_dir: Path) -> list[RunEntry]:
    """Every step folder of a run (also under ``rank_<k>/``), by step, stage and rank.

    A damaged step is listed with its problems rather than failing the listing: a run that
    is still writing, or stopped, has one.

    Raises:
        CliError: ``run_dir`` is missing, or holds no step folders.
    """
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is a file"
        raise CliError(f"{run_dir} {what}; pass the folder a DiskWriter wrote to (its log_dir).")
    folders = step_folders(run_dir)
    if not folders:
        raise CliError(_no_captures(run_dir))
    entries = [_entry(found) for found in folders]
    return sorted(entries, key=lambda e: (e.step, e.stage != "train", e.stage, e.rank or 0, str(e.path)))


def _no_captures(run_dir: Path) -> str:
    if (run_dir / _FIRST).is_dir() or (run_dir / "history.json").exists():
        return f"{run_dir} is one capture, not a run folder; `lens inspect {run_dir}` shows it."
    return f"{run_dir} holds no captures (no step_000100/ folders, nor rank_<k>/ ones).{_run_hint(run_dir)}"


def _run_hint(path: Path) -> str:
    """Points to a run folder one level down (a Lightning run keeps its captures in ``lens/``)."""
    below = [child for child in sorted(path.iterdir())
             if not child.is_symlink() and child.is_dir() and step_folders(child)]
    return f" Its subfolder {below[0]} is a run folder: `lens list {below[0]}`." if below else ""


def _entry(found: StepFolder) -> RunEntry:
    """The step as ``lens list`` shows it; whatever is wrong with it is one of its problems,
    so that one bad step does not stop the listing of the others."""
    folder, rank = found.path, found.rank
    problems = []
    try:
        names = {entry.name for entry in folder.iterdir()}
    except OSError as error:
        names = set()
        problems.append(f"it cannot be listed ({error.strerror})")
    layers = selected = None
    if _FIRST not in names:
        problems.append(f"it has no {_FIRST}/")
    elif (folder / _FIRST).is_symlink():
        problems.append(f"{_FIRST} is a symbolic link, which lens does not follow")
    else:
        try:
            history = store.load(folder / _FIRST)
            layers, selected = len(history), len(history.layer_labels)
            rank = _int(store.load_extra(folder / _FIRST).get("rank")) if rank is None else rank
        except store.CaptureFormatError as error:
            problems.append(str(error))
    if STEP_SUMMARIES not in names:
        problems.append(f"{STEP_SUMMARIES} is missing (the step was not finished)")
    problems += [f"unfinished write {name}" for name in sorted(names) if is_unfinished(name)]
    return RunEntry(
        path=folder, step=found.step, stage=found.stage, rank=rank,
        micro_batches=len(micro_batch_folders(folder)),
        layers=layers, selected=selected, size=_size(folder), problems=tuple(problems),
    )


def _size(folder: Path) -> int:
    """Bytes of the regular files under ``folder``; links are not followed (one could lead to ``/``)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(parent, name))
            except OSError:  # removed while listed
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total
