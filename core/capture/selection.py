"""Which layers a capture keeps the output of (``layers_to_save`` / ``layers=``).

A selection is decided in the one forward pass that runs: most items are recognised when the op
runs; a module address when that module returns; negative ordinals and predicates only when the
pass is over, so with those every output is held until the end and the rest dropped then.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

from lens_core.errors import LayerNotFoundError

if TYPE_CHECKING:
    from lens_core.capture.records import Layer

__all__ = ["LayerSpec", "Selection"]

_Item: TypeAlias = "str | int | Callable[[Layer], bool]"
LayerSpec: TypeAlias = "_Item | Iterable[_Item] | None"

# conv2d_3_7, conv2d_3, linear_1_1:2 -- anything else that is not a module is a substring.
_LABEL = re.compile(r"(?P<name>[a-z0-9]+_\d+(?:_\d+)?)(?::(?P<pass>\d+))?")
_MODULE = re.compile(r"(?P<name>.*?)(?::(?P<pass>\d+))?")
_HELP = (
    "Pass 'all', None, a layer label ('conv2d_3_7', 'linear_1_1:2'), a module address "
    "('features.6', 'fc:2'), an ordinal (7, -5), a substring of labels or module addresses "
    "('conv', 'lora'), a callable "
    "taking a Layer and returning bool, or a list of these. Get the names from "
    "lens_core.get_model_metadata(model, x).layer_labels."
)


def _in_modules(substring: str, entry: Layer) -> bool:
    """Whether ``substring`` is part of the address of a module the op ran in."""
    return any(substring in tag.rpartition(":")[0] for tag in entry.module_stack)


def _split_pass(match: re.Match[str]) -> tuple[str, int | None]:
    number = match.group("pass")
    return match.group("name"), None if number is None else int(number)


class Selection:
    """A parsed ``layers_to_save`` value, answering "keep this layer's output?".

    Args:
        spec: what the user passed (see ``_HELP`` for the forms).
        module_addresses: the model's module addresses, to tell a module from a substring.
        argument: the argument name to use in error messages.
    """

    def __init__(self, spec: Any, module_addresses: Iterable[str], argument: str) -> None:
        self.spec = spec
        self.everything = isinstance(spec, str) and spec == "all"
        self.ordinals: set[int] = set()
        self.negative_ordinals: set[int] = set()
        self.labels: list[tuple[str, int | None]] = []
        self.modules: list[tuple[str, int | None]] = []
        self.substrings: list[str] = []
        self.predicates: list[Callable[[Layer], bool]] = []
        if spec is None or self.everything:
            self.items: list[Any] = []
            return
        modules = set(module_addresses)
        items = [spec] if isinstance(spec, (str, int)) or callable(spec) else spec
        try:
            self.items = list(items)
        except TypeError:
            raise TypeError(f"{argument}={spec!r} is not a layer selection. {_HELP}") from None
        for item in self.items:
            self._add(item, modules, argument)

    def _add(self, item: Any, modules: set[str], argument: str) -> None:
        if isinstance(item, bool) or (not isinstance(item, (str, int)) and not callable(item)):
            raise TypeError(f"{argument} holds {item!r} ({type(item).__name__}). {_HELP}")
        if isinstance(item, int):
            (self.ordinals if item >= 0 else self.negative_ordinals).add(item)
        elif callable(item):
            self.predicates.append(item)
        elif not item:
            raise ValueError(f"{argument} holds an empty string. {_HELP}")
        elif (module := _MODULE.fullmatch(item)) and module.group("name") in modules:
            self.modules.append(_split_pass(module))
        elif label := _LABEL.fullmatch(item):
            self.labels.append(_split_pass(label))
        elif "." in item and not any(item in address for address in modules):
            # labels have no dots: this can only name a module, and no module has it
            close = difflib.get_close_matches(item, sorted(modules), n=5, cutoff=0.5)
            raise LayerNotFoundError(
                f"{argument} holds {item!r}, which is no module address of the model nor part of one"
                + (f" (closest: {', '.join(close)})" if close else "")
                + "; dict(model.named_modules()) lists the addresses."
            )
        else:
            self.substrings.append(item)

    @property
    def is_empty(self) -> bool:
        return self.spec is None

    @property
    def decided_at_end(self) -> bool:
        """Whether every output must be held until the pass is over."""
        return bool(self.negative_ordinals or self.predicates)

    def keep_at_op(self, entry: Layer) -> bool:
        """Whether to hold this op's output now (a superset of what :meth:`selects` keeps)."""
        if self.everything or self.decided_at_end:
            return True
        if entry.index in self.ordinals:
            return True
        if self.labels or self.substrings:
            layer_label = f"{entry.layer_type}_{entry.type_index}_{entry.layer_index}"
            if any(s in layer_label or _in_modules(s, entry) for s in self.substrings):
                return True
            return any(self._label_matches(entry, name, n) for name, n in self.labels)
        return False

    def keep_module_output(self, address: str, call: int) -> bool:
        return any(name == address and n in (None, call) for name, n in self.modules)

    @staticmethod
    def _label_matches(entry: Layer, name: str, pass_num: int | None) -> bool:
        short = f"{entry.layer_type}_{entry.type_index}"
        full = f"{short}_{entry.layer_index}"
        return name in (short, full) and pass_num in (None, entry.pass_num)

    def matched_items(self, entry: Layer, num_entries: int) -> list[Any]:
        """The items of the selection that pick this (finished) layer."""
        if self.everything:
            return ["all"]
        found: list[Any] = []
        if entry.index in self.ordinals:
            found.append(entry.index)
        if entry.index - num_entries in self.negative_ordinals:
            found.append(entry.index - num_entries)
        found += [s for s in self.substrings if s in entry.layer_label or _in_modules(s, entry)]
        found += [f"{n}:{p}" if p else n for n, p in self.labels if self._label_matches(entry, n, p)]
        for name, n in self.modules:
            tags = entry.output_of_modules
            if (n is None and any(t.rpartition(":")[0] == name for t in tags)) or f"{name}:{n}" in tags:
                found.append(f"{name}:{n}" if n else name)
        found += [p for p in self.predicates if p(entry)]
        return found
