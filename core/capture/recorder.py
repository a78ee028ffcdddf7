"""The recorder: a scoped ``TorchFunctionMode`` plus process-wide module hooks.

While installed it sees every torch call of the thread that installed it. Calls returning
tensors become :class:`~lens_core.capture.records.Layer` entries; module hooks tell which module each op
ran in and which op is the output of which module call. Nothing of torch is patched: the mode
and the hooks are the official, scoped mechanisms, and :meth:`Recorder.uninstall` removes both.

The handler runs once per torch op, so it is written for speed: no work for ops that return no
tensor, cached per-callable facts, code paths worked out once per process
(:mod:`~lens_core.capture.sites`), and copies only of saved tensors that are about to be
overwritten in place. Where the rest of its cost goes: README, "Where each microsecond goes".
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from threading import get_ident
from time import perf_counter
from types import FrameType
from typing import Any

import torch
from torch import Tensor, is_grad_enabled, nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lens_core.capture._ops import MUTATES_NOTHING, OpInfo, describe, write_through_view
from lens_core.capture.callers import CallerFilter, caller_filter
from lens_core.capture.gradients import GradientSlot
from lens_core.capture.records import CallRecord, Layer, ModelIndex, ParamInfo, ParentRef, StackNode
from lens_core.capture.selection import Selection
from lens_core.capture.sites import MAX_FRAMES, Site, sites_for
from lens_core.summaries import Summaries, storage_intact

# Per-callable facts, shared by all captures: torch callables live as long as the process.
_OP_INFO: dict[Callable[..., Any], OpInfo] = {}
_EVERY_OP = caller_filter(())  # no op is framework's
_SEQUENCES = frozenset({list, tuple})  # arguments that may hold tensors (exact types: not a shape)

_RecurrenceKey = tuple[Any, ...]
# A module call in progress: the frame it began in, the Python stack outside it and that stack's
# key, and (None for the capture's own frame) the module stack outside it with the call's own
# address, pass and tag: (module_stack, stack_addresses, address, pass, "address:pass").
_Outside = tuple[tuple[str, ...], tuple[str, ...], str, int, str]
_Boundary = tuple[FrameType | None, StackNode | None, int, _Outside | None]


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    """Tensors inside a (nested) tuple, list, dict or dataclass output, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 8:
        if isinstance(obj, (list, tuple)):
            items: Any = obj
        elif isinstance(obj, dict):
            items = obj.values()
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
        else:
            return
        for item in items:
            yield from iter_tensors(item, depth + 1)


def _stream_gradient(summaries: Summaries, key: tuple[str, int], grad: Tensor) -> bool:
    """A gradient sink: hands ``grad`` to ``summaries`` if it summarises it at once."""
    if not summaries.streams(grad):
        return False  # the slot keeps it, and the summary is made from it later
    if key in summaries:  # a second backward pass through the same output
        warnings.warn(
            f"lens_core: a second backward pass reached layer #{key[1]} of a capture that "
            "summarises gradients as they arrive; its gradient summary is of the first pass only "
            "(capture without summaries= to have the gradients add up).",
            RuntimeWarning,
            stacklevel=2,
        )
        return True
    summaries.add(key, grad)
    return True


def _in_reentrant_checkpoint(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside ``torch.utils.checkpoint``'s reentrant forward."""
    checkpoint = sys.modules.get("torch.utils.checkpoint")
    forward = getattr(getattr(checkpoint, "CheckpointFunction", None), "forward", None)
    code = getattr(forward, "__code__", None)
    depth = 0
    while frame is not None and code is not None and depth < MAX_FRAMES:
        if frame.f_code is code:
            return True
        frame, depth = frame.f_back, depth + 1
    return False


def _storage_key(tensor: Tensor) -> int | None:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):  # no storage (meta, sparse, subclass)
        return None


