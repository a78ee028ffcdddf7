"""Saving a :class:`ModelHistory` to a folder: written beside it, then renamed into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from lens_core.capture.history import ModelHistory
from lens_core.capture.records import FrameInfo, Layer
from lens_core.store._files import nested_deeper
from lens_core.store._layout import (
    FILES,
    FORMAT_VERSION,
    GRAD_PREFIX,
    HISTORY,
    MAGIC,
    MAX_JSON_DEPTH,
    SUMMARIES,
    TEMPORARY,
    TENSORS,
    library_version,
    safetensors_module,
)
from lens_core.summaries import TensorSummary, storage_intact


def save(
    history: ModelHistory,
    path: str | os.PathLike[str],
    *,
    tensors: bool = True,
    summaries: Mapping[str, TensorSummary] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``history`` to the folder ``path``, all at once or not at all.

    Args:
        history: the history to save (a loaded one works too).
        path: folder to create; its parent is created if needed.
        tensors: also store the saved activations and gradients (``tensors.safetensors``,
            contiguous CPU copies); False stores the metadata only.
        summaries: statistics to store beside the history (:func:`load_summaries` reads them).
        extra: JSON-serialisable values to keep with it, such as the training step
            (:func:`load_extra` reads them).
        overwrite: replace an existing capture at ``path``. Only a folder holding a capture
            and nothing else is ever replaced.

    Returns:
        The folder written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is not a capture.
        TypeError: an argument has the wrong type, or ``extra`` is not JSON-serialisable.
        ValueError: ``extra`` nests deeper than loading reads (``MAX_JSON_DEPTH``).
        ImportError: tensors are to be stored and safetensors is not installed.
    """
    if not isinstance(history, ModelHistory):
        raise TypeError(f"history must be a ModelHistory, got {type(history).__name__}.")
    if not isinstance(tensors, bool):
        raise TypeError(f"tensors must be True or False, got {tensors!r}.")
    target = Path(path)
    _check_target(target, overwrite)
    summaries_doc = _summaries_document(summaries)
    # Ties the tensor file to this history: a file from another capture is detected on load.
    capture_id = uuid.uuid4().hex
    _check_extra(extra)
    arrays = _host_tensors(history) if tensors else {}
    document = _history_document(history, tensors, extra, capture_id, _digests(arrays))
    write_tensors = safetensors_module().torch.save_file if arrays else None
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    temporary.mkdir()
    try:
        if write_tensors is not None:
            tags = {"format": MAGIC, "capture_id": capture_id}
            write_tensors(arrays, str(temporary / TENSORS), metadata=tags)
            _fsync_file(temporary / TENSORS)
        _write_json(temporary / SUMMARIES, summaries_doc)
        _write_json(temporary / HISTORY, document)  # last: a folder with it is complete
        _fsync_dir(temporary)
        _publish(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _remove_leftovers(target, started)
    return target


# A save of the same path that began this long before ours finished and left its hidden
# folder behind is dead (killed mid-write), not running: a running one would be that recent.
_LEFTOVER_AGE = 60.0


def _remove_leftovers(target: Path, started: float) -> None:
    """Removes the hidden folders that interrupted saves of ``target`` left (kill -9), so they
    are neither kept forever nor reported as writes in progress once ``target`` is complete."""
    prefix = f".{target.name}.tmp-"
    for entry in target.parent.iterdir():
        if not (entry.name.startswith(prefix) and TEMPORARY.match(entry.name)):
            continue
        try:
            stale = entry.lstat().st_mtime < started - _LEFTOVER_AGE and not entry.is_symlink()
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _is_capture_folder(path: Path) -> bool:
    """A folder with a history.json and none but our files: the only kind we may replace."""
    names = {entry.name for entry in path.iterdir()}
    return HISTORY in names and names <= FILES


def _check_target(target: Path, overwrite: bool) -> None:
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    if not target.exists():
        return
    if not target.is_dir() or not _is_capture_folder(target):
        raise FileExistsError(
            f"{target} exists and is not a saved capture (a folder of history.json and the "
            "capture's other files only); save to a new path: nothing else is ever replaced."
        )
    if not overwrite:
        raise FileExistsError(f"{target} already holds a capture; pass overwrite=True to replace it.")


def _publish(temporary: Path, target: Path) -> None:
    """Renames the finished folder to ``target``, moving a capture already there out first.

    Between the two renames of an overwrite ``target`` is briefly absent; a crash exactly
    there leaves the old capture, complete, in a hidden ``.<name>.old-<hex>`` sibling.
    """
    if not target.exists():
        os.replace(temporary, target)
    else:  # a non-empty folder cannot be renamed over: swap, then delete the old one
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, old)
        try:
            os.replace(temporary, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _write_json(path: Path, document: Any) -> None:
    with path.open("w", encoding="utf-8") as file:
        json.dump(document, file, allow_nan=False, separators=(",", ":"))
        file.flush()
        os.fsync(file.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("r+b") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes a rename or a new entry durable; directories cannot be opened on Windows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _summaries_document(summaries: Mapping[str, TensorSummary] | None) -> dict[str, Any]:
    if summaries is None:
        return {}
    if not isinstance(summaries, Mapping):
        raise TypeError(
            f"summaries must be a mapping of name -> TensorSummary, got {type(summaries).__name__}."
        )
    document = {}
    for name, summary in summaries.items():
        if not isinstance(summary, TensorSummary):
            raise TypeError(
                f"summaries[{name!r}] is a {type(summary).__name__}; pass the TensorSummary "
                "objects lens_core.summaries.summarize returns."
            )
        document[str(name)] = summary.to_dict()
    return document


def _check_extra(extra: Mapping[str, Any] | None) -> None:
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict of JSON-serialisable values, got {type(extra).__name__}.")
    extra_doc = dict(extra or {})
    try:
        json.dumps(extra_doc, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise TypeError(
            f"extra must hold JSON-serialisable values (str, int, float, bool, None, list, dict): {error}."
        ) from None
    # history.json holds it one level down, and loading refuses JSON nested deeper than its limit.
    if nested_deeper(extra_doc, MAX_JSON_DEPTH - 1):
        raise ValueError(
            f"extra nests lists and dicts more than {MAX_JSON_DEPTH - 1} levels deep (itself included), "
            "deeper than loading reads; flatten it."
        )


def _history_document(
    history: ModelHistory, tensors: bool, extra: Mapping[str, Any] | None, capture_id: str,
    digests: dict[str, str],
) -> dict[str, Any]:
    stacks = [layer.func_call_stack for layer in history.layer_list]
    return {
        "format": MAGIC,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "capture_id": capture_id,
        "model": {
            "model_name": history.model_name,
            "layer_labels": list(history.layer_labels),
            "module_addresses": list(history.module_addresses),
            "module_types": dict(history.module_types),
            "module_calls": dict(history.module_calls),
            "total_params": history.total_params,
            "total_param_bytes": history.total_param_bytes,
            "random_seed": history.random_seed,
            "elapsed_time": history.elapsed_time,
        },
        "layers": [_layer_document(layer, tensors, stack) for layer, stack in zip(
            history.layer_list, stacks, strict=True)],
        "code_context": _code_context(stacks),
        "tensor_sha256": digests,
        "extra": dict(extra or {}),
    }


def _code_context(stacks: list[list[FrameInfo]]) -> list[list[Any]]:
    """``[file, line, lines]`` of each distinct frame: a loaded capture shows these lines and
    never reads the files its frames name (they may not exist there, or be anything)."""
    seen: dict[tuple[str, int], list[Any]] = {}
    for stack in stacks:
        for frame in stack:
            where = (frame.call_fname, frame.call_linenum)
            if where not in seen:
                seen[where] = [*where, frame.code_context]
    return list(seen.values())


def _digests(arrays: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of the bytes safetensors writes for each tensor (its memory, on little-endian
    hosts), which loading checks each tensor against when it reads it."""
    # numpy's array is a buffer (no copy), which its type stubs do not say.
    return {key: hashlib.sha256(cast(Any, array.reshape(-1).view(torch.uint8).numpy())).hexdigest()
            for key, array in arrays.items()}


def _layer_document(layer: Layer, tensors: bool, stack: list[FrameInfo]) -> dict[str, Any]:
    slot = layer.gradient_slot
    has_gradient = tensors and _gradient(layer) is not None
    return {
        "label": layer.label,
        "layer_label": layer.layer_label,
        "layer_type": layer.layer_type,
        "type_index": layer.type_index,
        "layer_index": layer.layer_index,
        "pass_num": layer.pass_num,
        "num_passes": layer.num_passes,
        "index": layer.index,
        "func_name": layer.func_name,
        "shape": list(layer.shape),
        "dtype": str(layer.dtype).removeprefix("torch."),
        "device": str(layer.device),
        "grad_fn_name": layer.grad_fn_name,
        "module_stack": list(layer.module_stack),
        "params": [[p.name, list(p.shape), p.numel, p.nbytes] for p in layer.params],
        "buffers": list(layer.buffers),
        "parent_indices": list(layer.parent_indices),
        "parents": list(layer.parents),
        "children": list(layer.children),
        "output_of_modules": list(layer.output_of_modules),
        "is_input": layer.is_input,
        "is_output": layer.is_output,
        "is_inplace": layer.is_inplace,
        "summarized": layer.summarized,
        "output_index": layer.output_index,
        "time_elapsed": layer.time_elapsed,
        "func_call_stack": [[f.call_fname, f.call_linenum, f.function] for f in stack],
        "saved": tensors and _activation(layer) is not None,
        "gradient_count": slot.count if has_gradient and slot is not None else None,
    }


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: safetensors refuses views and tensors that share memory.
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _activation(layer: Layer) -> torch.Tensor | None:
    """The saved output of ``layer``, if it can still be read (FSDP frees its buffers' storage)."""
    value = layer.tensor_contents if layer.has_saved_activations else None
    return value if value is not None and storage_intact(value) else None


def _gradient(layer: Layer) -> torch.Tensor | None:
    slot = layer.gradient_slot
    gradient = slot.value if slot is not None and slot.has_value else None
    return gradient if gradient is not None and storage_intact(gradient) else None


def _host_tensors(history: ModelHistory) -> dict[str, torch.Tensor]:
    arrays: dict[str, torch.Tensor] = {}
    for layer in history.layer_list:
        value = _activation(layer)
        if value is not None:
            arrays[layer.label] = _host_copy(value)
        gradient = _gradient(layer)
        if gradient is not None:
            arrays[GRAD_PREFIX + layer.label] = _host_copy(gradient)
    return arrays
