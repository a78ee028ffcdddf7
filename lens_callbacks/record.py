"""What one capture hands to the writers: the histories and their summaries at one step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lens_core import Layer, ModelHistory
from lens_core.summaries import TensorSummary, summarize

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


def _pooled(histories: Sequence[ModelHistory], gradients: bool) -> dict[str, torch.Tensor]:
    pooled: dict[str, list[torch.Tensor]] = {}
    for history in histories:
        for layer in history.saved_layers:
            value = layer.gradient if gradients else layer.tensor_contents
            if value is not None:
                pooled.setdefault(layer.label, []).append(value.detach())
    # one micro-batch: the tensor itself (a view of another layer's output is then summarised once)
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
) -> CaptureRecord:
    """Summarises the captured micro-batches (one device-to-host transfer per kind of value)."""
    used = {p.name for history in histories for layer in history.saved_layers for p in layer.params}
    values: dict[str, torch.Tensor] = {}
    for label, tensor in _pooled(histories, gradients=False).items():
        values[f"a/{label}"] = tensor
    for label, tensor in _pooled(histories, gradients=True).items():
        values[f"g/{label}"] = tensor
    if model is not None:
        for name, param in model.named_parameters():
            if name in used and param.grad is not None:
                values[f"p/{name}"] = param.grad.detach()
    summaries = summarize(values, bins=bins)  # all of them at once: one transfer to the host
    record = CaptureRecord(step=step, stage=stage, rank=rank, histories=histories)
    kinds = {"a": record.activations, "g": record.gradients, "p": record.parameter_gradients}
    for key, summary in summaries.items():
        kind, _, name = key.partition("/")
        kinds[kind][name] = summary
    return record
