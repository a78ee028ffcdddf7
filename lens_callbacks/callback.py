"""``LensCallback``: the Lightning face of :class:`~lens_callbacks.lens.Lens`.

It only maps Lightning's hooks onto the driver: arm when a batch starts, stop recording when
the loss exists (the backward then fills in gradients; under manual optimization, at the end of
``training_step``), note the gradient norm before Lightning clips, write when the batch that
stepped the optimizer ends (the update has read the gradients it used), tear down on
exceptions. Lightning 2.x (``lightning.pytorch``).

Under automatic optimization Lightning runs the forward, the backward,
``on_before_optimizer_step`` and the clipping inside ``optimizer.step`` (its closure): the
gradients the update used exist only after that call, which is why they are read by the
driver's optimizer step post-hook, not in ``on_before_optimizer_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from lens_callbacks import _checks
from lens_callbacks.lens import Lens
from lens_callbacks.schedule import Schedule
from lens_callbacks.writers import DiskWriter, TensorBoardWriter, WandbWriter, Writer
from lens_core.capture.callers import FRAMEWORK_PACKAGES, FrameworkSpec, caller_filter
from lens_core.capture.selection import LayerSpec
from lens_core.summaries import check_bins

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as error:  # this module is imported on first use of LensCallback
    raise ImportError(
        'LensCallback needs Lightning: pip install "lens-callbacks[lightning]" '
        "(or drive a plain loop with lens_callbacks.Lens)."
    ) from error

__all__ = ["LensCallback"]


class LensCallback(Callback):
    """Captures every op of chosen training steps: activations, their gradients, the graph.

    Example::

        trainer = Trainer(callbacks=[LensCallback(layers="conv", every_n_steps=100)])

    The capture is the training step that really runs (no extra forward pass). Steps are
    optimizer steps (``trainer.global_step`` when the batch starts); with gradient
    accumulation the whole window is one capture. Parameter gradients are those the update
    used: unscaled, all-reduced and clipped (``gradient_clip_val``); the record also has the
    total norm before clipping and the clip coefficient. Under manual optimization the capture
    is the whole ``training_step``: every forward and backward of it (a GAN's generator and
    discriminator phases), and each optimizer's parameter gradients at its own ``step()``.

    Args:
        layers: which ops to keep (a ``lens_core`` selection: ``"all"``, ``"conv"``, module
            addresses, labels, a predicate ...).
        every_n_steps, steps, when, stages: when to capture (see :class:`Schedule`); by
            default every 100th training step. Validation, test and predict capture the first
            batch of a due step when their stage is listed; the sanity check only when
            ``"sanity_check"`` is.
        writers: where captures go; by default a disk writer in ``<log_dir>/lens`` (plus one
            per TensorBoard or W&B logger of the trainer). ``[]``: nowhere.
        log_dir: root of the default disk writer (default: the trainer's ``log_dir``).
        save_tensors: also save full tensors to disk.
        bins: histogram bins.
        ranks: ``"zero"`` captures on global rank 0 only, ``"all"`` on every rank (per-rank
            folders).
        strict: let writer errors stop training (every writer still gets every record
            first).
        background, write_timeout, max_queued: write off the training thread, and report
            slow writers (see :class:`Lens`); the queue is flushed at ``teardown`` (the end
            of ``fit``, ``validate``, ``test`` ...) and when training fails.
        findings: run the training-health rules on every captured training step (see
            :class:`Lens`); False: none.
        on_anomaly: when a training loss is NaN or infinite, replay the step under a full
            capture (same batch, parameters and RNG state; training is not changed) and report
            the first op that produced a non-finite value, to the console and the writers; then
            ``"raise"`` (stop training), ``"skip"`` (drop the step's gradients so the optimizer
            leaves the parameters alone) or ``"continue"``. None (default) checks nothing.
        check_gradients: with ``on_anomaly``, also check the parameters' gradients after each
            backward, and report the op whose backward made them non-finite.
        framework: packages whose ops are not layers: by default Lightning's own (logging,
            the loss closure), ``torch.optim``, ``torch.distributed`` and the rest of
            ``lens_core.FRAMEWORK_PACKAGES``; or a predicate on module names.

    Raises:
        ValueError / TypeError: a bad argument, named with the fix.
    """

    def __init__(
        self,
        layers: LayerSpec = "all",
        *,
        every_n_steps: int | None = None,
        steps: Iterable[int] | None = None,
        when: Callable[[int, float | None], bool] | None = None,
        stages: Iterable[str] | str = ("train",),
        writers: Iterable[Writer] | None = None,
        log_dir: str | Path | None = None,
        save_tensors: bool = False,
        bins: int = 64,
        ranks: Literal["zero", "all"] = "zero",
        strict: bool = False,
        on_anomaly: Literal["raise", "skip", "continue"] | None = None,
        check_gradients: bool = False,
        framework: FrameworkSpec = FRAMEWORK_PACKAGES,
        background: bool = False,
        write_timeout: float | None = 60.0,
        max_queued: int = 2,
        findings: bool = True,
    ) -> None:
        super().__init__()
        # Everything is checked here, not in setup: a bad argument fails before fit starts.
        _checks.check_layers(layers)
        self._schedule = Schedule.build(every_n_steps, steps, when, stages)
        self._options: dict[str, Any] = {
            "layers": layers, "every_n_steps": every_n_steps, "steps": steps, "when": when,
            "stages": stages, "save_tensors": _checks.check_bool("save_tensors", save_tensors),
            "bins": check_bins(bins), "strict": _checks.check_bool("strict", strict),
            "on_anomaly": on_anomaly, "check_gradients": check_gradients,
            "framework": caller_filter(framework),
            "background": _checks.check_bool("background", background),
            "write_timeout": _checks.check_timeout("write_timeout", write_timeout),
            "max_queued": _checks.check_positive_int("max_queued", max_queued),
            "findings": _checks.check_bool("findings", findings),
        }
        _checks.check_anomaly_options(on_anomaly, check_gradients)
        self._writers = _checks.check_writers(writers)
        log_dir = _checks.check_path("log_dir", log_dir, optional=True)
        _checks.check_ranks(ranks)
        self.writers: list[Writer] = []
        """The writers in use (known from ``setup`` on)."""
        self._log_dir = log_dir
        self._ranks = ranks
        self._last_step: int | None = None
        self._batch: tuple[Any, int] | None = None  # kept for anomaly replays only
        self._skip_step = False
        self._manual = False  # manual optimization: the whole training_step is recorded
        self._stepped = False  # the batch ends a window: the optimizer has stepped by its end
        self.lens: Lens | None = None

    @property
    def state_key(self) -> str:
        return str(self._generate_state_key(
            layers=repr(self._options["layers"]), every_n_steps=self._options["every_n_steps"],
            steps=sorted(self._schedule.steps or ()), stages=sorted(self._schedule.stages),
        ))

    # -- set-up and tear-down --------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.lens is not None:
            return
        options = dict(self._options)
        save_tensors = options.pop("save_tensors")
        chosen = self._writers  # [] is a choice too: no writer
        self.writers = self._default_writers(trainer, save_tensors) if chosen is None else chosen
        self.lens = Lens(
            pl_module,
            writers=self.writers,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            **options,
        )
        # manual optimization may run several backward passes through the same outputs
        self._manual = not getattr(pl_module, "automatic_optimization", True)
        self.lens.summarize_as_made &= not self._manual
        self.lens.rank = trainer.global_rank
        self.lens.enabled = self._ranks == "all" or trainer.global_rank == 0
        self.lens.last_step = self._last_step

    def _default_writers(self, trainer: Any, save_tensors: bool) -> list[Writer]:
        """Disk, plus a writer for each of the trainer's TensorBoard and W&B loggers."""
        root = Path(self._log_dir or trainer.log_dir or trainer.default_root_dir) / "lens"
        writers: list[Writer] = [DiskWriter(root, save_tensors=save_tensors, per_rank=self._ranks == "all")]
        unserved = []
        for logger in trainer.loggers:
            try:
                writer = TensorBoardWriter.from_logger(logger) or WandbWriter.from_logger(logger)
            except ImportError as error:  # e.g. a TensorBoardLogger running on tensorboardX only
                rank_zero_warn(f"LensCallback cannot write to {type(logger).__name__}: {error}")
                writer = None
            if writer is None:
                unserved.append(type(logger).__name__)
            else:
                writers.append(writer)
        if unserved and trainer.global_rank == 0:
            rank_zero_warn(
                f"LensCallback has no writer for the trainer's loggers ({', '.join(unserved)}); "
                f"captures go to {root} and the other writers. Pass writers=[...] to choose."
            )
        return writers

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Flush, not close: the same writers serve a later stage (fit, then test); each write
        # is complete when flush returns, and writers you built yourself are yours to close.
        if self.lens is not None:
            if stage == "fit":
                self.lens.end_findings()
            self.lens.flush()
            self._last_step = self.lens.last_step

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.lens is not None:
            self.lens.abort()
            self.lens.flush(raise_errors=False)  # the steps before the failure, queued ones too
        self._stepped = False

    def state_dict(self) -> dict[str, Any]:
        last = self.lens.last_step if self.lens is not None else self._last_step
        return {"last_step": last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        if self.lens is not None:
            self.lens.last_step = self._last_step

    # -- training ----------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.lens is None:
            return
        self.lens.begin_step(trainer.global_step)
        if self.lens.on_anomaly is not None:
            self._batch = (batch, batch_idx)
        self._stepped = False
        self.lens.arm(trainer.global_step, "train")

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.lens is None:
            return
        if self.lens.capturing and not self._manual:
            self.lens.end_micro_batch()
        if self._batch is not None:
            batch, batch_idx = self._batch
            report = self.lens.check(loss, lambda: pl_module.training_step(batch, batch_idx))
            self._skip_step |= report is not None and self.lens.on_anomaly == "skip"

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self.lens is not None and self._batch is not None and self.lens.check_gradients_enabled:
            batch, batch_idx = self._batch
            report = self.lens.check_gradients(lambda: pl_module.training_step(batch, batch_idx))
            self._skip_step |= report is not None and self.lens.on_anomaly == "skip"

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Gradients here are accumulated, all-reduced and unscaled, and Lightning clips them
        # next; under manual optimization, training_step has clipped them already.
        if self.lens is not None and not self._manual:
            self.lens.before_clipping(p for group in optimizer.param_groups for p in group["params"])
        self._stepped = True
        if self._skip_step:  # torch optimizers leave parameters without a gradient alone
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            self._skip_step = False

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.lens is None:
            return
        self.lens.end_micro_batch()  # a step without backward, or manual optimization
        if self._stepped or self._manual:  # the update has run: the step is complete
            self.lens.end_step()
        self._stepped = False
        if self._schedule.when is not None:  # the only reason to read the loss: it syncs
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.lens.previous_loss = None if loss is None else float(loss)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.lens is not None:
            self.lens.end_step()

    # -- evaluation stages -----------------------------------------------------------------------

    def _eval_start(self, trainer: Any, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        if self.lens is not None and batch_idx == 0 and dataloader_idx == 0:
            self.lens.arm(trainer.global_step, "sanity_check" if trainer.sanity_checking else stage)

    def _eval_end(self) -> None:
        if self.lens is not None and self.lens.capturing:
            self.lens.end_step()

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_start(trainer, "validate", batch_idx, dataloader_idx)

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_end()

    def on_test_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_start(trainer, "test", batch_idx, dataloader_idx)

    def on_test_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_end()

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_start(trainer, "predict", batch_idx, dataloader_idx)

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_end()
