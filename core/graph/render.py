"""Drawing a forward pass with graphviz: DOT source, ``graphviz.Digraph``, files rendered by ``dot``.

The only module of lens_core that touches graphviz, and only when a drawing is asked for: the
Python package is imported inside the functions (with an install hint), and the ``dot`` binary
runs in a subprocess with a timeout, so a graph too big to lay out fails with advice
(``vis_nesting_depth``) instead of hanging. What is drawn is decided in :mod:`lens_core.graph`;
this module only styles it.

Legend: green oval = input, red oval = output, grey rounded box = op with parameters (their
shapes listed), white rounded box = op without, double outline = op that read buffers, 3-D box =
a collapsed module call, dashed outline = computed from no input (a constant), frame titled
``@address`` and class = a module, blue arrow pointing back = a gradient flowed along that edge.
"""

from __future__ import annotations

import html
import importlib
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lens_core._format import human_bytes
from lens_core.errors import LensError
from lens_core.graph.model import (
    GraphCluster,
    GraphEdge,
    GraphNode,
    ModelGraph,
    build_graph,
    check_nesting_depth,
    check_vis_opt,
)

if TYPE_CHECKING:
    from torch import nn

    from lens_core.capture.history import ModelHistory

__all__ = [
    "DEFAULT_TIMEOUT",
    "RenderError",
    "RenderTimeoutError",
    "check_render_options",
    "digraph_of",
    "graph_source",
    "render_graph",
    "show_model_graph",
    "to_digraph",
]

_RANKDIR = {"bottomup": "BT", "topdown": "TB", "leftright": "LR"}
DEFAULT_TIMEOUT = 60.0
"""Seconds ``dot`` may take before :func:`render_graph` gives up."""

# Output formats of the dot binary (``dot -T?``); the exotic ones depend on how it was built.
_FORMATS = frozenset((
    "bmp", "canon", "cmap", "cmapx", "dot", "eps", "fig", "gd", "gd2", "gif", "gv", "imap", "ismap",
    "jpe", "jpeg", "jpg", "json", "json0", "pdf", "pic", "plain", "plain-ext", "png", "pov", "ps",
    "ps2", "svg", "svgz", "tif", "tiff", "tk", "vml", "vrml", "wbmp", "webp", "xdot", "xdot_json",
))

INPUT_COLOR = "#98FB98"
OUTPUT_COLOR = "#FF9999"
PARAMS_COLOR = "#E6E6E6"
GRADIENT_COLOR = "#3B6FD6"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.@~-]")
_MAX_LISTED = 4  # parameter or shape entries listed on a node before "+N more"


class RenderError(LensError, RuntimeError):
    """The graph could not be drawn: ``dot`` is missing, failed, or took too long."""


class RenderTimeoutError(RenderError, TimeoutError):
    """``dot`` did not finish within the timeout; the message says how to draw fewer nodes."""


# -- options -----------------------------------------------------------------------------------


def _check_direction(vis_direction: object) -> str:
    """The ``rankdir`` of ``vis_direction``, or a ``ValueError`` that says what to pass."""
    rankdir = _RANKDIR.get(vis_direction) if isinstance(vis_direction, str) else None
    if rankdir is None:
        raise ValueError(
            f"vis_direction={vis_direction!r}: use 'bottomup' (inputs at the bottom, the default), "
            "'topdown' or 'leftright'."
        )
    return rankdir


def _check_fileformat(vis_fileformat: object) -> str:
    if not isinstance(vis_fileformat, str) or vis_fileformat not in _FORMATS:
        raise ValueError(
            f"vis_fileformat={vis_fileformat!r}: use an output format of graphviz's dot, e.g. "
            f"'pdf', 'png' or 'svg' (all: {', '.join(sorted(_FORMATS))})."
        )
    return vis_fileformat


