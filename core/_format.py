"""Text summaries of histories and layers, in the spirit of the TorchLens README."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lens_core.capture.history import ModelHistory
    from lens_core.capture.records import Layer


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _tensor_preview(tensor: torch.Tensor) -> str:
    with torch.no_grad():
        view = tensor.detach()
        while view.dim() > 2:
            view = view[0]
        if view.dim() == 2:
            view = view[:5, :5]
        elif view.dim() == 1:
            view = view[:5]
        return textwrap.indent(str(view), "\t\t") + ("..." if view.numel() < tensor.numel() else "")


def format_layer(layer: Layer) -> str:
    # The first lookup key is the negative ordinal, which gives the length of the history.
    first_key = layer.lookup_keys[0] if layer.lookup_keys else 0
    total = f"/{layer.index - first_key}" if isinstance(first_key, int) and first_key < 0 else ""
    lines = [f"Layer {layer.label}, operation {layer.index + 1}{total}:"]
    shape = tuple(layer.shape)
    lines.append(f"\tOutput tensor: shape={shape}, dtype={layer.dtype}, size={human_bytes(layer.nbytes)}")
    if layer.tensor_contents is not None:
        lines.append(_tensor_preview(layer.tensor_contents))
    else:
        lines.append("\t\t(not saved)")
    if layer.params:
        shapes = ", ".join(str(p.shape) for p in layer.params)
        lines.append(
            f"\tParams: Computed from params with shape {shapes}; "
            f"{layer.num_params} params total ({human_bytes(layer.param_bytes)})"
        )
    else:
        lines.append("\tParams: no params used")
    if layer.buffers:
        lines.append(f"\tBuffers: {', '.join(layer.buffers)}")
    lines.append(f"\tParent Layers: {', '.join(layer.parents) or 'no parent layers'}")
    lines.append(f"\tChild Layers: {', '.join(layer.children) or 'no child layers'}")
    grad = f" (gradfunc={layer.grad_fn_name})" if layer.grad_fn_name else ""
    lines.append(f"\tFunction: {layer.func_name}{grad}")
    if layer.num_passes > 1:
        lines.append(f"\tPass: {layer.pass_num} of {layer.num_passes}")
    lines.append(f"\tComputed inside module: {layer.module or 'not computed inside a module'}")
    lines.append(f"\tTime elapsed: {layer.time_elapsed: .3E}s")
    outputs = [t.rpartition(":")[0] for t in layer.output_of_modules]
    lines.append(f"\tOutput of modules: {', '.join(outputs) or 'none'}")
    if outputs:
        lines.append(f"\tOutput of bottom-level module: {outputs[0]}")
    lines.append(f"\tLookup keys: {', '.join(str(k) for k in layer.lookup_keys)}")
    return "\n".join(lines)


def _structure(history: ModelHistory) -> str:
    kind = (
        f"recurrent (at most {history.max_passes} passes)" if history.is_recurrent
        else "purely feedforward"
    )
    return f"{kind}, {'with' if history.is_branching else 'without'} branching"


def _hierarchy(history: ModelHistory) -> list[str]:
    lines = []
    for top, below in history.module_hierarchy.items():
        lines.append(f"\t\t{top}" + (":" if below else ""))
        if below:
            wrapped = textwrap.wrap(", ".join(below), 100)
            lines += [f"\t\t    {line}" for line in wrapped]
    return lines


def _seed(history: ModelHistory) -> str:
    return "not set (RNG state recorded)" if history.random_seed is None else str(history.random_seed)


def format_history(history: ModelHistory) -> str:
    num_param_ops = sum(1 for layer in history.layer_list if layer.params)
    num_saved = history.num_tensors_saved  # a count over the layers: once, not once per layer
    lines = [
        f"Log of {history.model_name} forward pass:",
        f"\tModel structure: {_structure(history)}; {len(history.module_addresses)} total modules.",
        f"\t{len(history)} tensors ({human_bytes(history.total_activation_bytes)}) computed in "
        f"forward pass; {num_saved} tensors "
        f"({human_bytes(history.saved_activation_bytes)}) saved.",
        f"\t{num_param_ops} parameter operations ({history.total_params} params total; "
        f"{human_bytes(history.total_param_bytes)}).",
        f"\tRandom seed: {_seed(history)}",
        f"\tTime elapsed: {history.elapsed_time:.3f}s",
        "\tModule Hierarchy:",
        *_hierarchy(history),
        "\tLayers:",
    ]
    for layer in history.layer_list:
        if layer.summarized:
            saved = " (summarised, not kept)"
        else:
            saved = "" if layer.has_saved_activations or num_saved == 0 else " (not saved)"
        lines.append(f"\t\t{layer.index}: {layer.label}{saved}")
    return "\n".join(lines)
