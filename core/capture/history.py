"""``ModelHistory``: the record of one captured forward pass, indexed the TorchLens way."""

from __future__ import annotations

import difflib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lens_core._format import format_history
from lens_core.capture.records import Layer, ParentRef
from lens_core.errors import LayerNotFoundError

__all__ = ["ModelHistory"]


@dataclass(eq=False)
class ModelHistory:
    """Every op of a forward pass (one :class:`Layer` per pass), with model-level facts.

    Index it by any of the keys TorchLens accepts, all naming the same layer::

        history["conv2d_3_7"]      # label: 3rd conv2d, 7th layer overall
        history["conv2d_3"]        # label without the overall number
        history["conv2d_3_7:1"]    # with the pass
        history["features.6"]      # the module whose output it is (also "features.6:1")
        history[7], history[-17]   # ordinal position, inputs and outputs included
    """

    model_name: str
    layer_list: list[Layer]
    """Every layer pass in execution order."""
    layer_labels: list[str]
    """Labels of the layers asked for: all of them for ``layers_to_save="all"`` or ``None``,
    else the selected ones (as in TorchLens). :attr:`all_layer_labels` always lists every one."""
    module_addresses: list[str]
    """Addresses of every submodule of the model (``features``, ``features.0``, ...)."""
    module_types: dict[str, str]
    """Class name of each module address."""
    module_calls: dict[str, int]
    """How many times each module ran (its number of passes)."""
    total_params: int
    total_param_bytes: int
    random_seed: int | None
    """Seed set before the pass, if one was asked for (``random_seed=``)."""
    rng_states: dict[str, Any] = field(repr=False)
    """RNG states (``cpu``, ``cuda:N``) at the start of the capture, to replay random ops."""
    elapsed_time: float
    _lookup: dict[str, Layer | list[Layer]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # The lookup table is built when first needed: a training capture may never index by name.
        owner = weakref.ref(self)
        for layer in self.layer_list:
            layer.history_ref = owner

    def __del__(self) -> None:
        # A layer that outlives its history still answers lookup_keys: work them out now if
        # anything besides this history holds a layer (the list, the loop and the call hold 3).
        if self._lookup is None and any(sys.getrefcount(layer) > 3 for layer in self.layer_list):
            self._build_lookup()

    @property
    def lookup(self) -> dict[str, Layer | list[Layer]]:
        """Every string key with the layer it names, or the layers when it names several."""
        if self._lookup is None:
            self._build_lookup()
            assert self._lookup is not None
        return self._lookup

    def _build_lookup(self) -> None:
        """The lookup table, and each layer's :attr:`~Layer.lookup_keys` (the keys naming it alone)."""
        lookup = self._lookup = _lookup_table(self.layer_list)
        count = len(self.layer_list)
        for layer in self.layer_list:
            keys = [layer.label, f"{layer.layer_label}:{layer.pass_num}"]
            for tag in reversed(layer.output_of_modules):  # outermost module first
                keys += (tag.rpartition(":")[0], tag)
            unique = [key for key in dict.fromkeys(keys) if lookup[key] is layer]
            layer.keys = (layer.index - count, layer.index, *unique)

    # -- indexing ------------------------------------------------------------------------------

    def __getitem__(self, key: str | int) -> Layer:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(
                f"history[{key!r}]: index with a layer label, module address or int ordinal, "
                f"not {type(key).__name__}."
            )
        if isinstance(key, int):
            if -len(self) <= key < len(self):
                return self.layer_list[key]
            raise IndexError(
                f"history[{key}]: ordinal out of range; this history has {len(self)} layers "
                f"(valid: {-len(self)} to {len(self) - 1})."
            )
        found = self.lookup.get(key)
        if isinstance(found, Layer):
            return found
        if found is not None:
            labels = [layer.label for layer in found]
            raise LayerNotFoundError(
                f"history[{key!r}] is ambiguous: it names {len(found)} layers "
                f"({', '.join(labels)}). Index one of them, e.g. history[{labels[0]!r}]."
            )
        close = difflib.get_close_matches(key, list(self.lookup), n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise LayerNotFoundError(
            f"history[{key!r}]: no layer or module has that name.{hint} All layers are in "
            f"history.all_layer_labels, modules in history.module_addresses."
        )

    def __contains__(self, key: object) -> bool:
        if isinstance(key, int) and not isinstance(key, bool):
            return -len(self) <= key < len(self)
        return isinstance(key, str) and isinstance(self.lookup.get(key), Layer)

    def __len__(self) -> int:
        return len(self.layer_list)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layer_list)

    def __str__(self) -> str:
        return format_history(self)

    def backward(self, key: str | int, gradient: torch.Tensor | None = None) -> None:
        """Backpropagates from any saved layer, filling in ``gradient`` of the layers before it.

        Args:
            key: any key of the layer (label, module address, ordinal).
            gradient: gradient of the output to start from; ones (the gradient of its sum)
                by default.
        """
        layer = self[key]
        tensor = layer.tensor_contents
        if tensor is None or not tensor.requires_grad:
            why = "was not saved" if tensor is None else "does not require grad"
            raise ValueError(
                f"history.backward({key!r}): the output of {layer.label} {why}. Save it "
                "(layers_to_save) with save_gradients=True, from a pass with grad enabled."
            )
        torch.autograd.backward(tensor, torch.ones_like(tensor) if gradient is None else gradient)

    # -- drawing (lens_core.graph.render; graphviz is imported only when one of these runs) ------------

    def graph_source(
        self, vis_opt: str = "unrolled", vis_nesting_depth: int = 1000, vis_direction: str = "bottomup"
    ) -> str:
        """The DOT source of the graph, without rendering it (no ``dot`` binary needed).

        Args: as :meth:`render_graph`.
        """
        from lens_core.graph import render  # noqa: PLC0415  # drawing code loads when a drawing is asked for

        return render.graph_source(self, vis_opt, vis_nesting_depth, vis_direction)

    def to_digraph(
        self, vis_opt: str = "unrolled", vis_nesting_depth: int = 1000, vis_direction: str = "bottomup"
    ) -> Any:
        """The graph as a ``graphviz.Digraph`` (shown inline by Jupyter), not rendered.

        Args: as :meth:`render_graph`.
        """
        from lens_core.graph import render  # noqa: PLC0415  # drawing code loads when a drawing is asked for

        return render.to_digraph(self, vis_opt, vis_nesting_depth, vis_direction)

    def render_graph(
        self,
        vis_opt: str = "unrolled",
        vis_nesting_depth: int = 1000,
        vis_outpath: str = "modelgraph",
        vis_fileformat: str = "pdf",
        vis_direction: str = "bottomup",
        timeout: float = 60.0,  # lens_core.graph.render.DEFAULT_TIMEOUT
    ) -> str:
        """Renders the graph with graphviz's ``dot`` to ``{vis_outpath}.{vis_fileformat}``.

        The history is only read, never changed.

        Args:
            vis_opt: ``"unrolled"`` (a node per pass of each layer) or ``"rolled"`` (a node per
                layer, ``(x4)``; edges say which passes they belong to).
            vis_nesting_depth: modules of levels below it are drawn as boxes, each call of a
                module at this level as one node (top-level modules are level 1); 1000 draws all.
            vis_outpath: the file to write, without extension.
            vis_fileformat: an output format of ``dot`` (``pdf``, ``png``, ``svg``...).
            vis_direction: ``"bottomup"``, ``"topdown"`` or ``"leftright"``.
            timeout: seconds ``dot`` may take; past it a ``RenderTimeoutError`` says which
                ``vis_nesting_depth`` draws fewer nodes.

        Returns:
            The path of the rendered file.
        """
        from lens_core.graph import render  # noqa: PLC0415  # drawing code loads when a drawing is asked for

        return render.render_graph(
            self, vis_opt, vis_nesting_depth, vis_outpath, vis_fileformat, vis_direction, timeout
        )

    def param_gradients(self, key: str | int) -> dict[str, torch.Tensor]:
        """This op's own contribution to its parameters' gradients, in this pass.

        ``.grad`` adds up every use of a parameter (a module called twice, a loop); this is the
        gradient through one op: the op is re-run on its saved inputs and the gradient of its
        output is backpropagated to the parameters alone. Needs the op's arguments
        (``save_function_args=True``), its output's ``gradient`` and its parents' outputs.

        Returns:
            Parameter name -> gradient (parameters the output does not depend on are left out).
        """
        layer = self[key]
        if layer.call is None or layer.func is None or layer.gradient is None:
            missing = "its arguments (save_function_args=True)" if layer.call is None else (
                "its gradient (gradients=True, then a backward pass)")
            raise ValueError(f"history.param_gradients({key!r}): {layer.label} has no {missing}.")
        names = iter(p.name for p in layer.params)
        leaves: dict[int, tuple[str, torch.Tensor]] = {}  # id(parameter) -> (name, fresh leaf)

        def resolve(value: Any) -> Any:
            if isinstance(value, ParentRef):
                saved = self.layer_list[value.index].tensor_contents
                if saved is None:
                    raise ValueError(
                        f"history.param_gradients({key!r}): its input {self.layer_list[value.index].label} "
                        "was not saved; save it too (layers_to_save)."
                    )
                return saved.detach()
            if isinstance(value, torch.nn.Parameter):  # named in the order the recorder met them
                if id(value) not in leaves:
                    leaves[id(value)] = (next(names), value.detach().requires_grad_())
                return leaves[id(value)][1]
            if type(value) in (list, tuple):
                return type(value)(resolve(v) for v in value)
            return value

        args = tuple(resolve(a) for a in layer.call.args)
        kwargs = {k: resolve(v) for k, v in layer.call.kwargs.items()}
        with torch.enable_grad():
            out = layer.func(*args, **kwargs)
            if layer.output_index is not None:
                out = out[layer.output_index]
            inputs = [leaf for _, leaf in leaves.values()]
            grads = torch.autograd.grad(out, inputs, layer.gradient, allow_unused=True)
        return {name: g for (name, _), g in zip(leaves.values(), grads, strict=True) if g is not None}

    # -- model-level facts ---------------------------------------------------------------------

    @property
    def all_layer_labels(self) -> list[str]:
        return [layer.label for layer in self.layer_list]

    @property
    def input_layers(self) -> list[str]:
        return [layer.label for layer in self.layer_list if layer.is_input]

    @property
    def output_layers(self) -> list[str]:
        return [layer.label for layer in self.layer_list if layer.is_output]

    @property
    def saved_layers(self) -> list[Layer]:
        return [layer for layer in self.layer_list if layer.has_saved_activations]

    @property
    def num_tensors_saved(self) -> int:
        return len(self.saved_layers)

    @property
    def total_activation_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layer_list)

    @property
    def saved_activation_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.saved_layers)

    @property
    def max_passes(self) -> int:
        return max((layer.num_passes for layer in self.layer_list), default=0)

    @property
    def is_recurrent(self) -> bool:
        """Whether some layer ran more than once (a loop, or a module called again)."""
        return self.max_passes > 1

    @property
    def is_branching(self) -> bool:
        """Whether some layer's output fed more than one later op (output layers do not count:
        a model output that also feeds the loss is not a branch of the model)."""
        outputs = set(self.output_layers)
        return any(len([c for c in layer.children if c not in outputs]) > 1 for layer in self.layer_list)

    @property
    def module_hierarchy(self) -> dict[str, list[str]]:
        """Top-level modules mapped to every module nested inside them."""
        tree: dict[str, list[str]] = {}
        for address in self.module_addresses:
            top = address.split(".", 1)[0]
            tree.setdefault(top, [])
            if address != top:
                tree[top].append(address)
        return tree


def _lookup_table(layers: list[Layer]) -> dict[str, Layer | list[Layer]]:
    """Labels (with and without pass and overall number) and module calls -> the layers they name."""
    named: dict[str, Layer | list[Layer]] = {}
    for layer in layers:
        label, short = layer.layer_label, f"{layer.layer_type}_{layer.type_index}"
        number = f":{layer.pass_num}"
        keys = [label, label + number, short, short + number]
        for tag in layer.output_of_modules:
            keys += (tag, tag.rpartition(":")[0])
        for key in keys:
            same = named.setdefault(key, layer)
            if same is layer:
                continue
            if isinstance(same, Layer):
                named[key] = [same, layer]
            elif same[-1] is not layer:
                same.append(layer)
    return named
