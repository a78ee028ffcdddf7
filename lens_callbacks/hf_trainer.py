"""``LensTrainerCallback``: the Hugging Face ``transformers.Trainer`` face of :class:`Lens`.

It maps the Trainer's events onto the driver: arm when an optimizer step begins
(``on_step_begin``), close each micro-batch of a gradient-accumulation window and arm the next
(``on_substep_end``), write once the update has run (``on_optimizer_step``): the driver's
optimizer step post-hook has read the gradients the update used (accumulated, clipped,
unscaled), before ``zero_grad``. The Trainer's own ops (its loss scaling,
``accelerate``'s backward, NaN checks, logging) are not layers: they are framework code
(``lens_core.FRAMEWORK_PACKAGES``).
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
    from transformers import TrainerCallback
except ImportError as error:  # this module is imported on first use of LensTrainerCallback
    raise ImportError(
        'LensTrainerCallback needs transformers: pip install transformers '
        "(or drive a plain loop with lens_callbacks.Lens)."
    ) from error

__all__ = ["LensTrainerCallback"]


class LensTrainerCallback(TrainerCallback):
    """Captures every op of chosen training steps of a ``transformers.Trainer``.

    Example::

        trainer = Trainer(model, args, train_dataset=data,
                          callbacks=[LensTrainerCallback(layers="attn", every_n_steps=50)])

    Steps are optimizer steps (``state.global_step`` when the step begins); with
    ``gradient_accumulation_steps`` the window's micro-batches form one capture. Parameter
    gradients are recorded as the optimizer used them: accumulated, clipped (``max_grad_norm``)
    and unscaled; the record's ``grad_norm_before_clip`` is the norm of the gradients the
    backward passes left (the Trainer's logged ``grad_norm``, on one process; with several,
    this process's gradients before their all-reduce).

    Args:
        layers, every_n_steps, steps, when, bins, strict, framework, background,
            write_timeout, max_queued: as for :class:`Lens` (the queue is flushed at
            ``on_train_end``).
        writers: where captures go; by default a disk writer in ``<log_dir>/lens``, plus
            TensorBoard (``args.logging_dir``) and the active W&B run when ``report_to``
            names them. ``[]``: nowhere.
        log_dir: root of the default disk writer (default: ``args.output_dir``).
        save_tensors: also save full tensors to disk.
        ranks: ``"zero"`` captures on the main process only, ``"all"`` on every process
            (per-rank folders).

    The Trainer has no event for an exception inside a step: if training fails during a
    captured step, call ``callback.lens.abort()`` in your ``except`` to remove the capture.

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
        writers: Iterable[Writer] | None = None,
        log_dir: str | Path | None = None,
        save_tensors: bool = False,
        bins: int = 64,
        ranks: Literal["zero", "all"] = "zero",
        strict: bool = False,
        framework: FrameworkSpec = FRAMEWORK_PACKAGES,
        background: bool = False,
        write_timeout: float | None = 60.0,
        max_queued: int = 2,
    ) -> None:
        # Everything is checked here, not at on_train_begin: a bad argument fails before training.
        _checks.check_layers(layers)
        Schedule.build(every_n_steps, steps, when, "train")
        self._options: dict[str, Any] = {
            "layers": layers, "every_n_steps": every_n_steps, "steps": steps, "when": when,
            "bins": check_bins(bins), "strict": _checks.check_bool("strict", strict),
            "framework": caller_filter(framework),
            "background": _checks.check_bool("background", background),
            "write_timeout": _checks.check_timeout("write_timeout", write_timeout),
            "max_queued": _checks.check_positive_int("max_queued", max_queued),
        }
        self._writers = _checks.check_writers(writers)
        self._log_dir = _checks.check_path("log_dir", log_dir, optional=True)
        self._save_tensors = _checks.check_bool("save_tensors", save_tensors)
        self._ranks = _checks.check_ranks(ranks)
        self.lens: Lens | None = None
        self._owned: list[Writer] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("LensTrainerCallback needs the model: the Trainer passes it to on_train_begin.")
        writers = self._default_writers(args) if self._writers is None else self._writers
        self._owned = [] if self._writers is not None else writers  # the writers we built, we close
        self.lens = Lens(
            model, writers=writers, accumulate_grad_batches=args.gradient_accumulation_steps,
            **self._options,
        )
        self.lens.rank = args.process_index
        self.lens.enabled = self._ranks == "all" or state.is_world_process_zero

    def _default_writers(self, args: Any) -> list[Writer]:
        report_to = set(args.report_to or ())
        root = Path(self._log_dir or args.output_dir) / "lens"
        writers: list[Writer] = [
            DiskWriter(root, save_tensors=self._save_tensors, per_rank=self._ranks == "all")
        ]
        if "tensorboard" in report_to or "all" in report_to:
            writers.append(TensorBoardWriter(args.logging_dir))
        if "wandb" in report_to or "all" in report_to:
            import wandb  # noqa: PLC0415  # the Trainer's W&B callback has started its run by now

            if wandb.run is not None:
                writers.append(WandbWriter(wandb.run))
        return writers

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lens is not None:
            self.lens.begin_step(state.global_step)
            self.lens.arm(state.global_step)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a micro-batch of the window is done (forward and backward); the next one is part of
        # the same optimizer step
        if self.lens is not None:
            self.lens.end_micro_batch()
            self.lens.arm(state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lens is not None:  # the backward is done; clipping and the update are not layers
            self.lens.end_micro_batch()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lens is not None:  # the update has run: the step is complete
            self.lens.end_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lens is not None:
            self.lens.end_findings()
            self.lens.flush()
        for writer in self._owned:
            writer.close()