def check_render_options(
    vis_opt: object = "unrolled",
    vis_nesting_depth: object = 1000,
    vis_fileformat: object = "pdf",
    vis_direction: object = "bottomup",
    timeout: object = DEFAULT_TIMEOUT,
) -> None:
    """Validates the drawing options, so a caller can fail before running the model.

    Raises:
        ValueError: an option has a value it cannot take (the message says which to use).
    """
    check_vis_opt(vis_opt)
    check_nesting_depth(vis_nesting_depth)
    _check_fileformat(vis_fileformat)
    _check_direction(vis_direction)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout={timeout!r}: use a number of seconds > 0 (default {DEFAULT_TIMEOUT}).")


def _graphviz() -> ModuleType:
    try:
        return importlib.import_module("graphviz")
    except ImportError as error:
        raise ImportError(
            'Drawing the graph needs the graphviz package: pip install "lens-callbacks[viz]" '
            "(rendering files also needs the dot binary: Debian package graphviz)."
        ) from error


# -- labels ------------------------------------------------------------------------------------


def _shape_text(shape: tuple[int, ...]) -> str:
    if len(shape) > 1:
        return "x".join(str(size) for size in shape)
    return f"x{shape[0]}" if shape else "scalar"


def _listed(items: list[str]) -> str:
    if len(items) <= _MAX_LISTED:
        return ", ".join(items)
    return ", ".join(items[:_MAX_LISTED]) + f", +{len(items) - _MAX_LISTED} more"


def _output_row(node: GraphNode) -> str:
    text = " | ".join(_shape_text(shape) for shape in node.shapes[:_MAX_LISTED])
    if len(node.shapes) > _MAX_LISTED:
        text += f" | +{len(node.shapes) - _MAX_LISTED} more"
    if node.dtype and node.dtype != "float32":
        text += f" {node.dtype}"
    if len(node.shapes) == 1:
        text += f" ({human_bytes(node.num_bytes)})"
    return text


def _node_label(node: GraphNode) -> str:
    """An HTML-like label: the title in bold, then one line per fact."""
    rows = [f"<B>{html.escape(node.title)}</B>"]
    if node.kind == "module":
        rows.append(node.func_name)
        ops = f"{node.num_ops} op{'s' if node.num_ops != 1 else ''}"
        rows.append(f"{ops}, {node.num_params:,} params" if node.params else ops)
    elif node.kind == "op":
        rows.append(node.func_name + (" (in-place)" if node.is_inplace else ""))
    rows.append(_output_row(node))
    if node.params and node.kind != "module":
        shapes = _listed([_shape_text(p.shape) for p in node.params])
        rows.append(f"params: {shapes} ({node.num_params:,})")
    if node.buffers and node.kind == "module":
        rows.append(f"{len(node.buffers)} buffer{'s' if len(node.buffers) != 1 else ''}")
    elif node.buffers:
        rows.append("buffers: " + _listed(list(dict.fromkeys(b.rpartition(".")[2] for b in node.buffers))))
    if node.module is not None and node.kind != "module":
        rows.append(f"@{node.module}")
    return "<" + "<BR/>".join(html.escape(row) if i else row for i, row in enumerate(rows)) + ">"


def _node_attrs(node: GraphNode) -> dict[str, str]:
    style = ["filled"]
    if node.kind == "input":
        shape, fill = "oval", INPUT_COLOR
    elif node.kind == "output":
        shape, fill = "oval", OUTPUT_COLOR
    elif node.kind == "module":
        shape, fill = "box3d", PARAMS_COLOR if node.params else "white"
    else:
        shape, fill = "box", PARAMS_COLOR if node.params else "white"
        style.append("rounded")
    if not node.from_input:
        style.append("dashed")
    attrs = {"shape": shape, "style": ",".join(style), "fillcolor": fill}
    if node.buffers:
        attrs["peripheries"] = "2"
    return attrs


