"""A ``ModelHistory`` as TensorBoard's graph panel reads it: a GraphDef plus per-op timings.

``SummaryWriter.add_graph`` traces the model again with ``torch.jit.trace``, which is
deprecated, fails on dict outputs, bool arguments and data-dependent control flow, and shows
the graph of a pass that is not the one trained. We already hold the record of the real pass,
so we translate it:

* one node per op pass, named by the module it ran in: ``features/6/conv2d_3_7``. The ``/``
  makes TensorBoard draw each module as a collapsible scope; module passes are dropped (a
  module called twice is one scope holding both passes), inputs and outputs sit at top level
  since they come from, or go to, outside the model. A layer run several times has a node per
  pass, ``linear_1_1_pass2`` (TensorBoard would read ``linear_1_1:2`` as output slot 2);
* ``op`` is the layer type, ``input`` the parents, ``_output_shapes`` the output shape (it
  labels the edges), and the other attributes say what the info card should, as text: label,
  function, module, parameters, dtype, shape, and the pass of a layer run more than once;
* ``RunMetadata.step_stats`` holds each op's duration, so "Color by: Compute time" works, and
  the bytes of its output for "Color by: Memory" (devices are named ``/device:CPU:0``: the
  profile view ignores others).

Why those attributes are keys (``"module: features.0:1 (Conv2d)"``) with an empty value: the
info card prints an attribute's key as it is but its value as the JSON of the ``AttrValue``
message (``JSON.stringify`` in TensorBoard's ``tf-node-info``, 2.21), so
``AttrValue(s=b"1 of 1")`` reads ``{"s":"1 of 1"}`` whatever the field, and an empty one
``{}``: only the key column is plain text. The card leaves out ``_output_shapes`` and lists the
rest in map order. It prints the served text format without unescaping it, so a non-ASCII
module name would read as octal escapes.

This module imports TensorBoard's protos, so only the TensorBoard writer imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from tensorboard.compat.proto import (
    attr_value_pb2,
    config_pb2,
    graph_pb2,
    node_def_pb2,
    step_stats_pb2,
    tensor_shape_pb2,
)

from lens_core import Layer, ModelHistory

__all__ = ["device_name", "graph_def", "node_names", "run_metadata"]

# TensorFlow's node-name alphabet (TensorBoard splits inputs on ":" and scopes on "/").
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _segment(name: str) -> str:
    return _UNSAFE.sub("_", name) or "_"


def _leaf(layer: Layer) -> str:
    # "linear_1_1:2" cannot be a node name: in an input ":2" would mean "output slot 2".
    if layer.num_passes > 1:
        return _segment(f"{layer.layer_label}_pass{layer.pass_num}")
    return _segment(layer.label)


def _scope(layer: Layer) -> tuple[str, ...]:
    if layer.is_input or layer.is_output or layer.module is None:
        return ()
    return tuple(_segment(part) for part in layer.module.split("."))


def node_names(history: ModelHistory) -> dict[str, str]:
    """Layer label -> GraphDef node name (``features/6/conv2d_3_7``), unique per history."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for layer in history:
        base = "/".join((*_scope(layer), _leaf(layer)))
        name, extra = base, 1
        while name in taken:  # only two modules whose names differ in unsafe characters
            extra += 1
            name = f"{base}_{extra}"
        taken.add(name)
        names[layer.label] = name
    return names


def device_name(device: torch.device) -> str:
    """``/device:CUDA:0``: TensorBoard only counts step statistics of devices named this way."""
    return f"/device:{device.type.upper()}:{device.index or 0}"


def _shape(shape: Iterable[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    )


def _facts(history: ModelHistory, layer: Layer) -> dict[str, str]:
    """What the info card of ``layer``'s node says, each the attribute ``"<name>: <text>"``."""
    found = {
        "label": layer.label,
        "function": layer.func_name,
        "dtype": str(layer.dtype).removeprefix("torch."),
        "shape": str(tuple(layer.shape)),
    }
    if layer.num_passes > 1:
        found["pass"] = f"{layer.pass_num} of {layer.num_passes}"
    if layer.module_stack and not (layer.is_input or layer.is_output):
        module = layer.module_stack[-1]
        kind = history.module_types.get(module.rpartition(":")[0])
        found["module"] = f"{module} ({kind})" if kind else module
    if layer.params:
        found["params"] = ", ".join(f"{p.name} {tuple(p.shape)}" for p in layer.params)
    return found


def _attributes(history: ModelHistory, layer: Layer) -> dict[str, attr_value_pb2.AttrValue]:
    shapes = attr_value_pb2.AttrValue.ListValue(shape=[_shape(layer.shape)])
    attributes = {"_output_shapes": attr_value_pb2.AttrValue(list=shapes)}
    for name, text in _facts(history, layer).items():
        attributes[f"{name}: {text}"] = attr_value_pb2.AttrValue()
    return attributes


def graph_def(history: ModelHistory) -> Any:
    """The ops of ``history`` as a ``GraphDef`` whose scopes are the model's modules.

    Returns:
        A ``tensorboard.compat.proto.graph_pb2.GraphDef``.
    """
    names = node_names(history)
    graph = graph_pb2.GraphDef()
    for layer in history:
        graph.node.append(node_def_pb2.NodeDef(
            name=names[layer.label],
            op=layer.layer_type,
            input=[names[parent] for parent in layer.parents],
            device=device_name(layer.device),
            attr=_attributes(history, layer),
        ))
    return graph


def _micros(seconds: float) -> int:
    # TensorBoard counts whole microseconds and ignores a zero duration: round up.
    return max(1, math.ceil(seconds * 1e6))


def run_metadata(history: ModelHistory, graph: Any | None = None) -> Any:
    """``RunMetadata`` holding the graph (``function_graphs[0]``) and each op's time and memory.

    The capture records durations, not timestamps, so the ops are laid end to end in execution
    order. Inputs and outputs did no work and get no statistics.

    Args:
        history: the captured pass.
        graph: its ``graph_def(history)``, if already built.

    Returns:
        A ``tensorboard.compat.proto.config_pb2.RunMetadata``.
    """
    names = node_names(history)
    metadata = config_pb2.RunMetadata()
    metadata.function_graphs.add().pre_optimization_graph.CopyFrom(
        graph if graph is not None else graph_def(history)
    )
    devices: dict[str, Any] = {}
    start = 1  # TensorBoard reads a start of 0 (left out of the text proto) as "no timing"
    for layer in history:
        if layer.is_input or layer.is_output:
            continue
        device = device_name(layer.device)
        if device not in devices:
            devices[device] = metadata.step_stats.dev_stats.add(device=device)
        duration = _micros(layer.time_elapsed)
        stats = devices[device].node_stats.add(
            node_name=names[layer.label],
            all_start_micros=start,
            op_start_rel_micros=0,
            op_end_rel_micros=duration,
            all_end_rel_micros=duration,
        )
        if not layer.is_inplace:
            stats.memory.append(step_stats_pb2.AllocatorMemoryUsed(
                allocator_name=device, total_bytes=layer.nbytes
            ))
        start += duration
    return metadata
