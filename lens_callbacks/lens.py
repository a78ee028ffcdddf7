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
from typing import Any, Literal, cast

import torch
from torch import nn

from lens_callbacks import _checks
from lens_callbacks._delivery import Call, Delivery, own_tensors
from lens_callbacks._updates import StepUpdates
from lens_callbacks.findings import Finding, FindingsTracker, log_findings
from lens_callbacks.record import CaptureRecord, UpdateGradients, build_record, used_parameters
from lens_callbacks.schedule import Schedule
from lens_callbacks.writers import DiskWriter, Writer
from lens_core import AnomalyError, AnomalyReport, Capture, ModelHistory, get_rng_states, investigate
from lens_core.capture.callers import FRAMEWORK_PACKAGES, FrameworkSpec, caller_filter
from lens_core.capture.selection import LayerSpec, Selection
from lens_core.summaries import Summaries, check_bins

__all__ = ["Lens"]


@dataclass
class _Pending:
    """The micro-batches captured so far for one step."""

    step: int
    stage: str
    summaries: Summaries | None  # made as the capture runs (see Lens.summarize_as_made)
    updates: StepUpdates | None = None  # training steps only
    histories: list[ModelHistory] = field(default_factory=list)


def _release(pending: _Pending) -> None:
    """Lets go of a step once written (or dropped): later backward passes reach none of its
    layers, its summaries hold no tensor until the next captured step, and the hooks reading
    its updates are gone."""
    if pending.updates is not None:
        pending.updates.remove()
    for history in pending.histories:
        for layer in history.layer_list:
            if layer.gradient_slot is not None:
                layer.gradient_slot.detach()
    if pending.summaries is not None:
        pending.summaries.clear()


