"""Capturing a forward pass: the :class:`Capture` context manager and the one-call functions.

Layered like TransformerLens: :class:`Capture` records whatever runs while it is active (the
model, the loss, several calls); :func:`log_forward_pass` and :func:`get_model_metadata` run one
forward pass under a capture and return its :class:`ModelHistory`.
"""

from __future__ import annotations

import difflib
import gc
import sys
import threading
import warnings
from collections.abc import Mapping
from time import perf_counter
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import nn

from lens_core._rng import get_rng_states
from lens_core.capture.callers import FRAMEWORK_PACKAGES, FrameworkSpec, caller_filter
from lens_core.capture.history import ModelHistory
from lens_core.capture.recorder import Recorder, iter_tensors
from lens_core.capture.records import ModelIndex
from lens_core.capture.selection import LayerSpec, Selection
from lens_core.errors import CaptureError, LayerNotFoundError
from lens_core.graph.render import check_render_options
from lens_core.summaries import Summaries

__all__ = ["Capture", "capture", "get_model_metadata", "log_forward_pass"]

_active_lock = threading.Lock()
_active: Capture | None = None


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a plain function in an nn.Module whose forward calls it."
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}): its ops run inside the "
            "TorchScript interpreter, where no capture sees them. Capture the eager module "
            "(before torch.jit.script / torch.jit.trace)."
        )
    return model


def _warn_scripted(addresses: list[str]) -> None:
    if addresses:
        warnings.warn(
            f"lens_core: {', '.join(addresses[:5])} {'is a' if len(addresses) == 1 else 'are'} "
            "TorchScript module(s): their ops run where no capture sees them and appear as one "
            "output each at most. Capture the eager modules to see inside them.",
            RuntimeWarning,
            stacklevel=3,
        )


