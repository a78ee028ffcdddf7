"""What the recorder needs to know about a torch callable: its layer type name and what it mutates.

Both are worked out once per callable and cached, because the recorder asks for every op.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

# Reflected and augmented dunders name the same operation as the plain one.
_DUNDER_ALIASES = {
    f"__{prefix}{op}__": op
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
               "and", "or", "xor", "lshift", "rshift")
    for prefix in ("r", "i")
}
# Augmented assignment and item assignment write into their first argument.
_MUTATING_DUNDERS = frozenset(
    {name for name in _DUNDER_ALIASES if name.startswith("__i")} | {"__setitem__"}
)

# Property getters that hand out a tensor the op did not compute (``p.grad``, ``x.data``):
# reading one is not an operation of the model (optimizers read ``.grad`` of every parameter).
_ACCESSORS = frozenset({"grad", "data", "_base"})

MUTATES_NOTHING = -1
MUTATES_FIRST_ARG = -2


class OpInfo:
    """How the recorder treats one torch callable.

    Attributes:
        type_name: the layer type in labels (``conv2d`` in ``conv2d_3_7``).
        func_name: the callable's own name (``conv2d``, ``relu_``, ``__getitem__``).
        mutates: ``MUTATES_NOTHING``, ``MUTATES_FIRST_ARG``, or the position of an
            ``inplace`` flag (``F.relu(x, inplace=True)``) that makes it write into its input.
        records: False for accessors that compute nothing (``x.grad``): never a layer.
    """

    __slots__ = ("func_name", "mutates", "records", "type_name")

    def __init__(self, func_name: str, type_name: str, mutates: int, records: bool = True) -> None:
        self.func_name = func_name
        self.type_name = type_name
        self.mutates = mutates
        self.records = records

    def mutated_tensor(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The tensor (or list of tensors) this call writes into, or None."""
        out = kwargs.get("out") if kwargs else None
        if out is not None:
            return out
        if self.mutates == MUTATES_NOTHING or not args:
            return None
        if self.mutates == MUTATES_FIRST_ARG:
            return args[0]
        flag = args[self.mutates] if len(args) > self.mutates else kwargs.get("inplace", False)
        return args[0] if flag else None


def _func_name(func: Callable[..., Any]) -> str:
    name: str = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        # Property getters (``x.T``, ``x.mT``) arrive as the descriptor's ``__get__``.
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def _type_name(func_name: str) -> str:
    name = _DUNDER_ALIASES.get(func_name, func_name)
    return name.strip("_").replace("_", "").lower() or "op"


def _inplace_flag_position(func: Callable[..., Any]) -> int:
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # C builtins without a signature have no inplace flag
        return MUTATES_NOTHING
    return params.index("inplace") if "inplace" in params else MUTATES_NOTHING


def describe(func: Callable[..., Any]) -> OpInfo:
    """Works out the :class:`OpInfo` of a torch callable (callers cache the result)."""
    func_name = _func_name(func)
    if func_name in _ACCESSORS and getattr(func, "__name__", "") == "__get__":
        return OpInfo(func_name, func_name, MUTATES_NOTHING, records=False)
    is_dunder = func_name.startswith("__") and func_name.endswith("__")
    if func_name in _MUTATING_DUNDERS or (func_name.endswith("_") and not is_dunder):
        mutates = MUTATES_FIRST_ARG
    else:
        mutates = _inplace_flag_position(func)
    return OpInfo(func_name, _type_name(func_name), mutates)


def write_through_view(
    base: torch.Tensor,
    view_value: torch.Tensor,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
) -> torch.Tensor:
    """``base`` after ``view_value`` was written into its view at (size, stride, offset).

    The function of the layers that stand for a base tensor changed through a view, so that a
    replay can recompute the base's new value from its old value and what was written.
    """
    out = base.clone()
    out.as_strided(size, stride, out.storage_offset() + offset).copy_(view_value)
    return out