class Lens:
    """Captures the real forward, loss, backward and update of chosen steps, for a hand-written loop::

        lens = Lens(model, layers="conv", every_n_steps=100, log_dir="runs/lens")
        for step, (x, y) in enumerate(loader):
            with lens.step(step):
                loss = criterion(model(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            optimizer.zero_grad()
        lens.close()

    The block is the training step: ops are recorded from its start to its end, the gradients
    of the recorded outputs as backward passes reach them, and, at each optimizer step inside
    it, the ``.grad`` of the model's parameters that optimizer holds, as that update used them
    (after clipping and unscaling). Any loop drives it so (Lightning Fabric's
    ``fabric.backward``, ``accelerate``'s ``accelerator.backward`` and clipping, several
    optimizers: a GAN's generator and discriminator phases). A block that runs no optimizer
    step (the optimizer steps after it) records the ``.grad`` the block ends with: what the
    optimizer will use unless the loop clips or scales between the two. The record also holds
    the total gradient norm of the update, the norm before clipping and their ratio
    (:class:`CaptureRecord`). With gradient accumulation over k micro-batches, enter
    ``lens.step(step)`` once per micro-batch with the same step and pass
    ``accumulate_grad_batches=k``: the k micro-batches form one capture (the optimizer step in
    the last block).

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
            goes on). Either way every writer gets every record: with ``strict=True`` the
            first error is raised once all have had it (with ``background``, at the next call
            of the lens on the training thread).
        background: write on a writer thread, so that training does not wait for the
            writers (off by default: writes then finish before the step's block ends).
            Records wait in a queue of ``max_queued``; :meth:`flush` and :meth:`close` wait
            until everything is written. What a record holds is the step's own: summaries
            are computed before it is queued, and saved tensors that share memory with the
            model's parameters, buffers or ``.grad`` (which the next steps update in place)
            are copied first. A tensor of the step that your loop itself changes in place
            after the step is written as it is at write time.
        write_timeout: seconds after which a write is reported with a warning naming the
            writer (a hung writer: with ``background``, while training goes on; otherwise
            once it returns). None: never.
        max_queued: with ``background``, captures waiting to be written at most; when a
            slow or hung writer lets more pile up, the oldest waiting one is dropped with a
            warning: training never waits for a writer, and queued records (which may hold
            tensors) take bounded memory.
        findings: run the training-health rules (``lens_callbacks.findings``) on every
            captured training step: new findings go to the console (rank 0) and to the writers
            that have ``write_findings``; silent when there are none. A ``FindingsTracker``
            chooses the rules (``FindingsTracker(measure_updates=True)`` also measures update
            ratios: it hooks the optimizer step after each capture, until :meth:`close`);
            False: none.
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
        background: bool = False,
        write_timeout: float | None = 60.0,
        max_queued: int = 2,
        findings: bool | FindingsTracker = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__}(...): use the torch.nn.Module being trained.")
        Selection(layers, (name for name, _ in model.named_modules()), "layers")  # fail early
        check_bins(bins)  # here, not at the first captured step
        accumulate_grad_batches = _checks.check_positive_int(
            "accumulate_grad_batches", accumulate_grad_batches
        )
        chosen = _checks.check_writers(writers)
        root = _checks.check_path("log_dir", log_dir)
        save_tensors = _checks.check_bool("save_tensors", save_tensors)
        strict = _checks.check_bool("strict", strict)
        background = _checks.check_bool("background", background)
        write_timeout = _checks.check_timeout("write_timeout", write_timeout)
        max_queued = _checks.check_positive_int("max_queued", max_queued)
        self.model = model
        self.layers = layers
        self.schedule = Schedule.build(every_n_steps, steps, when, stages)
        self.writers: list[Writer] = [DiskWriter(cast(Path, root), save_tensors=save_tensors)] \
            if chosen is None else chosen
        _checks.check_anomaly_options(on_anomaly, check_gradients)
        self.on_anomaly = on_anomaly
        self.check_gradients_enabled = check_gradients
        self.bins = bins
        self.grad_scaler = grad_scaler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.strict = strict
        self.background = background
        if not isinstance(findings, (bool, FindingsTracker)):
            raise TypeError(f"findings={findings!r}: use True, False or a FindingsTracker.")
        # Update ratios need a hook on the optimizer step after each capture, outside the
        # capture: only when asked for (FindingsTracker(measure_updates=True)), until close().
        self.findings: FindingsTracker | None = (
            FindingsTracker(measure_updates=False) if findings is True else findings or None
        )
        self._delivery = Delivery(
            strict=strict, background=background, write_timeout=write_timeout, max_queued=max_queued
        )
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
        """Last training step written; it and earlier steps are not captured again (resuming
        from a checkpoint repeats no capture); a lower step than it is warned about, once."""
        self._warned_backwards = False
        self.previous_loss: float | None = None
        self._capture: Capture | None = None
        self._pending: _Pending | None = None
        self._summaries: Summaries | None = None
        self._eager: contextlib.AbstractContextManager[Any] | None = None
        self._step: int | None = None  # the step running now, and the RNG at its start
        self._step_rng: dict[str, torch.Tensor] | None = None
        self._parameter_summaries: Summaries | None = None

    # -- the plain-loop interface ---------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, step: int, stage: str = "train") -> Iterator[Lens]:
        """Captures the block if ``step`` is due (see the class docstring).

        Args:
            step: the optimizer step, an int >= 0 (numpy integers too).
            stage: one of :data:`~lens_callbacks.schedule.STAGES`.

        Raises:
            ValueError / TypeError: a bad ``step`` or ``stage``.
        """
        step = _checks.check_step(step)
        stage = _checks.check_stage(stage)
        self.begin_step(step)
        if not self.arm(step, stage):
            yield self
            return
        try:
            yield self
            self.end_micro_batch()
            if self._pending is not None and len(self._pending.histories) >= self.accumulate_grad_batches:
                self.end_step()
        except BaseException:  # also a selection that matched nothing, or a strict writer's error
            self.abort()
            raise

    def close(self) -> None:
        """Writes what is pending, waits for the writers (``background``) and closes them."""
        try:
            try:
                self.end_step()
                self.end_findings()
            finally:
                self._delivery.close()
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
        """Notes the step that starts (and, for anomaly replays, the RNG state it starts from).

        Failures of background writes are reported here (raised with ``strict=True``)."""
        self._step = _checks.check_step(step)
        self._delivery.report()
        if self.on_anomaly is not None:
            self._step_rng = get_rng_states()

    def due(self, step: int, stage: str = "train") -> bool:
        if not self.enabled:
            return False
        if stage == "train" and self.last_step is not None and step <= self.last_step:
            if step < self.last_step and not self._warned_backwards:
                self._warned_backwards = True
                warnings.warn(
                    f"lens_callbacks: step {step} comes after step {self.last_step} was written: "
                    f"steps up to {self.last_step} are not captured again (so that resuming from a "
                    "checkpoint repeats no capture). Number steps from where training is, or make "
                    "a new Lens for a new run. Said once.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        return self.schedule.due(step, stage, self.previous_loss)

    def arm(self, step: int, stage: str = "train") -> bool:
        """Starts capturing the next micro-batch if its step is due (or its step is pending).

        Raises:
            ValueError / TypeError: a ``step`` that is no int >= 0, a ``stage`` not in
                :data:`~lens_callbacks.schedule.STAGES`.
        """
        step = _checks.check_step(step)
        stage = _checks.check_stage(stage)
        pending = self._pending
        # Summaries made as a micro-batch ran cannot pool with another's: a step armed again
        # (a hand-driven loop; Lightning moves on to the next step after every optimizer step)
        # is written as it is, and, being written, not captured again.
        if pending is not None and ((pending.step, pending.stage) != (step, stage)
                                    or (pending.summaries is not None and pending.histories)):
            self.end_step()
            pending = None
        if pending is None and not self.due(step, stage):
            return False
        if self._pending is None:
            self._pending = self._new_pending(step, stage)
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

    def _new_pending(self, step: int, stage: str) -> _Pending:
        pending = _Pending(step, stage, self._streamed_summaries())
        if stage == "train":
            if self._parameter_summaries is None:
                self._parameter_summaries = Summaries(self.bins)
            scale = 1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale())
            pending.updates = StepUpdates(
                self.model, self._parameter_summaries, scale, self._wanted_parameters
            )
            pending.updates.install()
        return pending

    def _wanted_parameters(self) -> set[str] | None:
        """The parameters whose gradients the record keeps: those of the selected layers, known
        once the step's recording has stopped (None before: all, sorted out when written)."""
        if self._capture is not None or self._pending is None:
            return None
        return used_parameters(self._pending.histories)

    def before_clipping(self, params: Iterable[torch.Tensor]) -> None:
        """Notes the gradient norm of ``params`` now as the step's norm before clipping.

        Call it between the last backward of a captured step and the clipping when the
        backward's own end is not that moment: gradients all-reduced (DDP) or unscaled (AMP)
        after it. ``LensCallback`` calls it in ``on_before_optimizer_step``. Otherwise the norm
        is that of the gradients as the step's backward passes left them.
        """
        if self._pending is not None and self._pending.updates is not None:
            self._pending.updates.note_before_clip(params)

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

    def flush(self, raise_errors: bool = True) -> None:
        """Writes the pending step and waits until the writers have every record.

        Args:
            raise_errors: False: writer errors are warned about even with ``strict=True``
                (while another error is being handled).

        Raises:
            Exception: with ``strict=True``, the first error of a writer.
        """
        self.end_step()
        self._delivery.flush(raise_errors)

    def end_step(self) -> None:
        """Summarises the pending step and hands it to the writers (with ``background``, to
        the queue of the writer thread)."""
        self.end_micro_batch()
        pending, self._pending = self._pending, None
        if pending is None or not pending.histories:
            return
        try:
            updates = pending.updates
            if updates is not None:
                updates.remove()  # what the loop does after this is not the step's
                if not updates.updates:  # the optimizer steps after the block: .grad as it is now
                    updates = None
            record = build_record(
                pending.step, pending.stage, self.rank, pending.histories, self.model, self.bins,
                pending.summaries,
                updates=None if updates is None else UpdateGradients(
                    updates.in_model_order(updates.summaries), updates.skipped, updates.norm(),
                    updates.norm_before_clip(),
                ),
            )
            if pending.stage == "train":
                self.last_step = pending.step
            if self.background:
                own_tensors(record, self.model)
            self._write(record)
            if self.findings is not None and pending.stage == "train":
                self._write_findings(self.findings.observe(record, self.model), record.step)
        finally:
            _release(pending)

    def end_findings(self) -> None:
        """Reports what the last capture's update ratios add and stops measuring them (the
        findings of a run end with its training)."""
        if self.findings is not None and self.last_step is not None:
            self._write_findings(self.findings.close(), self.last_step)

    def _write_findings(self, findings: list[Finding], step: int) -> None:
        if not findings:
            return
        if self.rank == 0:
            log_findings(findings)
        calls: list[Call] = [
            (writer, functools.partial(write, findings, step)) for writer in self.writers
            if (write := getattr(writer, "write_findings", None)) is not None
        ]
        self._delivery.deliver(step, calls)

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
        calls: list[Call] = [(writer, functools.partial(writer.write, record)) for writer in self.writers]
        self._delivery.deliver(record.step, calls)

    def _write_anomaly(self, report: AnomalyReport) -> None:
        calls: list[Call] = [
            (writer, functools.partial(write, report)) for writer in self.writers
            if (write := getattr(writer, "write_anomaly", None)) is not None
        ]
        self._delivery.deliver(report.step, calls)
        if self.on_anomaly == "raise":  # the report is written before the error stops training
            self._delivery.flush()