class Capture:
    """Records every tensor-producing torch op that runs while it is active.

    Use it when the forward pass is not a single call you can hand over: a training step with
    its loss, a model called several times, code between the calls::

        with lens_core.capture(model, layers="conv") as cap:
            loss = criterion(model(x), y)
        cap.history["conv2d_1_1"].tensor_contents

    Only one capture can be active in a process at a time. ``start()``/``stop()`` do the same
    as the ``with`` statement for code that cannot nest a block (training callbacks).

    Args:
        model: the module whose submodules and parameters name the ops. Ops outside it (the
            loss) are recorded too, at top level.
        layers: which outputs to keep (``"all"``, ``None`` or a selection; see
            :func:`log_forward_pass`'s ``layers_to_save``).
        random_seed: if given, ``torch.manual_seed(random_seed)`` runs at the start, so the
            pass can be repeated exactly. Without it, the RNG is left alone (its state is
            recorded in ``history.rng_states``).
        gradients: also record, in each saved layer's ``gradient``, the gradient of the loss
            with respect to its output when a backward pass (inside the block or after it)
            reaches it. Backward passes add up, like ``.grad``.
        grad_scaler: a ``torch.amp.GradScaler`` whose scaled loss is backpropagated; the
            recorded gradients are divided by its scale, so they are those of the real loss.
        save_function_args: keep each op's arguments (TorchLens's option), which lets an op be
            re-run: :meth:`ModelHistory.param_gradients` and validation need it. Costs memory
            and time; off by default.
        summaries: summarise the selected outputs that it takes at once (large CPU tensors,
            :meth:`Summaries.streams`) into it as they are made, and with ``gradients`` their
            gradients as they arrive, instead of keeping them: their layers are ``summarized``
            and hold no ``tensor_contents`` or ``gradient``, and ``summaries.result()`` has them
            under ``("activation", layer.index)`` and ``("gradient", layer.index)``. Values
            summarised while in cache and then freed are what make capturing every training
            step affordable. The other selected outputs are kept as usual. Keys are layer
            indices: give each capture a new (or cleared) ``Summaries``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "all",
        *,
        random_seed: int | None = None,
        gradients: bool = False,
        grad_scaler: Any = None,
        save_function_args: bool = False,
        summaries: Summaries | None = None,
        framework: FrameworkSpec = FRAMEWORK_PACKAGES,
        bookkeeping: bool = False,
        _argument: str = "layers",
    ) -> None:
        self.model = _check_model(model)
        self.callers = caller_filter(framework)
        if not isinstance(bookkeeping, bool):
            raise TypeError(f"bookkeeping must be True or False, got {bookkeeping!r}.")
        self.bookkeeping = bookkeeping
        if random_seed is not None and (isinstance(random_seed, bool) or not isinstance(random_seed, int)):
            raise TypeError(f"random_seed must be an int or None, got {random_seed!r}.")
        self.random_seed = random_seed
        if not isinstance(gradients, bool):
            raise TypeError(f"gradients must be True or False, got {gradients!r}.")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler (something with get_scale()), "
                f"got {type(grad_scaler).__name__}."
            )
        self.gradients = gradients
        self._unscale = None if grad_scaler is None else grad_scaler.get_scale
        if not isinstance(save_function_args, bool):
            raise TypeError(f"save_function_args must be True or False, got {save_function_args!r}.")
        self._keep_calls = save_function_args
        if summaries is not None and not isinstance(summaries, Summaries):
            raise TypeError(
                f"summaries must be a lens_core.Summaries or None, got {type(summaries).__name__}."
            )
        self.summaries = summaries
        self.argument = _argument  # what the user called `layers`, for error messages
        # The first start() uses this index: one walk over the model for both.
        self._index: ModelIndex | None = ModelIndex.of(model)
        modules = self._index.by_address
        _warn_scripted([name for name, m in modules.items() if isinstance(m, torch.jit.ScriptModule)])
        self.selection = Selection(layers, modules, _argument)
        self._recorder: Recorder | None = None
        self._history: ModelHistory | None = None
        self._rng_states: dict[str, Any] = {}
        self._started_at = 0.0
        self._gc_paused = False

    @property
    def history(self) -> ModelHistory:
        """The finished history (after ``stop()`` or the end of the ``with`` block)."""
        if self._history is None:
            state = "is still running" if self._recorder else "has not run"
            raise CaptureError(f"The capture {state}: read .history after the with block (or stop()).")
        return self._history

    @property
    def active(self) -> bool:
        """Whether the capture is recording now (between start and stop)."""
        return self._recorder is not None

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            raise CaptureError("The capture is not active: call start() or enter the with block.")
        return self._recorder

    def start(self, stop_frame: FrameType | None = None) -> Capture:
        """Starts recording; ``stop_frame`` is the caller frame the recorded call stacks end at."""
        global _active
        with _active_lock:
            if _active is not None:
                raise CaptureError(
                    "Another lens_core capture is already active in this process; captures "
                    "cannot nest or run concurrently. Finish the other one (leave its with "
                    "block or call stop()) first."
                )
            _active = self
        # A capture makes thousands of small objects that all live on in the history; the
        # collector's passes over them during the pass are wasted, so it waits until stop().
        self._gc_paused = gc.isenabled()
        gc.disable()
        try:
            self._history = None
            self._rng_states = get_rng_states()
            if self.random_seed is not None:
                torch.manual_seed(self.random_seed)
            index, self._index = self._index or ModelIndex.of(self.model), None  # a later start: afresh
            self._recorder = Recorder(
                index, self.selection, stop_frame, gradients=self.gradients,
                unscale=self._unscale, keep_calls=self._keep_calls, summaries=self.summaries,
                callers=self.callers, bookkeeping=self.bookkeeping,
            )
            self._started_at = perf_counter()
            self._recorder.install()
        except BaseException:
            self._recorder = None
            _active = None
            self._resume_gc()
            raise
        return self

    def _resume_gc(self) -> None:
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def stop(self, *, strict: bool = True) -> ModelHistory:
        """Stops recording and builds the history.

        Args:
            strict: raise :class:`LayerNotFoundError` if an item of ``layers`` matched nothing.
        """
        global _active
        recorder = self.recorder
        if threading.get_ident() != recorder.thread:  # its mode is on that thread's stack
            raise CaptureError(
                "Capture.stop() was called from another thread than start(): call it from the "
                "thread that started the capture (the one whose ops it records)."
            )
        try:  # the collector runs again whatever fails here
            try:
                recorder.uninstall()
            finally:
                self._recorder = None
                _active = None
            elapsed = perf_counter() - self._started_at
            self._history = _build_history(self, recorder, elapsed, strict)
        finally:
            self._resume_gc()
        return self._history

    def __enter__(self) -> Capture:
        return self.start(stop_frame=sys._getframe(1))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
            return
        try:  # the user's error is what matters; a history of the failed pass is a bonus
            self.stop(strict=False)
        except Exception:
            self._history = None


# The lowercase name reads like the other entry points (``with lc.capture(model) as cap``).
capture = Capture


def _build_history(cap: Capture, recorder: Recorder, elapsed: float, strict: bool) -> ModelHistory:
    entries = recorder.entries
    passes = recorder.layer_pass_counts()
    layer_labels: dict[int, str] = {}  # one string per layer, shared by its passes
    for entry in entries:
        entry.num_passes = passes[entry.layer_index]
        label = layer_labels.get(entry.layer_index)
        if label is None:
            label = f"{entry.layer_type}_{entry.type_index}_{entry.layer_index}"
            layer_labels[entry.layer_index] = label
        entry.layer_label = label
        entry.label = f"{label}:{entry.pass_num}" if entry.num_passes > 1 else label
    children: list[list[str]] = [[] for _ in entries]
    for entry in entries:
        parents = entry.parent_indices
        if len(parents) > 1:  # x + x reads one parent twice
            parents = list(dict.fromkeys(parents))
        entry.parents = tuple([entries[i].label for i in parents])
        for parent in parents:
            children[parent].append(entry.label)
    for entry, labels in zip(entries, children, strict=True):
        entry.children = tuple(labels)

    if recorder.checkpointed:
        labels = [entry.label for entry in recorder.checkpointed.values()]
        warnings.warn(
            f"lens_core: {len(labels)} layers ran inside a reentrant torch.utils.checkpoint "
            f"({', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}); autograd recomputes "
            "them in the backward, out of the capture's sight, so they have no gradient (the "
            "checkpoint's output has). checkpoint(..., use_reentrant=False) records them all.",
            RuntimeWarning,
            stacklevel=3,
        )
    selection = cap.selection
    for position, version in recorder.saved_versions.items():
        saved = entries[position].saved_tensor
        if saved is not None and saved._version != version:
            warnings.warn(
                f"The output of {entries[position].label} was changed in place after it was saved, by "
                "an op lens_core did not see as in-place; its tensor_contents may hold the later value.",
                RuntimeWarning,
                stacklevel=3,
            )
    matched: list[Any] = []
    if not (selection.everything or selection.is_empty):  # drop what was held only in case
        for entry in entries:
            found = selection.matched_items(entry, len(entries))
            matched += found
            if not found:
                entry.tensor_contents = None
                if entry.gradient_slot is not None:
                    entry.gradient_slot.detach()
                    entry.gradient_slot = None
                if entry.summarized and cap.summaries is not None:  # made in case, as above
                    cap.summaries.discard(("activation", entry.index))
                    cap.summaries.discard(("gradient", entry.index))
                    entry.summarized = False
    unmatched = [
        item for item in selection.items
        if not callable(item) and not any(item is m or item == m for m in matched)
    ]
    if strict and unmatched:
        names = [e.label for e in entries] + list(recorder.module_calls)
        close = difflib.get_close_matches(str(unmatched[0]), names, n=5, cutoff=0.5)
        raise LayerNotFoundError(
            f"{cap.argument}={unmatched[0]!r} matches no layer of this pass"
            + (f" (closest: {', '.join(close)})" if close else "")
            + f"; the pass has {len(entries)} layers (history.all_layer_labels lists them; "
            "lens_core.get_model_metadata(model, x) shows them without saving anything)."
        )

    index = recorder.index
    module_calls = dict(recorder.module_calls)
    module_calls.pop("", None)  # the model's own call is the capture, not a module call
    if selection.everything or selection.is_empty:
        listed = [e.label for e in entries]
    else:
        listed = [e.label for e in entries if e.has_saved_activations or e.summarized]
    return ModelHistory(
        model_name=type(cap.model).__name__,
        layer_list=entries,
        layer_labels=listed,
        module_addresses=list(index.module_types),
        module_types=index.module_types,
        module_calls=module_calls,
        total_params=sum(p.numel for p in index.params.values()),
        total_param_bytes=sum(p.nbytes for p in index.params.values()),
        random_seed=cap.random_seed,
        rng_states=cap._rng_states,
        elapsed_time=elapsed,
    )


def as_args(input_args: Any) -> tuple[Any, ...]:
    """TorchLens convention: a list or tuple holds the positional arguments, anything else is one."""
    if isinstance(input_args, (list, tuple)):
        return tuple(input_args)
    return (input_args,)


def log_forward_pass(
    model: nn.Module,
    input_args: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    layers_to_save: LayerSpec = "all",
    vis_opt: str = "none",
    vis_nesting_depth: int = 1000,
    vis_outpath: str = "modelgraph",
    vis_fileformat: str = "pdf",
    random_seed: int | None = None,
    save_gradients: bool = False,
    vis_direction: str = "bottomup",
    save_function_args: bool = False,
    *,
    framework: FrameworkSpec = FRAMEWORK_PACKAGES,
    bookkeeping: bool = False,
) -> ModelHistory:
    """Runs ``model`` once and returns the :class:`ModelHistory` of every op it ran.

    Args:
        model: the model; its ``training`` flag is left as it is.
        input_args: a tensor, or a list/tuple of positional arguments.
        input_kwargs: keyword arguments of the forward call.
        layers_to_save: ``"all"`` (default), ``None`` (metadata only), or one or a list of:
            a layer label (``"conv2d_3_7"``, ``"conv2d_3"``, ``"linear_1_1:2"``), a module
            address (``"features"``, ``"fc:2"``: the layer that is that module's output), an
            ordinal (``7``, ``-5``), a substring of labels (``"conv"``), or a predicate taking a
            :class:`Layer`. History and indexing cover every layer either way.
        vis_opt: ``"none"``, or ``"unrolled"``/``"rolled"`` to also render the graph (needs
            the ``dot`` binary; see :meth:`ModelHistory.render_graph`).
        vis_nesting_depth: module level whose calls are drawn as single boxes (top-level
            modules are level 1; 1000 draws every op).
        vis_outpath: where the rendered graph goes (without extension).
        vis_fileformat: graphviz output format (``pdf``, ``png``, ``svg``...).
        vis_direction: ``"bottomup"``, ``"topdown"`` or ``"leftright"``.
        random_seed: seed set before the pass (see :class:`Capture`).
        save_gradients: record the gradient of each saved layer when a backward pass runs
            later, from the output or from any saved layer (``history.backward(label)``).
        save_function_args: keep each op's arguments, so that ops can be re-run (per-op
            parameter gradients: :meth:`ModelHistory.param_gradients`).
        framework, bookkeeping: which ops are not layers (see :class:`Capture`).

    Raises:
        LayerNotFoundError: an item of ``layers_to_save`` matched no layer.
    """
    if vis_opt not in ("none", "unrolled", "rolled"):
        raise ValueError(f"vis_opt={vis_opt!r}: use 'none', 'unrolled' or 'rolled'.")
    if isinstance(vis_nesting_depth, bool) or not isinstance(vis_nesting_depth, int) or vis_nesting_depth < 1:
        raise ValueError(f"vis_nesting_depth={vis_nesting_depth!r}: use an int >= 1.")
    if input_kwargs is not None and not isinstance(input_kwargs, Mapping):
        raise TypeError(f"input_kwargs must be a dict or None, got {type(input_kwargs).__name__}.")
    if vis_opt != "none":  # fail before the model runs, not after
        check_render_options(vis_opt, vis_nesting_depth, vis_fileformat, vis_direction)
    cap = Capture(
        model, layers_to_save, random_seed=random_seed, gradients=save_gradients,
        save_function_args=save_function_args, framework=framework, bookkeeping=bookkeeping,
        _argument="layers_to_save",
    )
    history = run_forward(cap, input_args, input_kwargs)[0]
    if vis_opt != "none":
        history.render_graph(vis_opt, vis_nesting_depth, vis_outpath, vis_fileformat, vis_direction)
    return history


def run_forward(
    cap: Capture, input_args: Any, input_kwargs: Mapping[str, Any] | None
) -> tuple[ModelHistory, Any]:
    """Runs ``cap.model`` once on the inputs under ``cap``; returns the history and the output."""
    args = as_args(input_args)
    kwargs = dict(input_kwargs or {})
    cap.start(stop_frame=sys._getframe(0))
    try:
        for tensor in iter_tensors((args, kwargs)):
            cap.recorder.add_input(tensor)
        output = cap.model(*args, **kwargs)
    except BaseException:
        cap.stop(strict=False)
        raise
    return cap.stop(), output


def get_model_metadata(
    model: nn.Module,
    input_args: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    random_seed: int | None = None,
) -> ModelHistory:
    """Same as :func:`log_forward_pass` with ``layers_to_save=None``: every layer, no tensors."""
    return log_forward_pass(model, input_args, input_kwargs, layers_to_save=None, random_seed=random_seed)