def _cluster_label(cluster: GraphCluster) -> str:
    title = "@" + cluster.address
    if cluster.call is not None and cluster.num_calls > 1:
        title += f":{cluster.call}"
    elif cluster.call is None and cluster.num_calls > 1:
        title += f" (x{cluster.num_calls})"
    left = '<BR ALIGN="LEFT"/>'
    return f"<<B>{html.escape(title)}</B>{left}{html.escape(cluster.module_type)}{left}>"


def _passes_text(passes: tuple[int, ...]) -> str:
    """``(1, 2, 3, 5)`` as ``1-3,5``."""
    runs: list[str] = []
    start = previous = passes[0]
    for number in (*passes[1:], None):
        if number is not None and number == previous + 1:
            previous = number
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ",".join(runs)


def _edge_label(edge: GraphEdge, nodes: Mapping[str, GraphNode]) -> str | None:
    """Which passes a rolled edge belongs to, where it is not all of them."""
    parts = []
    if len(edge.source_passes) < nodes[edge.source].num_passes:
        parts.append(f"out {_passes_text(edge.source_passes)}")
    if len(edge.target_passes) < nodes[edge.target].num_passes:
        parts.append(f"in {_passes_text(edge.target_passes)}")
    return ", ".join(parts) or None


def _caption(graph: ModelGraph) -> str:
    mode: str = graph.vis_opt
    if any(node.kind == "module" for node in graph.nodes):
        mode += f", nesting depth {graph.nesting_depth}"
    facts = (
        f"{graph.num_layers} layer passes, {len(graph.nodes)} nodes ({mode}); "
        f"{graph.total_params:,} params"
    )
    return f"<<B>{html.escape(graph.model_name)}</B><BR/>{html.escape(facts)}>"


# -- graphviz ----------------------------------------------------------------------------------


def _cluster_name(cluster: GraphCluster) -> str:
    return cluster.address if cluster.call is None else f"{cluster.address}:{cluster.call}"


def _dot_ids(names: list[str], prefix: str = "") -> list[str]:
    """DOT-safe unique ids, in order: no ``:`` (port syntax in edges), no quotes; graphviz quotes."""
    taken: set[str] = set()
    result: list[str] = []
    for name in names:
        wanted = prefix + _ID_UNSAFE.sub("_", name.replace(":", "pass"))
        found, n = wanted, 2
        while found in taken:
            found, n = f"{wanted}~{n}", n + 1
        taken.add(found)
        result.append(found)
    return result


def digraph_of(graph: ModelGraph, vis_direction: str = "bottomup") -> Any:
    """The ``graphviz.Digraph`` of a built :class:`ModelGraph`."""
    rankdir = _check_direction(vis_direction)
    graphviz = _graphviz()
    node_ids = dict(zip(
        [node.id for node in graph.nodes], _dot_ids([node.id for node in graph.nodes]), strict=True
    ))
    names = _dot_ids([_cluster_name(cluster) for cluster in graph.clusters], prefix="cluster_")
    cluster_ids = dict(zip([cluster.id for cluster in graph.clusters], names, strict=True))
    nodes_in: dict[str | None, list[GraphNode]] = {}
    for node in graph.nodes:
        nodes_in.setdefault(node.cluster, []).append(node)
    clusters_in: dict[str | None, list[GraphCluster]] = {}
    for cluster in graph.clusters:
        clusters_in.setdefault(cluster.parent, []).append(cluster)

    # Cluster labels follow the rank direction: "b" puts them on top of a bottom-up graph.
    cluster_labelloc = "b" if rankdir == "BT" else "t"
    dot = graphviz.Digraph(
        name=graph.model_name,
        comment=f"lens_core graph of {graph.model_name}",
        graph_attr={
            "rankdir": rankdir, "label": _caption(graph), "labelloc": "t", "labeljust": "l",
            "fontname": "Helvetica", "fontsize": "12",
        },
        node_attr={"fontname": "Helvetica", "fontsize": "10", "color": "black"},
        edge_attr={"fontname": "Helvetica", "fontsize": "9"},
    )

    def add(container: Any, cluster_id: str | None) -> None:
        for node in nodes_in.get(cluster_id, ()):
            container.node(node_ids[node.id], _node_label(node), **_node_attrs(node))
        for cluster in clusters_in.get(cluster_id, ()):
            with container.subgraph(name=cluster_ids[cluster.id]) as box:
                width = max(1.0, 2.5 - 0.5 * (cluster.depth - 1))
                box.attr(label=_cluster_label(cluster), style="rounded", penwidth=f"{width:g}",
                         labeljust="l", labelloc=cluster_labelloc)
                add(box, cluster.id)

    add(dot, None)
    by_id = {node.id: node for node in graph.nodes}
    for edge in graph.edges:
        source, target = node_ids[edge.source], node_ids[edge.target]
        label = _edge_label(edge, by_id)
        dot.edge(source, target, **({"label": label} if label else {}))
        if edge.gradient:  # drawn on the same pair, pointing back: the way the gradient went
            dot.edge(source, target, color=GRADIENT_COLOR, dir="back", constraint="false")
    return dot


