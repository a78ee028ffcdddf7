"""Anomaly forensics: which op first produced a NaN or an infinity, and from what.

When a loss is not finite, the step is replayed under a capture that saves everything, from the
same parameters and the same RNG state, so the replay fails the same way; the first op in
execution order whose output is not finite is the culprit, and the report says what it read.
When the loss is finite but gradients are not, the replay also runs the backward pass (without
touching ``.grad``): the culprit is the op whose backward first produced a non-finite gradient.
The replay leaves the model, its buffers and the RNG exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lens_core._rng import get_rng_states, set_rng_states
from lens_core.capture.history import ModelHistory
from lens_core.capture.records import Layer
from lens_core.capture.session import Capture
from lens_core.errors import LensError
from lens_core.summaries import TensorSummary, summarize

__all__ = [
    "AnomalyError", "AnomalyReport", "explain", "explain_gradients", "first_nonfinite", "investigate",
]


@dataclass(frozen=True)
class ValueStats:
    """A few numbers that say what an op read: range, mean and how much of it was not finite."""

    name: str
    shape: tuple[int, ...]
    min: float
    max: float
    mean: float
    nan_count: int
    inf_count: int

    @classmethod
    def of(cls, name: str, shape: tuple[int, ...], summary: TensorSummary) -> ValueStats:
        return cls(
            name, shape, summary.min, summary.max, summary.mean, summary.nan_count, summary.inf_count
        )

    def __str__(self) -> str:
        bad = f", {self.nan_count} NaN, {self.inf_count} inf" if self.nan_count + self.inf_count else ""
        return f"{self.name} {self.shape}: min {self.min:.4g}, max {self.max:.4g}, mean {self.mean:.4g}{bad}"


@dataclass(frozen=True)
class AnomalyReport:
    """The first op whose output was not finite, where it is in the code, and what it read."""

    label: str
    func_name: str
    module: str | None
    file: str
    line: int
    code: str
    nan_count: int
    inf_count: int
    inputs: tuple[ValueStats, ...]
    params: tuple[ValueStats, ...]
    step: int | None = None
    gradient_of: str | None = None
    """For a backward report: the layer whose gradient the op's backward made non-finite."""

    @property
    def headline(self) -> str:
        """One line, e.g. ``log_1_5 (log) in head gave 4 NaN from linear_1_3, at model.py:48``."""
        where = f" in {self.module}" if self.module else ""
        counts = ((self.nan_count, "NaN"), (self.inf_count, "inf"))
        what = ", ".join(f"{n} {kind}" for n, kind in counts if n)
        if self.gradient_of is not None:
            return (f"the backward of {self.label} ({self.func_name}){where} gave {what} to the "
                    f"gradient of {self.gradient_of}, at {self.file}:{self.line}")
        sources = ", ".join(s.name for s in self.inputs) or "no layer input"
        where += f" gave {what} from {sources}"
        return f"{self.label} ({self.func_name}){where}, at {self.file}:{self.line}"

    def __str__(self) -> str:
        step = f"step {self.step}: " if self.step is not None else ""
        kind = "gradients" if self.gradient_of is not None else "values"
        lines = [f"Non-finite {kind} first appeared at {step}{self.headline}", f"    {self.code.strip()}"]
        lines += [f"  input  {stats}" for stats in self.inputs]
        lines += [f"  param  {stats}" for stats in self.params]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AnomalyError(LensError, FloatingPointError):
    """Training produced a non-finite loss; ``report`` says which op caused it."""

    def __init__(self, report: AnomalyReport | None, message: str) -> None:
        super().__init__(message)
        self.report = report


def first_nonfinite(history: ModelHistory) -> Layer | None:
    """The first saved floating-point output, in execution order, with a NaN or an infinity."""
    for layer in history:
        tensor = layer.tensor_contents
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return layer
    return None


