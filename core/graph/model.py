"""The graph of a captured forward pass as plain data: nodes, edges and nested module boxes.

Every drawing starts here (graphviz in :mod:`lens_core.graph.render`, a TensorBoard GraphDef later), so
the decisions live in one place and import nothing but the history: which layer passes become one
node (``vis_opt``), which module calls become nested boxes and which are collapsed into a single
node (``vis_nesting_depth``), and which edges carried a gradient back.

Two rules keep big graphs readable:

- a module call that ran a single op (a leaf ``nn.Conv2d``, a ``Sequential`` wrapping one layer)
  gets no box of its own: its op stands for it and carries its address;
- ``vis_nesting_depth=k`` draws the modules of levels ``1 .. k-1`` as boxes and each call of a
  level-``k`` module as one node (top-level modules are level 1), like TorchLens. The default,
  1000, draws everything.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from lens_core.capture.records import Layer, ParamInfo

if TYPE_CHECKING:
    from lens_core.capture.history import ModelHistory

__all__ = [
    "GraphCluster",
    "GraphEdge",
    "GraphNode",
    "ModelGraph",
    "NodeKind",
    "VisOpt",
    "build_graph",
    "check_nesting_depth",
    "check_vis_opt",
]

VisOpt = Literal["unrolled", "rolled"]
NodeKind = Literal["input", "output", "op", "module"]
_H = TypeVar("_H", bound=Hashable)


@dataclass(frozen=True, slots=True)
class GraphCluster:
    """A module drawn as a box around the nodes that ran inside it."""

    id: str
    """Unique id: the module call path (``features:1/features.6:1``), or the address path
    (``features/features.6``) in a rolled graph."""
    address: str
    """Module address (``features.6``)."""
    module_type: str
    """Class name of the module (``Conv2d``)."""
    call: int | None
    """Which call of the module the box is (unrolled); None in a rolled graph (all calls)."""
    num_calls: int
    """How many times the module ran in the whole pass."""
    parent: str | None
    """Id of the enclosing cluster, None at top level."""
    depth: int
    """Nesting level: 1 for a top-level module."""


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One drawn node: a layer pass (unrolled), a layer (rolled) or a collapsed module call."""

    id: str
    """Unique id: the layer label (``linear_1_1:2``; ``linear_1_1`` rolled), or ``@`` and the module
    call (``@features:1``; ``@features`` rolled) for a collapsed module."""
    kind: NodeKind
    title: str
    """What the node is called in a drawing: ``linear_1_1:2``, ``linear_1_1``, ``@features``."""
    func_name: str
    """The torch callable (``conv2d``); for a collapsed module its class (``Sequential``)."""
    shapes: tuple[tuple[int, ...], ...]
    """Distinct output shapes (several when a rolled layer's passes differ); for a collapsed module
    the shapes of its outputs."""
    dtype: str
    """Output dtype without the ``torch.`` prefix (``float32``); empty if unknown."""
    num_bytes: int
    """Size of the (first) output."""
    params: tuple[ParamInfo, ...]
    """Distinct parameters used, by name."""
    buffers: tuple[str, ...]
    """Distinct buffer addresses read."""
    passes: tuple[int, ...]
    """Pass numbers merged into the node (module call numbers for a collapsed module)."""
    layers: tuple[str, ...]
    """Labels of every layer pass the node stands for, in execution order."""
    cluster: str | None
    """Id of the innermost enclosing :class:`GraphCluster`, None at top level."""
    module: str | None
    """Address of the module this node stands for: the collapsed module, or the module whose
    single op this is (drawn without a box of its own); with ``:call`` when unrolled and called
    more than once."""
    module_calls: int
    """How many times :attr:`module` ran (1 without a module)."""
    num_ops: int
    """Ops a collapsed module ran (the most of any of its calls when rolled); 1 for a layer."""
    is_inplace: bool
    from_input: bool
    """Whether a model input flows into it (False for constants created inside the model)."""
    has_gradient: bool
    """Whether a backward pass reached one of its outputs."""

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def num_passes(self) -> int:
        return len(self.passes)


@dataclass(frozen=True, slots=True)
class GraphEdge:
    """Data flowing from one node to another, in one or more passes."""

    source: str
    target: str
    source_passes: tuple[int, ...]
    """Passes of the source node whose output travelled along the edge."""
    target_passes: tuple[int, ...]
    """Passes of the target node that read it."""
    gradient: bool
    """Whether a gradient flowed back along the edge (both ends received one)."""


