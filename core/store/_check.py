"""The internal references of a loaded history, checked before anyone follows them.

Layers point at each other by label (parents, children), at their position by ``index`` and at
module calls by ``address:call`` tags; the history's lookup table, its graph and the anomaly
report follow these without checking them, as they may for a history that was just captured.
A ``history.json`` from elsewhere can say anything, so :func:`check_references` makes sure a
loaded history is one a capture could have produced: otherwise a label that names no layer would
be a ``KeyError`` deep inside the graph code, long after ``load`` returned.
"""

from __future__ import annotations

import re
from pathlib import Path

from lens_core.capture.history import ModelHistory
from lens_core.capture.records import Layer
from lens_core.store._layout import HISTORY, MAX_MODULE_DEPTH, corrupted

# A module call: the module's address and which call of it (``features.6:1``).
_CALL_TAG = re.compile(r"[^:]*:[0-9]{1,18}")


def check_references(root: Path, history: ModelHistory) -> None:
    """Checks that ``history``, loaded from ``root``, refers only to what it holds.

    Raises:
        CaptureFormatError: a label, index, pass or module call is inconsistent or names
            something the history does not hold.
    """
    layers = history.layer_list
    by_label: dict[str, Layer] = {}
    passes: dict[str, int] = {}
    for position, layer in enumerate(layers):
        where = f"layer {position} of {HISTORY} ({layer.label!r:.80})"
        if layer.index != position:
            raise corrupted(root, f"{where} has index {layer.index}, not its position {position}")
        if layer.label in by_label:
            raise corrupted(root, f"{where} has the label of layer {by_label[layer.label].index} too")
        by_label[layer.label] = layer
        expected = f"{layer.layer_type}_{layer.type_index}_{layer.layer_index}"
        if layer.layer_label != expected:
            raise corrupted(root, f"{where} has layer_label {layer.layer_label!r:.80}, where its type and "
                                  f"numbers make {expected!r:.80}")
        if not 1 <= layer.pass_num <= layer.num_passes:
            raise corrupted(root, f"{where} is pass {layer.pass_num} of {layer.num_passes}")
        if passes.setdefault(layer.layer_label, layer.num_passes) != layer.num_passes:
            raise corrupted(root, f"{where} says its layer ran {layer.num_passes} times, another pass of it "
                                  f"{passes[layer.layer_label]} times")
        label = layer.layer_label if layer.num_passes == 1 else f"{layer.layer_label}:{layer.pass_num}"
        if layer.label != label:
            raise corrupted(root, f"{where} should be labelled {label!r:.80} (its layer_label and pass)")
        if max(len(layer.module_stack), len(layer.output_of_modules)) > MAX_MODULE_DEPTH:
            raise corrupted(root, f"{where} is nested in more than {MAX_MODULE_DEPTH} module calls")
        tag = next((tag for tag in (*layer.module_stack, *layer.output_of_modules)
                    if not _CALL_TAG.fullmatch(tag)), None)
        if tag is not None:
            raise corrupted(root, f"{where} names the module call {tag!r:.80}, which is not address:call")
        index = next((index for index in layer.parent_indices if not 0 <= index < len(layers)), None)
        if index is not None:
            raise corrupted(root, f"{where} has parent index {index}, out of the {len(layers)} layers")
    for layer in layers:
        for kind, labels in (("parent", layer.parents), ("child", layer.children)):
            unknown = next((label for label in labels if label not in by_label), None)
            if unknown is not None:
                raise corrupted(root, f"layer {layer.index} of {HISTORY} ({layer.label!r:.80}) has the "
                                      f"{kind} {unknown!r:.80}, which no layer is labelled")
    unknown = next((label for label in history.layer_labels if label not in by_label), None)
    if unknown is not None:
        raise corrupted(root, f"the layer_labels of {HISTORY} list {unknown!r:.80}, which no layer is "
                              "labelled")
