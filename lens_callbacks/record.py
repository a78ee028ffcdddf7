"""What one capture hands to the writers: the histories and their summaries at one step."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from lens_core import Layer, ModelHistory
from lens_core.summaries import Summaries, TensorSummary, local_shard, storage_intact

__all__ = ["CaptureRecord", "UpdateGradients", "build_record", "used_parameters"]


@dataclass
class CaptureRecord:
    """One captured step.

    With gradient accumulation a step has several micro-batches: each keeps its own history
    (``histories``, in order), and the summaries pool the values of all of them, so a layer has
    one set of statistics per step whatever the accumulation.
    """

    step: int
    """The optimizer step the batch belongs to (``trainer.global_step`` when armed)."""
    stage: str
    rank: int
    histories: list[ModelHistory]
    activations: dict[str, TensorSummary] = field(default_factory=dict)
    """Label of each selected layer -> statistics and histogram of its output."""
    gradients: dict[str, TensorSummary] = field(default_factory=dict)
    """Label -> statistics of the gradient of the loss with respect to that output."""
    parameter_gradients: dict[str, TensorSummary] = field(default_factory=dict)
    """Parameter name -> statistics of its ``.grad`` as the optimizer update used it: read
    right after each optimizer step of the step (after clipping, unscaling and the all-reduce;
    before ``zero_grad``), for the parameters of the selected layers. Several optimizers (a
    GAN's) each give the parameters they hold, at their own step; a parameter updated twice
    (two optimizers sharing it) keeps its last update's. Empty when no optimizer step ran."""
    grad_norm: float | None = None
    """Total L2 norm of the gradients the step's updates used, over every parameter of the
    model they updated (not only those of the selected layers), each at its last update: the
    norm after clipping. None when no optimizer step ran. For a ``DTensor``, this rank's
    shards (as the summaries)."""
    grad_norm_before_clip: float | None = None
    """The same norm before clipping: in Lightning with automatic optimization, measured in
    ``on_before_optimizer_step`` (after the all-reduce and unscaling, before Lightning clips);
    elsewhere, that of the gradients as the step's backward passes left them (accumulated,
    divided by the grad scaler's scale, before the loop clips; on each process, before DDP's
    all-reduce). None when unknown."""
    clip_coefficient: float | None = None
    """``grad_norm / grad_norm_before_clip``: the factor clipping shrank the gradients by
    (1.0: not clipped; with clipping by norm, the coefficient ``clip_grad_norm_`` applied).
    None when either norm is unknown."""
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    """``(kind, name)`` -> why that tensor has no summary above (kind ``"activation"``,
    ``"gradient"`` or ``"parameter"``): its storage was freed or shrunk before it was read, as
    FSDP does with its all-gather buffers. Such a tensor is never read."""

    @property
    def history(self) -> ModelHistory:
        """The history of the (first) micro-batch."""
        return self.histories[0]

    def layer(self, label: str) -> Layer | None:
        """The layer called ``label`` in the first micro-batch that ran it.

        A layer may run in a later micro-batch only (data-dependent control flow), so all are
        searched; writers use it to group a summary under its module.
        """
        for history in self.histories:
            if label in history:
                return history[label]
        return None


def _selected(histories: Sequence[ModelHistory]) -> Iterator[Layer]:
    """The layers the capture kept or summarised as it ran."""
    for history in histories:
        for layer in history.layer_list:
            if layer.summarized or layer.has_saved_activations:
                yield layer


def _add_pooled(
    summaries: Summaries, histories: Sequence[ModelHistory], kind: str, skipped: dict[tuple[str, str], str]
) -> None:
    """Adds the outputs (or gradients) of each layer, the values of all micro-batches pooled."""
    pooled: dict[str, list[torch.Tensor]] = {}
    for layer in _selected(histories):
        value = layer.gradient if kind == "gradient" else layer.tensor_contents
        if value is not None:
            pooled.setdefault(layer.label, []).append(value.detach())
    for label, parts in pooled.items():
        if len(parts) == 1:  # one micro-batch: the tensor itself, no copy (checked when read)
            summaries.add((kind, label), parts[0])
            continue
        if not all(storage_intact(part) for part in parts):  # the pool would read freed memory
            skipped[kind, label] = "the storage of a micro-batch's tensor no longer holds it"
            continue
        # a DTensor's local shards, pooled: a DTensor's own reshape or cat may communicate
        shards = [local_shard(part) for part in parts]
        values = torch.cat([local.reshape(-1) for local, _ in shards])
        summaries.add((kind, label), values, shard=shards[0][1])


def used_parameters(histories: Sequence[ModelHistory]) -> set[str]:
    """Names of the parameters the selected layers used."""
    return {p.name for layer in _selected(histories) for p in layer.params}


@dataclass(frozen=True)
class UpdateGradients:
    """What the optimizer updates of a step used, read at each update (see ``Lens``)."""

    summaries: Mapping[str, TensorSummary]
    """Parameter name -> summary of its ``.grad`` at its last update, in the model's order (all
    parameters, or those of the selected layers: :func:`build_record` keeps the latter)."""
    skipped: Mapping[str, str]
    """Parameter name -> why its gradient could not be read (storage freed)."""
    grad_norm: float | None
    grad_norm_before_clip: float | None


def build_record(
    step: int,
    stage: str,
    rank: int,
    histories: list[ModelHistory],
    model: nn.Module | None,
    bins: int,
    streamed: Summaries | None = None,
    *,
    updates: UpdateGradients | None = None,
) -> CaptureRecord:
    """Summarises the captured micro-batches (one device-to-host transfer per device).

    ``streamed``: the summaries the capture of the (one) micro-batch made as it ran, keyed
    ``(kind, layer index)`` (``lens_core.Capture``'s ``summaries``); what it kept whole is added
    to them here, so that the histogram edges of all are worked out in one go.

    Parameter gradients: those of ``updates`` (read at the optimizer steps) when given, else
    the ``.grad`` of ``model``'s parameters as they are now (None: none).
    """
    summaries = streamed if streamed is not None else Summaries(bins)
    skipped: dict[tuple[str, str], str] = {}
    _add_pooled(summaries, histories, "activation", skipped)
    _add_pooled(summaries, histories, "gradient", skipped)
    used = used_parameters(histories)
    if model is not None and updates is None:
        for name, param in model.named_parameters():
            if name in used and param.grad is not None:
                summaries.add(("parameter", name), param.grad)
    record = CaptureRecord(step=step, stage=stage, rank=rank, histories=histories)
    if updates is not None:
        record.grad_norm, before = updates.grad_norm, updates.grad_norm_before_clip
        record.grad_norm_before_clip = before
        if record.grad_norm is not None and before is not None:
            record.clip_coefficient = record.grad_norm / before if before > 0 else 1.0
        record.parameter_gradients.update(
            (name, summary) for name, summary in updates.summaries.items() if name in used
        )
        skipped.update((("parameter", name), why) for name, why in updates.skipped.items() if name in used)
    kinds = {"activation": record.activations, "gradient": record.gradients,
             "parameter": record.parameter_gradients}

    def named(key: Hashable) -> tuple[str, str]:
        kind, what = cast(tuple[str, str | int], key)  # a layer's label, or its index when streamed
        return kind, what if isinstance(what, str) else histories[0].layer_list[what].label

    found = {named(key): summary for key, summary in summaries.result().items()}
    skipped.update((named(key), why) for key, why in summaries.skipped.items())
    position = {layer.label: i for history in histories for i, layer in enumerate(history.layer_list)}

    def order(item: tuple[tuple[str, str], object]) -> int:
        return position.get(item[0][1], 0)  # layers in the order they ran, parameters in the model's

    for (kind, name), summary in sorted(found.items(), key=order):
        kinds[kind][name] = summary
    record.skipped = dict(sorted(skipped.items(), key=order))
    if record.skipped:
        _warn_skipped(record)
    return record


# Tensors named in the warning of a step, at most (FSDP frees one buffer per parameter).
_NAMED = 10


def _warn_skipped(record: CaptureRecord) -> None:
    """One warning per step, naming the tensors that have no summary."""
    names = [f"{kind} of {name}" for kind, name in record.skipped]
    listed = ", ".join(names[:_NAMED]) + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")
    why = next(iter(record.skipped.values()))
    warnings.warn(
        f"lens_callbacks: step {record.step}: no summary of {len(names)} tensor(s) whose storage "
        f"was freed or shrunk before they were summarised, so never read: {listed} (the first: "
        f"{why}). FSDP frees its all-gather buffers so. The rest of the step is written; "
        "CaptureRecord.skipped lists them all.",
        RuntimeWarning,
        stacklevel=2,
    )