def to_digraph(
    history: ModelHistory,
    vis_opt: str = "unrolled",
    vis_nesting_depth: int = 1000,
    vis_direction: str = "bottomup",
) -> Any:
    """The ``graphviz.Digraph`` of ``history`` (nothing rendered; ``dot`` is not needed)."""
    check_render_options(vis_opt, vis_nesting_depth, vis_direction=vis_direction)
    return digraph_of(build_graph(history, vis_opt, vis_nesting_depth), vis_direction)


def graph_source(
    history: ModelHistory,
    vis_opt: str = "unrolled",
    vis_nesting_depth: int = 1000,
    vis_direction: str = "bottomup",
) -> str:
    """The DOT source of ``history``'s graph, the same for the same history (stable order)."""
    source: str = to_digraph(history, vis_opt, vis_nesting_depth, vis_direction).source
    return source


# -- rendering ---------------------------------------------------------------------------------


def _output_path(vis_outpath: str | os.PathLike[str], vis_fileformat: str) -> Path:
    if not isinstance(vis_outpath, (str, os.PathLike)):
        raise TypeError(f"vis_outpath must be a path (str), got {type(vis_outpath).__name__}.")
    path = Path(vis_outpath)
    if path.suffix[1:].lower() in _FORMATS:  # "graph.png" means the file, not "graph.png.pdf"
        path = path.with_suffix("")
    return path.with_name(f"{path.name}.{vis_fileformat}")


def _dot_binary() -> str:
    found = shutil.which("dot")
    if found is None:
        raise RenderError(
            "Rendering the graph needs graphviz's dot binary, which is not on PATH. Install the "
            "Debian package graphviz (sudo apt-get install graphviz; elsewhere "
            "https://graphviz.org/download/), or use history.graph_source() / history.to_digraph(), "
            "which need no dot."
        )
    return found


def _smaller_depths(history: ModelHistory, graph: ModelGraph) -> str:
    """Advice for a graph too big for dot: the node counts of shallower nesting depths."""
    options = []
    for depth in range(1, min(graph.nesting_depth, 6)):
        count = len(build_graph(history, graph.vis_opt, depth).nodes)
        if count < len(graph.nodes):
            options.append(f"vis_nesting_depth={depth} draws {count} nodes")
    if not options:
        return "This model has no modules to collapse; pass a longer timeout."
    return "Collapse modules to draw fewer nodes: " + "; ".join(options) + "; or pass a longer timeout."


