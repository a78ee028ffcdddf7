"""What one capture hands to the writers: the histories and their summaries at one step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from lens_core import Layer, ModelHistory
from lens_core.summaries import Summaries, TensorSummary

__all__ = ["CaptureRecord", "build_record"]


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
    """Parameter name -> statistics of its ``.grad`` as the optimizer sees it."""

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


def _pooled(histories: Sequence[ModelHistory], gradients: bool) -> dict[str, torch.Tensor]:
    pooled: dict[str, list[torch.Tensor]] = {}
    for layer in _selected(histories):
        value = layer.gradient if gradients else layer.tensor_contents
        if value is not None:
            pooled.setdefault(layer.label, []).append(value.detach())
    # one micro-batch: the tensor itself, no copy
    return {
        label: parts[0] if len(parts) == 1 else torch.cat([part.reshape(-1) for part in parts])
        for label, parts in pooled.items()
    }


def build_record(
    step: int,
    stage: str,
    rank: int,
    histories: list[ModelHistory],
    model: nn.Module | None,
    bins: int,
    streamed: Summaries | None = None,
) -> CaptureRecord:
    """Summarises the captured micro-batches (one device-to-host transfer per device).

    ``streamed``: the summaries the capture of the (one) micro-batch made as it ran, keyed
    ``(kind, layer index)`` (``lens_core.Capture``'s ``summaries``); what it kept whole is added
    to them here, so that the histogram edges of all are worked out in one go.
    """
    summaries = streamed if streamed is not None else Summaries(bins)
    for label, tensor in _pooled(histories, gradients=False).items():
        summaries.add(("activation", label), tensor)
    for label, tensor in _pooled(histories, gradients=True).items():
        summaries.add(("gradient", label), tensor)
    if model is not None:
        used = {p.name for layer in _selected(histories) for p in layer.params}
        for name, param in model.named_parameters():
            if name in used and param.grad is not None:
                summaries.add(("parameter", name), param.grad)
    record = CaptureRecord(step=step, stage=stage, rank=rank, histories=histories)
    kinds = {"activation": record.activations, "gradient": record.gradients,
             "parameter": record.parameter_gradients}
    found: dict[tuple[str, str], TensorSummary] = {}
    for key, summary in summaries.result().items():
        kind, what = cast(tuple[str, str | int], key)  # a layer's label, or its index when streamed
        found[kind, what if isinstance(what, str) else histories[0].layer_list[what].label] = summary
    position = {layer.label: i for history in histories for i, layer in enumerate(history.layer_list)}
    for (kind, name), summary in sorted(found.items(), key=lambda item: position.get(item[0][1], 0)):
        kinds[kind][name] = summary  # layers in the order they ran, parameters in the model's
    return record
