"""The records a capture produces: one :class:`Layer` per op pass, plus what it refers to.

Records point at each other by label (strings), never by object, so a history is a tree of
plain objects that reference counting frees as soon as the user drops it.
"""

from __future__ import annotations

import linecache
import math
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lens_core._format import format_layer
from lens_core.capture.gradients import GradientSlot

if TYPE_CHECKING:
    from lens_core.capture.history import ModelHistory

__all__ = ["CallRecord", "FrameInfo", "Layer", "ModelIndex", "ParamInfo", "ParentRef", "StackNode"]

# Files whose frames are plumbing between the caller and the op, not part of its story: torch's
# dispatch and the whole lens_core package (this file is lens_core/capture/records.py).
_PLUMBING_FILES = (
    os.path.join("torch", "overrides.py"),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


_new_tuple = tuple.__new__


class ParamInfo(NamedTuple):  # a tuple: built for every parameter at every capture, so cheap
    """A parameter an op used."""

    name: str
    """Address in the model, e.g. ``features.6.weight``."""
    shape: tuple[int, ...]
    numel: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ModelIndex:
    """The names of a model's modules, parameters and buffers, looked up by object id."""

    modules: dict[int, str]
    """id(module) -> address (``""`` for the model itself)."""
    module_types: dict[str, str]
    """Address -> class name, for every submodule."""
    params: dict[int, ParamInfo]
    buffers: dict[int, str]
    hooked: tuple[torch.nn.Module, ...] = ()
    """Modules with forward hooks of their own, which may replace what the module returns."""
    by_address: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Address -> module (``""``: the model), to find a parameter swapped in during the pass."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelIndex:
        """One walk over the modules (it runs at every capture), named as ``named_*`` name them."""
        modules: dict[int, str] = {}
        types: dict[str, str] = {}
        params: dict[int, ParamInfo] = {}
        buffers: dict[int, str] = {}
        hooked: list[torch.nn.Module] = []
        by_address: dict[str, torch.nn.Module] = {}
        pending = [("", model)]
        while pending:  # named_modules' order, without its generator and set (a quarter of the time)
            address, module = pending.pop()
            if id(module) in modules:  # a module registered twice keeps its first address
                continue
            modules[id(module)] = address
            by_address[address] = module
            if module._forward_hooks:
                hooked.append(module)
            prefix = address + "." if address else ""
            if address:
                types[address] = type(module).__name__
            if module._modules:
                children = reversed(module._modules.items())
                pending.extend([(prefix + name, child) for name, child in children if child is not None])
            for name, p in module._parameters.items():
                if p is not None and id(p) not in params:  # a shared parameter keeps its first name
                    # tuple.__new__: a NamedTuple's own __new__ is one more Python call per parameter
                    info = (prefix + name, tuple(p.shape), p.numel(), p.nbytes)
                    params[id(p)] = _new_tuple(ParamInfo, info)
            for name, b in module._buffers.items():
                if b is not None and id(b) not in buffers:
                    buffers[id(b)] = prefix + name
        return cls(modules, types, params, buffers, tuple(hooked), by_address)


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """One frame of the Python stack an op was called from (TorchLens ``func_call_stack``)."""

    call_fname: str
    call_linenum: int
    function: str
    context_lines: int = 5
    stored_context: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
    """The lines of :attr:`code_context` as a saved capture stored them; None in a live capture.

    A loaded frame has them (empty when the capture kept none) and never reads ``call_fname``:
    a capture from elsewhere may name any file there, ``/etc/passwd`` or a FIFO.
    """

    @property
    def code_context(self) -> list[str]:
        """Source lines around the call: ``context_lines`` before and after it.

        A live capture reads them from ``call_fname`` when asked for; a loaded one has the lines
        stored at save time and reads no file.
        """
        if self.stored_context is not None:
            return list(self.stored_context)
        first = max(1, self.call_linenum - self.context_lines)
        last = self.call_linenum + self.context_lines
        return [linecache.getline(self.call_fname, n) for n in range(first, last + 1)]

    @property
    def code_line(self) -> str:
        """The line of the call itself (empty if its source is unknown)."""
        lines = self.code_context
        position = self.call_linenum - max(1, self.call_linenum - self.context_lines)
        return lines[position] if 0 <= position < len(lines) else ""


class StackNode:
    """A stretch of the Python stack, innermost frame first, and the node of the stack outside it.

    Each module call keeps the node of the stack outside it; the ops inside add a node with only
    the few frames between them and the module, so recording an op does not copy the whole stack.
    """

    __slots__ = ("frames", "outer")

    def __init__(self, frames: tuple[tuple[CodeType, int], ...], outer: StackNode | None) -> None:
        self.frames = frames
        self.outer = outer

    def __iter__(self) -> Iterator[tuple[CodeType, int]]:
        """(code, instruction offset) pairs from the innermost frame out."""
        node: StackNode | None = self
        while node is not None:
            yield from node.frames
            node = node.outer


def _line_of(code: CodeType, lasti: int) -> int:
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


@dataclass(frozen=True, slots=True)
class CallRecord:
    """The arguments of one op with every tensor from a parent layer replaced by a reference.

    ``args``/``kwargs`` hold :class:`ParentRef` where a parent's output went, and the objects
    themselves elsewhere (parameters, copies of buffers as they were, non-tensor values).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ParentRef:
    """Stands for the output of the layer at ``index`` in a :class:`CallRecord`."""

    index: int


@dataclass(eq=False, slots=True)
class Layer:
    """One pass of one tensor-producing operation of a forward pass.

    A layer that runs several times (a loop, a module called twice) has one ``Layer`` per pass,
    labelled ``linear_1_1:1``, ``linear_1_1:2``, ...; a single-pass layer is just ``conv2d_3_7``.
    """

    layer_type: str
    """Type part of the label: ``conv2d``, ``relu``, ``input``, ``output``."""
    type_index: int
    """1-based count of this type among layers: the ``3`` in ``conv2d_3_7``."""
    layer_index: int
    """0-based position of the (rolled) layer in the model: the ``7`` in ``conv2d_3_7``."""
    pass_num: int
    """Which pass of the layer this is, from 1."""
    index: int
    """Position of this pass in execution order (what ``history[index]`` returns)."""
    func_name: str
    """Name of the torch callable (``conv2d``, ``relu_``, ``__getitem__``), or input/output."""
    func: Callable[..., Any] | None = field(repr=False)
    """The torch callable itself (None for inputs and outputs)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    grad_fn_name: str | None
    """Autograd node that produced the output (``ConvolutionBackward0``), if any."""
    module_stack: tuple[str, ...]
    """Modules the op ran inside, outermost first, with their pass: ``("features:1", "features.6:1")``."""
    params: tuple[ParamInfo, ...]
    """Parameters passed to the op."""
    buffers: tuple[str, ...]
    """Addresses of buffers passed to the op (e.g. BatchNorm running statistics)."""
    parent_indices: list[int] = field(repr=False)
    frames: StackNode | None = field(repr=False)
    """Raw call stack: iterates (code, instruction offset) pairs, innermost first."""
    is_input: bool = False
    is_output: bool = False
    is_inplace: bool = False
    """Whether the op wrote its result into one of its inputs (``relu_``, ``x += 1``)."""
    output_index: int | None = None
    """Position of the output among the op's outputs, for ops returning several (``split``)."""
    time_elapsed: float = 0.0
    """Seconds the op itself took (the recorder's own work excluded)."""
    saved_tensor: torch.Tensor | None = field(default=None, repr=False)
    """The saved output, if held in memory (see :attr:`tensor_contents`)."""
    tensor_source: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    """Loads the saved output on first use (histories loaded from disk)."""
    summarized: bool = False
    """Whether the output was selected but handed to the capture's ``Summaries`` instead of
    being kept (``tensor_contents`` is then None)."""
    label: str = ""
    """Unique label of this pass: ``conv2d_3_7``, or ``linear_1_1:2`` for a multi-pass layer."""
    layer_label: str = ""
    """Label of the layer without the pass: ``linear_1_1``."""
    num_passes: int = 1
    parents: tuple[str, ...] = ()
    """Labels of the layers whose outputs this op consumed."""
    children: tuple[str, ...] = ()
    """Labels of the layers that consumed this op's output."""
    output_of_modules: tuple[str, ...] = ()
    """Module calls this is the output of, innermost first, with pass: ``("features.6:1",)``."""
    keys: tuple[str | int, ...] | None = field(default=None, repr=False)
    """:attr:`lookup_keys`, once its history worked them out."""
    history_ref: weakref.ref[ModelHistory] | None = field(default=None, repr=False)
    """The history this layer belongs to, which works out the lookup keys when first asked."""
    stored_call_stack: tuple[FrameInfo, ...] | None = field(default=None, repr=False)
    """Call stack of a layer loaded from disk (which has no code objects in ``frames``)."""
    gradient_slot: GradientSlot | None = field(default=None, repr=False)
    call: CallRecord | None = field(default=None, repr=False)
    """How the op was called, kept for replay (``validate_model_activations``)."""

    @property
    def gradient(self) -> torch.Tensor | None:
        """Gradient of the loss with respect to this output, once a backward pass reached it.

        Only for layers captured with gradients on whose output required grad. Backward passes
        through the same output add up (like ``.grad``).
        """
        return None if self.gradient_slot is None else self.gradient_slot.value

    @property
    def lookup_keys(self) -> tuple[str | int, ...]:
        """Every key that indexes this layer in its history: ordinals, labels, module calls."""
        if self.keys is None and self.history_ref is not None:
            history = self.history_ref()
            if history is not None:
                history.lookup  # noqa: B018  # building the table works out every layer's keys
        return self.keys or ()

    @property
    def module(self) -> str | None:
        """Address of the innermost module the op ran in (``features.6``), None at top level."""
        return self.module_stack[-1].rpartition(":")[0] if self.module_stack else None

    @property
    def nbytes(self) -> int:
        """Size of the output in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        return [p.shape for p in self.params]

    @property
    def tensor_contents(self) -> torch.Tensor | None:
        """The output as it was right after the op, if this layer was saved."""
        if self.saved_tensor is None and self.tensor_source is not None:
            self.saved_tensor = self.tensor_source()
            self.tensor_source = None
        return self.saved_tensor

    @tensor_contents.setter
    def tensor_contents(self, value: torch.Tensor | None) -> None:
        self.saved_tensor = value
        self.tensor_source = None

    @property
    def has_saved_activations(self) -> bool:
        """Whether the output was saved (without loading it, for histories from disk)."""
        return self.saved_tensor is not None or self.tensor_source is not None

    @property
    def func_call_stack(self) -> list[FrameInfo]:
        """Where the op was called from, outermost frame first; the last entry calls the op."""
        if self.stored_call_stack is not None:
            return list(self.stored_call_stack)
        stack = []
        for code, lasti in reversed(list(self.frames or ())):
            if not any(part in code.co_filename for part in _PLUMBING_FILES):
                stack.append(FrameInfo(code.co_filename, _line_of(code, lasti), code.co_name))
        return stack

    def __str__(self) -> str:
        return format_layer(self)