def render_graph(
    history: ModelHistory,
    vis_opt: str = "unrolled",
    vis_nesting_depth: int = 1000,
    vis_outpath: str | os.PathLike[str] = "modelgraph",
    vis_fileformat: str = "pdf",
    vis_direction: str = "bottomup",
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Renders ``history``'s graph with ``dot`` to ``{vis_outpath}.{vis_fileformat}``.

    The history is only read. ``dot`` runs in a subprocess that is killed after ``timeout``
    seconds.

    Returns:
        The path of the rendered file.

    Raises:
        ValueError: an option has a value it cannot take.
        ImportError: the graphviz package is missing (``pip install "lens-callbacks[viz]"``).
        RenderError: the dot binary is missing (Debian package ``graphviz``) or failed.
        RenderTimeoutError: ``dot`` took longer than ``timeout``; the message gives the
            ``vis_nesting_depth`` values that draw fewer nodes.
    """
    check_render_options(vis_opt, vis_nesting_depth, vis_fileformat, vis_direction, timeout)
    out = _output_path(vis_outpath, vis_fileformat)
    binary = _dot_binary()
    graph = build_graph(history, vis_opt, vis_nesting_depth)
    source: str = digraph_of(graph, vis_direction).source
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [binary, f"-T{vis_fileformat}", "-o", str(out)],
            input=source.encode(), capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        out.unlink(missing_ok=True)
        raise RenderTimeoutError(
            f"dot did not finish within {timeout:g} s laying out {len(graph.nodes)} nodes and "
            f"{len(graph.edges)} edges of {history.model_name} (vis_opt={vis_opt!r}, "
            f"vis_nesting_depth={vis_nesting_depth}). {_smaller_depths(history, graph)}"
        ) from None
    message = done.stderr.decode(errors="replace").strip()
    if done.returncode != 0:
        raise RenderError(f"dot failed (exit code {done.returncode}) rendering {out}: {message}")
    if message:  # e.g. a bitmap too large, scaled down until unreadable
        warnings.warn(
            f"dot, rendering {out}: {message} (vis_fileformat='svg' or 'pdf' keeps big graphs "
            "sharp; vis_nesting_depth draws fewer nodes)",
            RuntimeWarning,
            stacklevel=2,
        )
    return str(out)


def show_model_graph(
    model: nn.Module,
    input_args: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    vis_opt: str = "unrolled",
    vis_nesting_depth: int = 1000,
    vis_outpath: str | os.PathLike[str] = "modelgraph",
    vis_fileformat: str = "pdf",
    vis_direction: str = "bottomup",
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Runs ``model`` once, saving no activations, and renders its graph (TorchLens's function).

    Args:
        model: the model.
        input_args: a tensor, or a list/tuple of positional arguments.
        input_kwargs: keyword arguments of the forward call.
        vis_opt: ``"unrolled"`` (a node per pass of each layer) or ``"rolled"`` (a node per layer;
            edges say which passes they belong to).
        vis_nesting_depth: modules of levels below it are drawn as boxes, each call of a module
            at this level as one node (top-level modules are level 1); 1000 draws everything.
        vis_outpath: the file to write, without extension.
        vis_fileformat: an output format of ``dot`` (``pdf``, ``png``, ``svg``...).
        vis_direction: ``"bottomup"``, ``"topdown"`` or ``"leftright"``.
        timeout: seconds ``dot`` may take.

    Returns:
        The path of the rendered file.

    Example::

        lens_core.show_model_graph(model, x, vis_opt="rolled", vis_fileformat="png")
    """
    # Imported here so that capture.py can import this module (for check_render_options).
    from lens_core.capture.session import get_model_metadata  # noqa: PLC0415

    check_render_options(vis_opt, vis_nesting_depth, vis_fileformat, vis_direction, timeout)
    _output_path(vis_outpath, vis_fileformat)
    _graphviz()
    _dot_binary()  # both before the model runs, so a missing piece fails fast
    history = get_model_metadata(model, input_args, input_kwargs)
    return render_graph(
        history, vis_opt, vis_nesting_depth, vis_outpath, vis_fileformat, vis_direction, timeout
    )