class Recorder(TorchFunctionMode):
    """Records the ops and module calls of one capture into :attr:`entries`."""

    def __init__(
        self,
        index: ModelIndex,
        selection: Selection,
        stop_frame: FrameType | None,
        *,
        gradients: bool = False,
        unscale: Callable[[], float] | None = None,
        keep_calls: bool = False,
        summaries: Summaries | None = None,
        callers: CallerFilter = _EVERY_OP,
        bookkeeping: bool = False,
    ) -> None:
        super().__init__()
        self._bookkeeping = bookkeeping
        self._gradients = gradients
        self._summaries = summaries
        self._unscale = unscale
        self._keep_calls = keep_calls
        self._buffers_before: dict[int, Tensor] = {}
        self.entries: list[Layer] = []
        self.module_calls: dict[str, int] = {}
        self._selection = selection
        self._save_all = selection.everything
        self._save_none = selection.is_empty  # metadata only: no per-op selection test
        self._thread = get_ident()
        self.index = index
        self._addresses = index.modules
        self._params = index.params
        self._buffers = index.buffers
        # id(tensor) -> (weak reference, entry that produced it); the weak reference tells a live
        # tensor from a new one that reuses a dead one's id.
        self._producers: dict[int, tuple[weakref.ref[Tensor], Layer]] = {}
        self._layers: dict[_RecurrenceKey, list[int]] = {}  # key -> [type_index, layer_index, passes]
        self._type_counts: dict[str, int] = {}
        # storage -> saved entries whose tensor lives in it: the copy-on-write table
        self._saved_by_storage: dict[int, list[Layer]] = {}
        self.saved_versions: dict[int, int] = {}  # entry index -> tensor version when saved
        self._stack: tuple[str, ...] = ()  # "address:pass" of the modules we are inside
        self._stack_addresses: tuple[str, ...] = ()
        self._keep_module_outputs = bool(selection.modules)
        self._root_depth = 0
        # The module calls we are inside, innermost last (the capture's own frame first).
        # The capture's own frame is walked too (it moves on between ops): the walks end above it.
        top = None if stop_frame is None else stop_frame.f_back
        self._boundaries: list[_Boundary] = [(top, None, 0, None)]
        self._sites = sites_for(callers)
        self._known_sites = self._sites.known
        self._handles: list[RemovableHandle] = []
        self._hooked: set[int] = set()  # ids of the modules left by _on_hooked_module_exit
        # parameters swapped in during the pass (sharding), by id: (weak reference, what it is)
        self._late_params: dict[int, tuple[weakref.ref[Tensor], ParamInfo]] = {}
        self.checkpointed: dict[int, Layer] = {}
        """Saved layers run inside a reentrant ``torch.utils.checkpoint``, by index, which get no
        gradient: autograd recomputes them in the backward, out of the capture's sight."""

    # -- installation -----------------------------------------------------------------------

    def install(self) -> None:
        self._handles = [
            register_module_forward_pre_hook(self._on_module_enter),
            register_module_forward_hook(self._on_module_exit, always_call=True),
        ]
        # Global hooks run before a module's own: a module whose hooks may replace its output
        # (or compute more) is left by a hook of ours placed after them, so that its output
        # layer is what the call returned and the hooks' ops are inside it.
        self._hooked = {id(module) for module in self.index.hooked}
        self._handles += [
            module.register_forward_hook(self._on_hooked_module_exit, always_call=True)
            for module in self.index.hooked
        ]
        try:
            self.__enter__()  # type: ignore[no-untyped-call]  # pushes the mode
        except BaseException:
            self._remove_hooks()
            raise

    def uninstall(self) -> None:
        """Removes the mode and the hooks; modes a user entered above ours stay where they were."""
        try:
            above = []
            while torch._C._len_torch_function_stack() > 0:
                mode = torch._C._pop_torch_function_stack()
                if mode is self:
                    break
                above.append(mode)
            for mode in reversed(above):
                torch._C._push_on_torch_function_stack(mode)
        finally:
            self._remove_hooks()

    @property
    def thread(self) -> int:
        """The thread that installed the recorder: the one whose ops it sees."""
        return self._thread

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._boundaries = [(None, None, 0, None)]  # hold no frame of the caller's after the capture

    # -- ops ----------------------------------------------------------------------------------

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        info = _OP_INFO.get(func)
        if info is None:
            info = _OP_INFO[func] = describe(func)
        if not info.records:
            return func(*args, **kwargs)
        mutated = None
        if info.mutates != MUTATES_NOTHING or kwargs:
            mutated = info.mutated_tensor(args, kwargs)
            if mutated is not None and self._saved_by_storage:
                self._copy_before_write(mutated)
        site = self._site(sys._getframe(1))
        if site[2]:  # issued by framework code
            out = func(*args, **kwargs)
            self._pass_through((args, kwargs), out)
            return out
        if self._keep_calls:  # buffers as the op finds them (it may update them, like BatchNorm)
            self._buffers_before = {
                id(t): t.detach().clone() for t in iter_tensors((args, kwargs)) if id(t) in self._buffers
            }
        start = perf_counter()
        out = func(*args, **kwargs)
        elapsed = perf_counter() - start
        if isinstance(out, Tensor):
            self._record(func, info, args, kwargs, ((None, out),), elapsed, mutated, site)
        elif isinstance(out, (tuple, list)):
            outputs = tuple((i, o) for i, o in enumerate(out) if isinstance(o, Tensor))
            if outputs:
                self._record(func, info, args, kwargs, outputs, elapsed, mutated, site)
        elif out is None and isinstance(mutated, Tensor):  # x[i] = y returns nothing, changes x
            self._record(func, info, args, kwargs, ((None, mutated),), elapsed, mutated, site)
        return out

    def _copy_before_write(self, mutated: Any) -> None:
        """Replaces saved tensors that share storage with ``mutated`` by copies of themselves."""
        for tensor in iter_tensors(mutated):
            key = _storage_key(tensor)
            for entry in self._saved_by_storage.pop(key, ()) if key is not None else ():
                saved = entry.tensor_contents
                # a freed one (FSDP's buffers) whose address came back is left, unread: the
                # summaries skip it
                if saved is not None and storage_intact(saved):
                    entry.tensor_contents = saved.clone()
                self.saved_versions.pop(entry.index, None)

    def _pass_through(self, inputs: Any, out: Any) -> None:
        """A framework op is no layer, but what it returns stands for its first recorded input, so
        that a layer reading it (a loss moved to another device, a gathered tensor) keeps its parent."""
        for tensor in iter_tensors(inputs):
            producer = self._producers.get(id(tensor))
            if producer is not None and producer[0]() is tensor:
                for result in iter_tensors(out):
                    if result is not tensor:
                        self._producers[id(result)] = (weakref.ref(result), producer[1])
                return

    def _record(
        self,
        func: Callable[..., Any],
        info: OpInfo,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outputs: tuple[tuple[int | None, Tensor], ...],
        elapsed: float,
        mutated: Any,
        site: Site,
    ) -> None:
        parents: list[int] = []
        params: list[ParamInfo] = []
        buffers: list[str] = []
        call = None
        if self._keep_calls:
            call = CallRecord(
                tuple(self._call_template(a, parents, params, buffers) for a in args),
                {k: self._call_template(v, parents, params, buffers) for k, v in kwargs.items()},
            )
        else:
            for arg in (*args, *kwargs.values()) if kwargs else args:
                if isinstance(arg, Tensor):
                    self._classify_arg(arg, parents, params, buffers)
                elif type(arg) in _SEQUENCES:
                    for item in arg:
                        if isinstance(item, Tensor):
                            self._classify_arg(item, parents, params, buffers)
        if buffers and not (parents or params or self._bookkeeping) and self._only_buffers(mutated):
            return  # bookkeeping (``num_batches_tracked += 1``): nothing of the inputs in it

        frames, path = site[0], site[1]
        if params:  # an op using the same parameters again is another pass of the same layer
            key_base: tuple[Any, ...] = (func, tuple([p.name for p in params]))
        else:  # a parameter-free op is one when it runs again from the same code path
            key_base = (func, self._stack_addresses, path)
        params_used, buffers_used, inplace = tuple(params), tuple(buffers), mutated is not None
        for out_index, out in outputs:
            entry = self._new_entry(
                (*key_base, out_index), info.type_name, info.func_name, func, out, parents, frames,
                params_used, buffers_used, inplace=inplace, output_index=out_index, elapsed=elapsed,
            )
            if call is not None:
                entry.call = call
        if mutated is not None:
            self._record_writes_through_views(mutated, entry, path, frames)

    def _only_buffers(self, mutated: Any) -> bool:
        """Whether ``mutated`` is one or more of the model's buffers (False for None)."""
        found = False
        for tensor in iter_tensors(mutated):
            if id(tensor) not in self._buffers:
                return False
            found = True
        return found

    def _record_writes_through_views(self, mutated: Any, writer: Layer, site: int, frames: StackNode) -> None:
        """Gives a base tensor written through one of its views (``x[0].mul_(2)``) a new layer.

        Later ops that read the base then read this layer, which holds the base's new value.
        """
        for view in iter_tensors(mutated):
            base = view._base
            producer = None if base is None else self._producers.get(id(base))
            if base is None or producer is None or producer[0]() is not base:
                continue
            before = producer[1]
            geometry = (tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset())
            entry = self._new_entry(
                (write_through_view, self._stack_addresses, site), "viewwrite", "write_through_view",
                write_through_view, base, [before.index, writer.index], frames,
            )
            entry.is_inplace = True
            if self._keep_calls:
                entry.call = CallRecord((ParentRef(before.index), ParentRef(writer.index), *geometry), {})

    def _classify_arg(
        self, tensor: Tensor, parents: list[int], params: list[ParamInfo], buffers: list[str]
    ) -> int | None:
        """Notes a tensor argument as parameter, buffer or parent; returns the parent's index."""
        tid = id(tensor)
        param = self._params.get(tid)
        if param is not None:
            params.append(param)
            return None
        buffer = self._buffers.get(tid)
        if buffer is not None:
            buffers.append(buffer)
        producer = self._producers.get(tid)
        if producer is not None and producer[0]() is tensor:
            parents.append(producer[1].index)
            if self.checkpointed and tensor.requires_grad:
                self._grad_after_checkpoint(producer[1], tensor)
        elif buffer is None:
            swapped = self._swapped_param(tensor)
            if swapped is not None:
                params.append(swapped)
                return None
            parents.append(self.add_input(tensor).index)  # from outside the capture: an input
        else:
            return None
        return parents[-1]

    def _grad_after_checkpoint(self, entry: Layer, tensor: Tensor) -> None:
        """The output of a reentrant checkpoint, made under no_grad, is given its ``grad_fn`` when
        the checkpoint returns: it gets its gradient slot when a later op reads it."""
        if self.checkpointed.pop(entry.index, None) is not None:
            self._attach_gradient(entry, tensor, self._summaries if entry.summarized else None)

    def _swapped_param(self, tensor: Tensor) -> ParamInfo | None:
        """The parameter ``tensor`` stands for, if a module on the stack holds it under a name.

        Sharding wrappers swap parameters during the pass: FSDP2 puts the gathered, unsharded
        parameter in ``module._parameters``, FSDP1 (flat parameters) sets views as attributes.
        Found by identity in the modules the op runs in, innermost first, it takes that name.
        """
        known = self._late_params.get(id(tensor))
        if known is not None and known[0]() is tensor:
            return known[1]
        for address in (*reversed(self._stack_addresses), ""):
            module = self.index.by_address.get(address)
            if module is None:
                continue
            for name, value in (*module._parameters.items(), *vars(module).items()):
                if value is tensor:
                    numel = tensor.numel()
                    info = ParamInfo(f"{address}.{name}" if address else name, tuple(tensor.shape), numel,
                                     numel * tensor.element_size())
                    self._late_params[id(tensor)] = (weakref.ref(tensor), info)
                    return info
        return None

    def _call_template(
        self, arg: Any, parents: list[int], params: list[ParamInfo], buffers: list[str]
    ) -> Any:
        """``arg`` with parent outputs replaced by references (one level into lists/tuples)."""
        if isinstance(arg, Tensor):
            parent = self._classify_arg(arg, parents, params, buffers)
            if parent is not None:
                return ParentRef(parent)
            return self._buffers_before.get(id(arg), arg)
        if type(arg) is list or type(arg) is tuple:
            return type(arg)(self._call_template(a, parents, params, buffers) for a in arg)
        return arg

    def _site(self, frame: FrameType | None) -> Site:
        """Where ``frame`` is (see :mod:`~lens_core.capture.sites`): the stack from it out, a
        key of its code path, and whether framework code issued an op called from it.

        Only the frames up to the innermost module call are walked; the node of the stack outside
        that call was made when it began (those frames are suspended meanwhile).
        """
        boundary, outer, key, _ = self._boundaries[-1]
        path = [key]
        walked = frame
        while walked is not boundary and walked is not None:  # None: not below the capture
            path += id(walked.f_code), walked.f_lasti  # ids: a code object's hash is slow
            walked = walked.f_back
            if boundary is None and len(path) > 2 * MAX_FRAMES:  # no capture frame to stop at
                break
        ident = tuple(path)
        return self._known_sites.get(ident) or self._sites.add(ident, frame, boundary, outer)

    def _new_entry(
        self,
        key: _RecurrenceKey,
        type_name: str,
        func_name: str,
        func: Callable[..., Any] | None,
        out: Tensor,
        parents: list[int],
        frames: StackNode | None,
        params: tuple[ParamInfo, ...] = (),
        buffers: tuple[str, ...] = (),
        produces: bool = True,
        inplace: bool = False,
        output_index: int | None = None,
        elapsed: float = 0.0,
    ) -> Layer:
        """A new entry for ``out``; ``produces`` makes it what later reads of ``out`` depend on."""
        layer = self._layers.get(key)
        if layer is None:
            type_index = self._type_counts[type_name] = self._type_counts.get(type_name, 0) + 1
            layer = self._layers[key] = [type_index, len(self._layers), 0]
        layer[2] += 1
        grad_fn = out.grad_fn
        entry = Layer(
            type_name, layer[0], layer[1], layer[2], len(self.entries), func_name, func,
            tuple(out.shape), out.dtype, out.device,
            None if grad_fn is None else type(grad_fn).__name__,
            self._stack, params, buffers, parents, frames, False, False, inplace, output_index, elapsed,
        )
        self.entries.append(entry)
        if produces:
            self._producers[id(out)] = (weakref.ref(out), entry)
        if self._save_all or (not self._save_none and self._selection.keep_at_op(entry)):
            self._save(entry, out)
        return entry

    def _save(self, entry: Layer, tensor: Tensor) -> None:
        summaries = self._summaries
        if summaries is not None and not summaries.streams(tensor):
            summaries = None  # kept: summarised from tensor_contents after the step
        if self._gradients:
            if tensor.requires_grad:
                self._attach_gradient(entry, tensor, summaries)
            elif not is_grad_enabled() and _in_reentrant_checkpoint(sys._getframe()):
                self.checkpointed[entry.index] = entry
        if summaries is not None:  # summarised now: nothing is kept, so nothing to copy before writes
            summaries.add(("activation", entry.index), tensor)
            entry.summarized = True
            return
        entry.saved_tensor = tensor  # not the property: nothing was saved or is to be loaded yet
        key = _storage_key(tensor)
        if key is not None:
            self._saved_by_storage.setdefault(key, []).append(entry)
            if not tensor.is_inference():  # inference tensors keep no version counter
                self.saved_versions[entry.index] = tensor._version

    def _attach_gradient(self, entry: Layer, tensor: Tensor, summaries: Summaries | None) -> None:
        gradient_key = ("gradient", entry.index)
        sink = None if summaries is None else partial(_stream_gradient, summaries, gradient_key)
        entry.gradient_slot = GradientSlot(self._unscale, sink=sink)
        entry.gradient_slot.attach(tensor)

    # -- inputs, outputs and modules ---------------------------------------------------------

    def add_input(self, tensor: Tensor) -> Layer:
        """Registers a tensor that enters from outside as an input layer."""
        entry = self._new_entry(("input", id(tensor), len(self.entries)), "input", "input",
                                None, tensor, [], None)
        entry.is_input = True
        entry.module_stack = ()  # it comes from outside, whichever module first reads it
        return entry

    def _add_output(self, position: int, tensor: Tensor) -> None:
        producer = self._producers.get(id(tensor))
        source = producer[1] if producer is not None and producer[0]() is tensor else self.add_input(tensor)
        entry = self._new_entry(("output", position), "output", "output", None, tensor,
                                [source.index], None, produces=False)
        entry.is_output = True

    def _on_module_enter(self, module: nn.Module, args: Any) -> None:
        address = self._addresses.get(id(module))
        if address is None or get_ident() != self._thread:
            return
        call = self.module_calls[address] = self.module_calls.get(address, 0) + 1
        caller = sys._getframe(1)  # the module's __call__, which called this hook
        node, key, _ = self._site(caller)
        stack, addresses, tag = self._stack, self._stack_addresses, f"{address}:{call}"
        self._boundaries.append((caller, node, key, (stack, addresses, address, call, tag)))
        if address:
            self._stack = (*stack, tag)
            self._stack_addresses = (*addresses, address)
        else:  # the root model is the capture itself, not a level of the stack
            self._root_depth += 1

    def _on_hooked_module_exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._on_module_exit(module, args, output, sys._getframe(1))

    def _on_module_exit(
        self, module: nn.Module, args: Any, output: Any, caller: FrameType | None = None
    ) -> None:
        """Ends a module call; ``caller`` is the module's ``__call__``, which ran the hook (given
        by the per-module hook; the global one leaves hooked modules to it). One function, not
        two: it runs at every module call."""
        if caller is None:
            if id(module) in self._hooked:
                return
            caller = sys._getframe(1)
        if get_ident() != self._thread:
            return
        boundaries = self._boundaries
        begun = boundaries[-1]
        if begun[0] is caller:
            boundaries.pop()
        else:  # raised in forward (the hook runs from elsewhere), or inner calls ended unseen
            address = self._addresses.get(id(module))
            for depth in range(len(boundaries) - 1, 0, -1):
                outside = boundaries[depth][3]
                if boundaries[depth][0] is caller or (outside is not None and outside[2] == address):
                    begun = boundaries[depth]
                    del boundaries[depth:]
                    break
            else:
                return  # not a call we saw begin
        outside = begun[3]
        if outside is None:
            return
        self._stack, self._stack_addresses, address, call, tag = outside
        if not address:
            self._root_depth -= 1
            if self._root_depth == 0:  # a model that calls itself returns once, at the top
                for position, tensor in enumerate(iter_tensors(output)):
                    self._add_output(position, tensor)
            return
        keep = self._keep_module_outputs and self._selection.keep_module_output(address, call)
        for tensor in (output,) if isinstance(output, Tensor) else iter_tensors(output):
            producer = self._producers.get(id(tensor))
            if producer is None or producer[0]() is not tensor:
                continue
            entry = producer[1]
            if tag in entry.output_of_modules:  # the same tensor returned twice
                continue
            entry.output_of_modules += (tag,)
            if keep and entry.tensor_contents is None and not entry.summarized:
                self._save(entry, tensor)

    # -- after the capture ------------------------------------------------------------------

    def layer_pass_counts(self) -> dict[int, int]:
        """Number of passes of each layer, by layer index."""
        return {layer[1]: layer[2] for layer in self._layers.values()}