@dataclass(frozen=True, slots=True)
class ModelGraph:
    """Nodes, edges and clusters of one forward pass, in a stable order (execution order)."""

    model_name: str
    vis_opt: VisOpt
    nesting_depth: int
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]
    clusters: tuple[GraphCluster, ...]
    """Every drawn module box, parents before children."""
    num_layers: int
    """Layer passes of the history (more than the nodes when rolled or collapsed)."""
    total_params: int
    _nodes_by_id: dict[str, GraphNode] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_nodes_by_id", {node.id: node for node in self.nodes})

    def node(self, node_id: str) -> GraphNode:
        """The node with this id; the ``KeyError`` names the closest ids."""
        found = self._nodes_by_id.get(node_id)
        if found is None:
            close = difflib.get_close_matches(node_id, list(self._nodes_by_id), n=5, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise KeyError(f"graph.node({node_id!r}): no node has that id.{hint} All are in graph.nodes.")
        return found


def check_vis_opt(vis_opt: object) -> VisOpt:
    """``vis_opt`` as a :data:`VisOpt`, or a ``ValueError`` that says what to pass."""
    if vis_opt == "unrolled":
        return "unrolled"
    if vis_opt == "rolled":
        return "rolled"
    raise ValueError(
        f"vis_opt={vis_opt!r}: use 'unrolled' (one node per pass of each layer) or 'rolled' "
        "(one node per layer, its passes merged)."
    )


def check_nesting_depth(vis_nesting_depth: object) -> int:
    """``vis_nesting_depth`` as an int >= 1, or a ``ValueError`` that says what to pass."""
    if isinstance(vis_nesting_depth, bool) or not isinstance(vis_nesting_depth, int) or vis_nesting_depth < 1:
        raise ValueError(
            f"vis_nesting_depth={vis_nesting_depth!r}: use an int >= 1; 1 draws each top-level module "
            "as one node, 2 opens them one level, and the default 1000 draws every module as a box."
        )
    return vis_nesting_depth


# -- building ----------------------------------------------------------------------------------


class _UniqueIds:
    """Readable, unique ids: the wanted text, suffixed ``~2``, ``~3`` only on a clash."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, str] = {}
        self._taken: set[str] = set()

    def get(self, key: Hashable, wanted: str) -> str:
        found = self._by_key.get(key)
        if found is None:
            found, n = wanted, 2
            while found in self._taken:
                found, n = f"{wanted}~{n}", n + 1
            self._by_key[key] = found
            self._taken.add(found)
        return found


def _address(tag: str) -> str:
    return tag.rpartition(":")[0]


def _call(tag: str) -> int:
    return int(tag.rpartition(":")[2])


def _common_prefix(paths: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    first = paths[0]
    size = len(first)
    for path in paths[1:]:
        size = min(size, len(path))
        for i in range(size):
            if path[i] != first[i]:
                size = i
                break
    return first[:size]


@dataclass(slots=True)
class _Placement:
    """Where one layer pass goes: its node, its pass on that node, the boxes around it."""

    key: tuple[str, ...]
    """("layer", label) or ("module", *unit path)."""
    node_pass: int
    clusters: tuple[str, ...]
    """Unit path of the innermost enclosing box (units are call tags, or addresses rolled)."""
    collapsed_into: str | None
    """Call tag of the collapsed module the pass sits in."""
    single_op_module: str | None
    """Call tag of the innermost module whose only op this is."""


class _Builder:
    def __init__(self, history: ModelHistory, vis_opt: VisOpt, depth: int) -> None:
        self.history = history
        self.rolled = vis_opt == "rolled"
        self.depth = depth
        self.layers = _layers_by_label(history)
        # Ops run inside each module call, and the most of any call of a rolled module path.
        self.ops_per_call: dict[str, int] = {}
        for layer in history.layer_list:
            for tag in layer.module_stack:
                self.ops_per_call[tag] = self.ops_per_call.get(tag, 0) + 1
        self.ops_per_path: dict[tuple[str, ...], int] = {}
        for layer in history.layer_list:
            path = self._units(layer.module_stack)
            for i, tag in enumerate(layer.module_stack):
                prefix = path[: i + 1]
                self.ops_per_path[prefix] = max(self.ops_per_path.get(prefix, 0), self.ops_per_call[tag])

    def _units(self, stack: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_address(tag) for tag in stack) if self.rolled else stack

    def place(self, layer: Layer) -> _Placement:
        stack = layer.module_stack
        path = self._units(stack)
        for i, tag in enumerate(stack):
            if self.ops_per_path[path[: i + 1]] <= 1:  # nothing but this op: no box of its own
                return _Placement(self._layer_key(layer), layer.pass_num, path[:i], None, stack[-1])
            if i + 1 >= self.depth:
                return _Placement(("module", *path[: i + 1]), _call(tag), path[:i], tag, None)
        return _Placement(self._layer_key(layer), layer.pass_num, path, None, None)

    def _layer_key(self, layer: Layer) -> tuple[str, ...]:
        return ("layer", layer.layer_label if self.rolled else layer.label)

    def build(self) -> ModelGraph:
        history = self.history
        from_input: dict[str, bool] = {}
        for layer in history.layer_list:  # parents always come first in execution order
            from_input[layer.label] = layer.is_input or any(from_input.get(p, False) for p in layer.parents)

        placements = {layer.label: self.place(layer) for layer in history.layer_list}
        groups: dict[tuple[str, ...], list[Layer]] = {}
        for layer in history.layer_list:
            groups.setdefault(placements[layer.label].key, []).append(layer)

        node_ids = _UniqueIds()
        cluster_ids = _UniqueIds()
        clusters: dict[tuple[str, ...], GraphCluster] = {}
        nodes: list[GraphNode] = []
        for key, members in groups.items():
            spots = [placements[layer.label] for layer in members]
            cluster_path = _common_prefix([spot.clusters for spot in spots])
            cluster = self._cluster(cluster_path, clusters, cluster_ids)
            if key[0] == "module":
                nodes.append(self._module_node(key, members, spots, cluster, node_ids, from_input))
            else:
                nodes.append(self._layer_node(key, members, spots, cluster, node_ids, from_input))
        ids = {key: node.id for key, node in zip(groups, nodes, strict=True)}
        return ModelGraph(
            model_name=history.model_name,
            vis_opt="rolled" if self.rolled else "unrolled",
            nesting_depth=self.depth,
            nodes=tuple(nodes),
            edges=self._edges(placements, ids),
            clusters=tuple(clusters.values()),
            num_layers=len(history.layer_list),
            total_params=history.total_params,
        )

    def _cluster(
        self,
        path: tuple[str, ...],
        clusters: dict[tuple[str, ...], GraphCluster],
        ids: _UniqueIds,
    ) -> str | None:
        """Id of the box for ``path``, registering it and the boxes around it first."""
        if not path:
            return None
        known = clusters.get(path)
        if known is not None:
            return known.id
        parent = self._cluster(path[:-1], clusters, ids)
        unit = path[-1]
        address = unit if self.rolled else _address(unit)
        cluster = GraphCluster(
            id=ids.get(path, "/".join(path)),
            address=address,
            module_type=self.history.module_types.get(address, "Module"),
            call=None if self.rolled else _call(unit),
            num_calls=self.history.module_calls.get(address, 1),
            parent=parent,
            depth=len(path),
        )
        clusters[path] = cluster
        return cluster.id

    def _module_tag(self, tag: str | None) -> tuple[str | None, int]:
        """How a node names the module it stands for, and how often that module ran."""
        if tag is None:
            return None, 1
        address = _address(tag)
        calls = self.history.module_calls.get(address, 1)
        return (tag if calls > 1 and not self.rolled else address), calls

    def _layer_node(
        self,
        key: tuple[str, ...],
        members: list[Layer],
        spots: list[_Placement],
        cluster: str | None,
        ids: _UniqueIds,
        from_input: dict[str, bool],
    ) -> GraphNode:
        first = members[0]
        module, calls = self._module_tag(spots[0].single_op_module)
        if first.is_input:
            kind: NodeKind = "input"
        elif first.is_output:
            kind = "output"
        else:
            kind = "op"
        title = key[1] + (f" (x{len(members)})" if self.rolled and len(members) > 1 else "")
        return GraphNode(
            id=ids.get(key, key[1]),
            kind=kind,
            title=title,
            func_name=first.func_name,
            shapes=_distinct(layer.shape for layer in members),
            dtype=str(first.dtype).removeprefix("torch."),
            num_bytes=first.nbytes,
            params=_distinct_params(members),
            buffers=_distinct(b for layer in members for b in layer.buffers),
            passes=tuple(sorted({spot.node_pass for spot in spots})),
            layers=tuple(layer.label for layer in members),
            cluster=cluster,
            module=module,
            module_calls=calls,
            num_ops=1,
            is_inplace=any(layer.is_inplace for layer in members),
            from_input=any(from_input[layer.label] for layer in members),
            has_gradient=any(_has_gradient(layer) for layer in members),
        )

    def _module_node(
        self,
        key: tuple[str, ...],
        members: list[Layer],
        spots: list[_Placement],
        cluster: str | None,
        ids: _UniqueIds,
        from_input: dict[str, bool],
    ) -> GraphNode:
        tags = _distinct(spot.collapsed_into for spot in spots if spot.collapsed_into is not None)
        address = _address(tags[0])
        module, calls = self._module_tag(tags[0])
        outputs = [layer for layer in members if any(tag in layer.output_of_modules for tag in tags)]
        shown = outputs or members[-1:]
        ops_per_call = Counter(spot.collapsed_into for spot in spots)
        return GraphNode(
            id=ids.get(key, "@" + (module or address)),
            kind="module",
            title="@" + (module or address) + (f" (x{len(tags)})" if self.rolled and len(tags) > 1 else ""),
            func_name=self.history.module_types.get(address, "Module"),
            shapes=_distinct(layer.shape for layer in shown),
            dtype=str(shown[0].dtype).removeprefix("torch."),
            num_bytes=shown[0].nbytes,
            params=_distinct_params(members),
            buffers=_distinct(b for layer in members for b in layer.buffers),
            passes=tuple(sorted({spot.node_pass for spot in spots})),
            layers=tuple(layer.label for layer in members),
            cluster=cluster,
            module=module,
            module_calls=calls,
            num_ops=max(ops_per_call.values()),
            is_inplace=False,
            from_input=any(from_input[layer.label] for layer in members),
            has_gradient=any(_has_gradient(layer) for layer in members),
        )

    def _edges(
        self, placements: dict[str, _Placement], ids: dict[tuple[str, ...], str]
    ) -> tuple[GraphEdge, ...]:
        found: dict[tuple[str, str], tuple[set[int], set[int], list[bool]]] = {}
        for child in self.history.layer_list:
            child_spot = placements[child.label]
            for parent_label in child.parents:
                parent = self.layers[parent_label]
                parent_spot = placements[parent_label]
                inside = child_spot.collapsed_into
                if inside is not None and inside == parent_spot.collapsed_into:
                    continue  # both ends are inside the same collapsed module call
                pair = (ids[parent_spot.key], ids[child_spot.key])
                sources, targets, gradient = found.setdefault(pair, (set(), set(), [False]))
                sources.add(parent_spot.node_pass)
                targets.add(child_spot.node_pass)
                gradient[0] = gradient[0] or _carried_gradient(parent, child)
        return tuple(
            GraphEdge(source, target, tuple(sorted(sources)), tuple(sorted(targets)), gradient[0])
            for (source, target), (sources, targets, gradient) in found.items()
        )


def _layers_by_label(history: ModelHistory) -> dict[str, Layer]:
    """Each layer by its label, once checked that labels are unique and parents are layers.

    A capture makes them so and ``lens_core.load`` refuses a saved history that is not; a
    history changed by hand may not be, and its graph would silently lose nodes or edges.
    """
    layers: dict[str, Layer] = {}
    for layer in history.layer_list:
        if layer.label in layers:
            raise ValueError(
                f"build_graph: layers {layers[layer.label].index} and {layer.index} of the history are both "
                f"labelled {layer.label!r}; a graph needs one label per layer pass, as a capture makes them."
            )
        layers[layer.label] = layer
    for layer in history.layer_list:
        unknown = next((label for label in layer.parents if label not in layers), None)
        if unknown is not None:
            raise ValueError(
                f"build_graph: layer {layer.label!r} names the parent {unknown!r}, which is the label of no "
                "layer of the history (history.all_layer_labels lists them); capture the history again."
            )
    return layers


def _has_gradient(layer: Layer) -> bool:
    """Whether a gradient reached the layer, without loading one stored on disk."""
    slot = layer.gradient_slot
    return slot is not None and slot.arrived


def _carried_gradient(parent: Layer, child: Layer) -> bool:
    """Whether the backward pass went from ``child`` back to ``parent``.

    Both received a gradient; or the child did and the parent's output was not watched (not
    saved) but is part of the autograd graph, so the gradient went on through it.
    """
    if not _has_gradient(child):
        return False
    if _has_gradient(parent):
        return True
    return parent.gradient_slot is None and parent.grad_fn_name is not None


def _distinct(items: Iterable[_H]) -> tuple[_H, ...]:
    return tuple(dict.fromkeys(items))


def _distinct_params(layers: Iterable[Layer]) -> tuple[ParamInfo, ...]:
    by_name: dict[str, ParamInfo] = {}
    for layer in layers:
        for param in layer.params:
            by_name.setdefault(param.name, param)
    return tuple(by_name.values())


def build_graph(
    history: ModelHistory, vis_opt: str = "unrolled", vis_nesting_depth: int = 1000
) -> ModelGraph:
    """The graph of ``history``, as drawn with these options; reads the history, changes nothing.

    Args:
        history: a captured forward pass.
        vis_opt: ``"unrolled"`` (a node per pass of each layer) or ``"rolled"`` (a node per
            layer; edges say which passes they belong to).
        vis_nesting_depth: modules of levels below it are boxes; each call of a module at this
            level is one node (top-level modules are level 1).

    Raises:
        ValueError: an option has a value it cannot take, or the history's labels are not unique
            or name parents it does not hold (a history changed by hand).
    """
    return _Builder(history, check_vis_opt(vis_opt), check_nesting_depth(vis_nesting_depth)).build()
