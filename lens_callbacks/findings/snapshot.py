"""What the rules read: the summaries of one captured step, and the facts of its layers.

A :class:`StepSummaries` holds no tensor and no history, only statistics and a few facts per
layer (its type, dtype, shape, whether it has parameters, what consumes it), so a tracker can
keep the captures of a long run cheaply. It is made from a :class:`CaptureRecord` as training
runs (:meth:`StepSummaries.from_record`) or from a run folder on disk (:func:`load_run`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lens_callbacks.record import CaptureRecord
from lens_core import ModelHistory, store
from lens_core.store.folders import STEP_SUMMARIES, StepFolder, read_step_summaries, step_folders
from lens_core.summaries import TensorSummary

__all__ = ["LayerFacts", "StepSummaries", "load_run"]


@dataclass(frozen=True, slots=True)
class LayerFacts:
    """What a rule needs to know of a layer besides its statistics."""

    label: str
    index: int
    """Position in execution order."""
    layer_type: str
    """``relu``, ``sigmoid``, ``softmax``, ``linear`` ..."""
    module: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    has_params: bool
    """Whether the op used parameters (a ``linear``, a ``conv2d``): the layers whose gradient
    flow is compared across depth."""
    children: tuple[str, ...]
    """Labels of the layers that consumed the output."""


@dataclass(frozen=True, slots=True)
class StepSummaries:
    """The statistics of one captured training step (see the module docstring)."""

    step: int
    layers: Mapping[str, LayerFacts]
    """Label -> facts, in execution order."""
    activations: Mapping[str, TensorSummary]
    gradients: Mapping[str, TensorSummary]
    parameter_gradients: Mapping[str, TensorSummary]
    previous_step: int | None = None
    """The step of the capture before this one in the run (None for the first): what tells
    rules that compare consecutive captures which pairs are consecutive."""
    updates: dict[str, float] = field(default_factory=dict)
    """Parameter name -> ``|update| / |weight|`` of the optimizer step that followed the
    capture, when it was measured (training with a ``FindingsTracker`` given the model);
    filled in after the step, so it starts empty."""

    @classmethod
    def from_record(cls, record: CaptureRecord, previous_step: int | None = None) -> StepSummaries:
        """The summaries of ``record``, with the facts of its micro-batches' layers."""
        layers: dict[str, LayerFacts] = {}
        for history in record.histories:  # a layer may run in a later micro-batch only
            for label, facts in _facts(history).items():
                layers.setdefault(label, facts)
        return cls(record.step, layers, dict(record.activations), dict(record.gradients),
                   dict(record.parameter_gradients), previous_step)


def _facts(history: ModelHistory) -> dict[str, LayerFacts]:
    return {
        layer.label: LayerFacts(
            label=layer.label, index=layer.index, layer_type=layer.layer_type, module=layer.module,
            dtype=layer.dtype, shape=tuple(layer.shape), has_params=bool(layer.params),
            children=tuple(layer.children),
        )
        for layer in history.layer_list
    }


def load_run(run: str | os.PathLike[str], *, rank: int | None = None) -> list[StepSummaries]:
    """The captured training steps of a run folder a ``DiskWriter`` wrote, in step order.

    Each step's pooled ``summaries.json`` gives the statistics, the history of its first
    micro-batch the facts of the layers. Unfinished steps (no ``summaries.json`` yet: the run
    is still writing) are left out.

    Args:
        run: the run folder (``lens_core.store.step_folders`` lists what it holds).
        rank: which rank's steps, for a run written per rank (default: the lowest).

    Raises:
        ValueError: ``run`` holds no finished training step.
        lens_core.store.CaptureFormatError: a step folder is damaged.
    """
    found = [f for f in step_folders(run) if f.stage == "train" and (f.path / STEP_SUMMARIES).is_file()]
    ranks = sorted({-1 if f.rank is None else f.rank for f in found})
    wanted = (ranks[0] if ranks else -1) if rank is None else rank
    chosen = [f for f in found if (-1 if f.rank is None else f.rank) == wanted]
    if not chosen:
        raise ValueError(
            f"{run} holds no finished training step{'' if rank is None else f' of rank {rank}'}; pass "
            "the folder a DiskWriter wrote to (its step folders are named step_000100)."
        )
    return [_load_step(folder, None if i == 0 else chosen[i - 1].step) for i, folder in enumerate(chosen)]


def _load_step(found: StepFolder, previous_step: int | None) -> StepSummaries:
    # read as lens_core reads a capture: a regular file within limits (a run may come from anyone)
    document = read_step_summaries(found.path) or {}
    history = store.load(found.path, micro_batch=0)

    def summaries(kind: str) -> dict[str, TensorSummary]:
        return {name: TensorSummary.from_dict(data) for name, data in document.get(kind, {}).items()}

    return StepSummaries(found.step, _facts(history), summaries("activations"), summaries("gradients"),
                         summaries("parameter_gradients"), previous_step)