def _nonfinite(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def explain(
    history: ModelHistory, model: nn.Module | None = None, step: int | None = None
) -> AnomalyReport | None:
    """Describes the first non-finite op of a history saved in full, or None if all is finite."""
    layer = first_nonfinite(history)
    if layer is None or layer.tensor_contents is None:
        return None
    return _report(history, layer, layer.tensor_contents, model, step, None)


def explain_gradients(
    history: ModelHistory, model: nn.Module | None = None, step: int | None = None
) -> AnomalyReport | None:
    """Describes the op whose backward first made a gradient non-finite, or None.

    The backward pass meets layers in reverse execution order; the last layer (in execution
    order) with a non-finite gradient is the first the backward broke, and the op that broke it
    is one of its consumers, whose own gradient was still finite.
    """
    broken = next((layer for layer in reversed(history.layer_list) if _nonfinite(layer.gradient)), None)
    if broken is None or broken.gradient is None:
        return None
    layers = {layer.label: layer for layer in history.layer_list}
    consumers = [layers[label] for label in broken.children if not _nonfinite(layers[label].gradient)]
    culprit = consumers[-1] if consumers else broken
    return _report(history, culprit, broken.gradient, model, step, broken.label)


def _report(
    history: ModelHistory,
    layer: Layer,
    bad: torch.Tensor,
    model: nn.Module | None,
    step: int | None,
    gradient_of: str | None,
) -> AnomalyReport:
    """The report on ``layer``, with the counts of ``bad`` and statistics of what it read."""
    values = {"bad/": bad.detach()}
    shapes = {"bad/": tuple(bad.shape)}
    # By label, not history[label]: a label may also be another layer's module address or short name.
    layers = {layer.label: layer for layer in history.layer_list}
    for parent in layer.parents:
        saved = layers[parent].tensor_contents
        if saved is not None and not saved.is_complex():
            values[f"in/{parent}"] = saved.detach()
            shapes[f"in/{parent}"] = layers[parent].shape
    if gradient_of is not None and layer.gradient is not None:  # what its backward started from
        values[f"in/grad of {layer.label}"] = layer.gradient
        shapes[f"in/grad of {layer.label}"] = layer.shape
    named = dict(model.named_parameters()) if model is not None else {}
    for info in layer.params:
        if info.name in named:
            values[f"param/{info.name}"] = named[info.name].detach()
            shapes[f"param/{info.name}"] = info.shape
    summaries = summarize(values)
    stats = {key: ValueStats.of(key.partition("/")[2], shapes[key], s) for key, s in summaries.items()}
    frame = next(reversed([f for f in layer.func_call_stack if "/torch/" not in f.call_fname]), None)
    frame = frame or (layer.func_call_stack[-1] if layer.func_call_stack else None)
    return AnomalyReport(
        label=layer.label,
        func_name=layer.func_name,
        module=layer.module,
        file=frame.call_fname if frame else "?",
        line=frame.call_linenum if frame else 0,
        code=frame.code_line if frame else "",
        nan_count=stats["bad/"].nan_count,
        inf_count=stats["bad/"].inf_count,
        inputs=tuple(v for k, v in stats.items() if k.startswith("in/")),
        params=tuple(v for k, v in stats.items() if k.startswith("param/")),
        step=step,
        gradient_of=gradient_of,
    )


def investigate(
    model: nn.Module,
    run: Callable[[], Any],
    rng_states: dict[str, torch.Tensor] | None = None,
    step: int | None = None,
    gradients: bool = False,
) -> AnomalyReport | None:
    """Replays ``run`` (the forward and loss of a failed step) under a full capture, and explains.

    Args:
        model: the model, whose module and parameter names the report uses.
        run: recomputes the step's loss from the same batch.
        rng_states: the RNG states at the start of the failed step (``get_rng_states()`` then),
            so random ops (dropout) draw what they drew; None replays from the current state.
        step: the step, for the report.
        gradients: also run the backward pass of the replayed loss and, if no output was
            non-finite, report the op whose backward first made a gradient non-finite. The
            backward goes to the recorded outputs only: parameters' ``.grad`` is not touched.

    Nothing the replay touches survives it: the RNG states are put back, the replay updates
    copies of the buffers (BatchNorm statistics) instead of the buffers themselves, and
    parameters and their gradients are not touched (no backward). The failed step's own
    autograd graph stays usable: nothing it saved is written to.
    """
    rng_after = get_rng_states()
    originals = [(module, name, buffer) for module in model.modules()
                 for name, buffer in module._buffers.items() if buffer is not None]
    for module, name, buffer in originals:
        module._buffers[name] = buffer.detach().clone()
    try:
        if rng_states is not None:
            set_rng_states(rng_states)
        cap = Capture(model, "all", gradients=gradients)
        with torch.set_grad_enabled(gradients):
            cap.start()
            try:
                loss = run()
            except Exception:  # a replay that raises has still recorded the ops before it
                cap.stop(strict=False)
                loss = None
            else:
                cap.stop()
            report = explain(cap.history, model, step)
            if report is None and gradients and isinstance(loss, torch.Tensor) and loss.requires_grad:
                outputs = [t for t in (layer.tensor_contents for layer in cap.history)
                           if t is not None and t.requires_grad]
                torch.autograd.grad(loss.sum(), outputs, allow_unused=True)  # fills layer.gradient
                report = explain_gradients(cap.history, model, step)
        return report
    finally:
        for module, name, buffer in originals:
            module._buffers[name] = buffer
        set_rng_states(rng_after)
