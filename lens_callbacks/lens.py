"""``Lens``: captures chosen steps of a training loop. The engine behind ``LensCallback``.

It decides *when* (the schedule) and *where* (the writers); the capture itself is lens_core's.
A step that is not captured costs one schedule check: no mode, no hook, no allocation.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lens_callbacks.record import CaptureRecord, build_record
from lens_callbacks.schedule import Schedule
from lens_callbacks.writers import DiskWriter, Writer
from lens_core import AnomalyError, AnomalyReport, Capture, ModelHistory, get_rng_states, investigate
from lens_core.capture.callers import FRAMEWORK_PACKAGES, FrameworkSpec, caller_filter
from lens_core.capture.selection import LayerSpec, Selection
from lens_core.summaries import Summaries, check_bins

__all__ = ["Lens"]


def check_anomaly_options(on_anomaly: object, check_gradients: object) -> None:
    """Validates ``on_anomaly`` and ``check_gradients`` (shared with ``LensCallback``)."""
    if on_anomaly not in (None, "raise", "skip", "continue"):
        raise ValueError(f"on_anomaly={on_anomaly!r}: use 'raise', 'skip', 'continue' or None.")
    if not isinstance(check_gradients, bool):
        raise TypeError(f"check_gradients={check_gradients!r}: use True or False.")
    if check_gradients and on_anomaly is None:
        raise ValueError("check_gradients=True needs on_anomaly='raise', 'skip' or 'continue'.")


@dataclass
class _Pending:
    """The micro-batches captured so far for one step."""

    step: int
    stage: str
    summaries: Summaries | None  # made as the capture runs (see Lens.summarize_as_made)
    histories: list[ModelHistory] = field(default_factory=list)


def _release(pending: _Pending) -> None:
    """Lets go of a step once written (or dropped): later backward passes reach none of its
    layers, and its summaries hold no tensor until the next captured step."""
    for history in pending.histories:
        for layer in history.layer_list:
            if layer.gradient_slot is not None:
                layer.gradient_slot.detach()
    if pending.summaries is not None:
        pending.summaries.clear()


class Lens:
    """Captures the real forward, loss and backward of chosen steps, for a hand-written loop::

        lens = Lens(model, layers="conv", every_n_steps=100, log_dir="runs/lens")
        for step, (x, y) in enumerate(loader):
            with lens.step(step):
                loss = criterion(model(x), y)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        lens.close()

    Put the backward inside the block: gradients of the captured outputs, and the parameter
    gradients the optimizer will use, are read when the block ends. With gradient accumulation
    over k micro-batches, enter ``lens.step(step)`` once per micro-batch with the same step and
    pass ``accumulate_grad_batches=k``: the k micro-batches form one capture.

    Args:
        model: the model being trained.
        layers: which ops to keep (``lens_core`` selection: ``"all"``, ``"conv"``,
            ``["features", "fc"]``, a predicate ...).
        every_n_steps, steps, when, stages: the :class:`Schedule`.
        writers: where captures go; by default a :class:`DiskWriter` in ``log_dir``.
        log_dir: folder of the default disk writer.
        save_tensors: also save full tensors to disk (default: summaries and metadata).
        bins: histogram bins of the summaries.
        grad_scaler: the ``torch.amp.GradScaler`` whose scaled loss is backpropagated, so that
            recorded gradients are unscaled.
        accumulate_grad_batches: micro-batches per optimizer step.
        strict: let a writer's error stop training (by default it is reported and training
            goes on).
        on_anomaly: check each loss handed to :meth:`check`; when it is NaN or infinite,
            replay the step under a full capture and report the first op that went non-finite
            (console, writers), then ``"raise"`` :class:`AnomalyError`, or return the report
            (``"skip"``: your loop skips the optimizer step; ``"continue"``). None: no check.
        check_gradients: also check the parameters' gradients after the backward
            (:meth:`check_gradients`, one more scalar check) and, when the loss was finite
            but they are not, report the op whose backward made them non-finite.
        framework: packages whose ops are not layers (default
            ``lens_core.FRAMEWORK_PACKAGES``: Lightning, ``torch.optim``,
            ``torch.distributed`` ...), or a predicate on module names (see
            ``lens_core.Capture``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "all",
        *,
        every_n_steps: int | None = None,
        steps: Iterable[int] | None = None,
        when: Callable[[int, float | None], bool] | None = None,
        stages: Iterable[str] | str = ("train",),
        writers: Iterable[Writer] | None = None,
        log_dir: str | Path = "lens_logs",
        save_tensors: bool = False,
        bins: int = 64,
        grad_scaler: Any = None,
        accumulate_grad_batches: int = 1,
        strict: bool = False,
        on_anomaly: Literal["raise", "skip", "continue"] | None = None,
        check_gradients: bool = False,
        framework: FrameworkSpec = FRAMEWORK_PACKAGES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        Selection(layers, (name for name, _ in model.named_modules()), "layers")  # fail early
        check_bins(bins)  # here, not at the first captured step
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches!r}: use an int >= 1.")
        self.model = model
        self.layers = layers
        self.schedule = Schedule.build(every_n_steps, steps, when, stages)
        self.writers: list[Writer] = (
            [DiskWriter(log_dir, save_tensors=save_tensors)] if writers is None else list(writers)
        )
        for writer in self.writers:
            if not isinstance(writer, Writer):
                raise TypeError(f"writers holds {writer!r}, which has no write(record) and close() methods.")
        check_anomaly_options(on_anomaly, check_gradients)
        self.on_anomaly = on_anomaly
        self.check_gradients_enabled = check_gradients
        self.bins = bins
        self.grad_scaler = grad_scaler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.strict = strict
        self.callers = caller_filter(framework)  # checked here, shared by every capture
        self.summarize_as_made = accumulate_grad_batches == 1 and not any(
            getattr(writer, "save_tensors", True) for writer in self.writers
        )
        """Summarise large CPU activations as they are made and their gradients as they arrive,
        keeping none of them (``lens_core.Summaries``), rather than all at the step's end: far
        less memory and time. Decided here: on when no writer needs full tensors
        (``save_tensors``) and each step is one micro-batch. Set it False for steps that run
        several backward passes through the same outputs, whose gradients then add up as
        ``.grad`` does. Its scratch buffers, sized to the largest tensor summarised at once,
        live as long as the ``Lens``."""
        self.rank = 0
        self.enabled = True
        self.last_step: int | None = None
        """Last training step written; earlier steps are not captured again (resuming)."""
        self.previous_loss: float | None = None
        self._capture: Capture | None = None
        self._pending: _Pending | None = None
        self._summaries: Summaries | None = None
        self._eager: contextlib.AbstractContextManager[Any] | None = None
        self._step: int | None = None  # the step running now, and the RNG at its start
        self._step_rng: dict[str, torch.Tensor] | None = None

    # -- the plain-loop interface ---------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, step: int, stage: str = "train") -> Iterator[Lens]:
        """Captures the block if ``step`` is due (see the class docstring)."""
        self.begin_step(step)
        if not self.arm(step, stage):
            yield self
            return
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.end_micro_batch()
        if self._pending is not None and len(self._pending.histories) >= self.accumulate_grad_batches:
            self.flush()

    def close(self) -> None:
        """Writes what is pending and closes the writers."""
        try:
            self.flush()
        finally:
            for writer in self.writers:
                writer.close()

    def check(self, loss: torch.Tensor, replay: Callable[[], Any]) -> AnomalyReport | None:
        """Checks a loss before its backward; explains it if it is not finite (``on_anomaly``).

        Args:
            loss: the step's loss (one scalar check: a device sync on GPU).
            replay: recomputes the loss from the same batch, e.g.
                ``lambda: criterion(model(x), y)``; run under a full capture only on failure.

        Raises:
            AnomalyError: with ``on_anomaly="raise"``, when the loss is not finite.
        """
        if self.on_anomaly is None or not self.enabled or bool(torch.isfinite(loss.detach()).all()):
            return None
        return self._anomaly(replay, gradients=False, what="the loss is not finite")

    def check_gradients(self, replay: Callable[[], Any]) -> AnomalyReport | None:
        """After the backward: explains non-finite parameter gradients (``check_gradients``).

        Args:
            replay: recomputes the loss from the same batch (see :meth:`check`).

        Raises:
            AnomalyError: with ``on_anomaly="raise"``, when a gradient is not finite.
        """
        if not (self.check_gradients_enabled and self.enabled):
            return None
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return None
        return self._anomaly(replay, gradients=True, what="parameter gradients are not finite")

    def _anomaly(self, replay: Callable[[], Any], gradients: bool, what: str) -> AnomalyReport | None:
        self.end_micro_batch()  # the replay needs the one capture a process can run
        report = investigate(self.model, replay, self._step_rng, step=self._step, gradients=gradients)
        message = str(report) if report is not None else (
            f"step {self._step}: {what}, but every op of the replay was finite: the non-finite "
            "value came from outside the ops recorded (the batch itself?)"
        )
        warnings.warn(f"lens_callbacks: {message}", RuntimeWarning, stacklevel=3)
        if report is not None:
            self._write_anomaly(report)
        if self.on_anomaly == "raise":
            raise AnomalyError(report, message)
        return report

    # -- the steps the integrations map their hooks to -------------------------------------------

    def begin_step(self, step: int) -> None:
        """Notes the step that starts (and, for anomaly replays, the RNG state it starts from)."""
        self._step = step
        if self.on_anomaly is not None:
            self._step_rng = get_rng_states()

    def due(self, step: int, stage: str = "train") -> bool:
        if not self.enabled or (stage == "train" and self.last_step is not None and step <= self.last_step):
            return False
        return self.schedule.due(step, stage, self.previous_loss)

    def arm(self, step: int, stage: str = "train") -> bool:
        """Starts capturing the next micro-batch if its step is due (or its step is pending)."""
        pending = self._pending
        # Summaries made as a micro-batch ran cannot pool with another's: a step armed again
        # (a hand-driven loop; Lightning moves on to the next step after every optimizer step)
        # is written as it is, and, being written, not captured again.
        if pending is not None and ((pending.step, pending.stage) != (step, stage)
                                    or (pending.summaries is not None and pending.histories)):
            self.flush()
            pending = None
        if pending is None and not self.due(step, stage):
            return False
        if self._pending is None:
            self._pending = _Pending(step, stage, self._streamed_summaries())
        self._eager = torch.compiler.set_stance("force_eager")  # compiled modules run eagerly
        self._eager.__enter__()
        try:
            self._capture = Capture(
                self.model, self.layers, gradients=True, grad_scaler=self.grad_scaler,
                summaries=self._pending.summaries, framework=self.callers,
            )
            self._capture.start()
        except BaseException:
            self._capture = None
            self._leave_eager()
            raise
        return True

    def _streamed_summaries(self) -> Summaries | None:
        """The summaries a capture makes as it runs, if it does; one object for every step, so
        that its scratch memory is mapped once, not at every step."""
        if not self.summarize_as_made:
            return None
        if self._summaries is None:
            self._summaries = Summaries(self.bins)
        self._summaries.clear()
        return self._summaries

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    def end_micro_batch(self) -> None:
        """Stops recording ops; the backward still fills in the gradients of what was saved."""
        capture, self._capture = self._capture, None
        if capture is None or self._pending is None:
            return
        try:
            self._pending.histories.append(capture.stop())
        finally:
            self._leave_eager()

    def flush(self) -> None:
        """Summarises the pending step and hands it to the writers."""
        self.end_micro_batch()
        pending, self._pending = self._pending, None
        if pending is None or not pending.histories:
            return
        try:
            record = build_record(
                pending.step, pending.stage, self.rank, pending.histories, self.model, self.bins,
                pending.summaries,
            )
            if pending.stage == "train":
                self.last_step = pending.step
            self._write(record)
        finally:
            _release(pending)

    def abort(self) -> None:
        """Tears a capture down after an error, keeping nothing of the failed step."""
        capture, self._capture = self._capture, None
        pending, self._pending = self._pending, None
        try:
            if capture is not None and capture.active:
                capture.stop(strict=False)
        finally:
            self._leave_eager()
            if pending is not None:
                _release(pending)

    def _leave_eager(self) -> None:
        eager, self._eager = self._eager, None
        if eager is not None:
            eager.__exit__(None, None, None)

    def _write(self, record: CaptureRecord) -> None:
        for writer in self.writers:
            self._guarded(writer, record.step, functools.partial(writer.write, record))

    def _write_anomaly(self, report: AnomalyReport) -> None:
        for writer in self.writers:
            write = getattr(writer, "write_anomaly", None)
            if write is not None:
                self._guarded(writer, report.step, functools.partial(write, report))

    def _guarded(self, writer: Writer, step: int | None, write: Callable[[], None]) -> None:
        try:
            write()
        except Exception as error:
            if self.strict:
                raise
            warnings.warn(
                f"lens_callbacks: {type(writer).__name__} failed to write step {step} "
                f"({type(error).__name__}: {error}); training goes on (strict=True stops it).",
                RuntimeWarning,
                stacklevel=3,
            )
