"""Saving a :class:`ModelHistory` to a folder and loading it back, without pickle.

A saved capture is a folder of three files::

    history.json          every plain-data field of the history and of each layer
    summaries.json        TensorSummary.to_dict() of each summarised tensor (may be empty)
    tensors.safetensors   saved activations (key: layer label) and gradients (``grad/<label>``)

JSON and safetensors hold data only, so loading a capture from someone else runs no code of
theirs. ``save`` writes into a hidden sibling folder and renames it into place, so ``path``
either holds a complete capture or nothing; ``load`` reads tensors lazily, each one the first
time its ``tensor_contents`` or ``gradient`` is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lens_core.errors import LensError
from lens_core.gradients import GradientSlot
from lens_core.history import ModelHistory
from lens_core.records import FrameInfo, Layer, ParamInfo
from lens_core.summaries import TensorSummary

__all__ = ["FORMAT_VERSION", "CaptureFormatError", "load", "load_extra", "load_summaries", "save"]

FORMAT_VERSION = 1
"""Layout version of saved captures; ``load`` reads exactly this one."""

_MAGIC = "lens-callbacks capture"
_HISTORY = "history.json"
_SUMMARIES = "summaries.json"
_TENSORS = "tensors.safetensors"
_FILES = frozenset((_HISTORY, _SUMMARIES, _TENSORS))
_GRAD_PREFIX = "grad/"
# Hidden sibling a save writes into before the rename: ".<name>.tmp-<hex>".
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


class CaptureFormatError(LensError, ValueError):
    """A path holds no capture that :func:`load` can read.

    Missing, half-written, corrupted, or written in another format version; the message names
    the path, what is wrong and what to do.
    """


# -- saving -----------------------------------------------------------------------------------


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
    document = _history_document(history, tensors, extra, capture_id)
    arrays = _host_tensors(history) if tensors else {}
    write_tensors = _safetensors().torch.save_file if arrays else None
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    temporary.mkdir()
    try:
        if write_tensors is not None:
            tags = {"format": _MAGIC, "capture_id": capture_id}
            write_tensors(arrays, str(temporary / _TENSORS), metadata=tags)
            _fsync_file(temporary / _TENSORS)
        _write_json(temporary / _SUMMARIES, summaries_doc)
        _write_json(temporary / _HISTORY, document)  # last: a folder with it is complete
        _fsync_dir(temporary)
        _publish(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _is_capture_folder(path: Path) -> bool:
    """A folder with a history.json and none but our files: the only kind we may replace."""
    names = {entry.name for entry in path.iterdir()}
    return _HISTORY in names and names <= _FILES


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


def _library_version() -> str:
    try:
        return metadata.version("lens-callbacks")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _history_document(
    history: ModelHistory, tensors: bool, extra: Mapping[str, Any] | None, capture_id: str
) -> dict[str, Any]:
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict of JSON-serialisable values, got {type(extra).__name__}.")
    extra_doc = dict(extra or {})
    try:
        json.dumps(extra_doc, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"extra must hold JSON-serialisable values (str, int, float, bool, None, list, dict): {error}."
        ) from None
    return {
        "format": _MAGIC,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
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
        "layers": [_layer_document(layer, tensors) for layer in history.layer_list],
        "extra": extra_doc,
    }


def _layer_document(layer: Layer, tensors: bool) -> dict[str, Any]:
    slot = layer.gradient_slot
    has_gradient = tensors and slot is not None and slot.has_value
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
        "func_call_stack": [[f.call_fname, f.call_linenum, f.function] for f in layer.func_call_stack],
        "saved": tensors and layer.has_saved_activations,
        "gradient_count": slot.count if has_gradient and slot is not None else None,
    }


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: safetensors refuses views and tensors that share memory.
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _host_tensors(history: ModelHistory) -> dict[str, torch.Tensor]:
    arrays: dict[str, torch.Tensor] = {}
    for layer in history.layer_list:
        value = layer.tensor_contents if layer.has_saved_activations else None
        if value is not None:
            arrays[layer.label] = _host_copy(value)
        slot = layer.gradient_slot
        gradient = slot.value if slot is not None and slot.has_value else None
        if gradient is not None:
            arrays[_GRAD_PREFIX + layer.label] = _host_copy(gradient)
    return arrays


def _safetensors() -> ModuleType:
    try:
        import safetensors.torch  # noqa: PLC0415  # optional: only captures with tensors need it
    except ImportError:
        raise ImportError(
            'Saving or loading tensors of a capture needs safetensors: pip install "lens-callbacks[all]" '
            "(or pip install safetensors)."
        ) from None
    return safetensors


# -- loading ----------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ModelHistory:
    """Reads a capture written by :func:`save`.

    The history indexes exactly like the one saved (labels, module addresses, ordinals,
    ``lookup_keys``). Tensors stay on disk until a layer's ``tensor_contents`` or ``gradient``
    is first read. Loaded layers have no ``func`` and no ``call`` (so they cannot be
    replayed by ``validate_model_activations``), and ``rng_states`` is empty.

    Args:
        path: the capture's folder.
        device: where loaded tensors go (``layer.device`` still says where they were made).

    Raises:
        CaptureFormatError: ``path`` is not a complete capture of this format version.
        ImportError: the capture holds tensors and safetensors is not installed.
    """
    root = Path(path)
    target = str(torch.device(device))
    document = _read_history(root)
    try:
        capture_id = _get(document, "capture_id", str)
        history, keys = _rebuild(root, document, _Source(root, capture_id, target))
    except CaptureFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        why = f"{_HISTORY} lacks or mangles a field ({type(error).__name__}: {error})"
        raise _corrupted(root, why) from None
    if keys:
        _check_tensor_file(root, keys, capture_id)
    return history


def load_summaries(path: str | os.PathLike[str]) -> dict[str, TensorSummary]:
    """The summaries saved with a capture (``save(..., summaries=...)``); empty if none were.

    Raises:
        CaptureFormatError: ``path`` is not a complete capture, or its summaries are corrupted.
    """
    root = Path(path)
    _read_history(root)
    document = _read_json(root, _SUMMARIES)
    try:
        return {name: TensorSummary.from_dict(data) for name, data in document.items()}
    except (AttributeError, ValueError) as error:
        raise _corrupted(root, f"{_SUMMARIES} does not hold summaries ({error})") from None


def load_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` values saved with a capture (``save(..., extra=...)``).

    Raises:
        CaptureFormatError: ``path`` is not a complete capture.
    """
    root = Path(path)
    extra = _read_history(root).get("extra", {})
    if not isinstance(extra, dict):
        raise _corrupted(root, "the extra field of history.json is not an object")
    return extra


def _rebuild(root: Path, document: Mapping[str, Any], source: _Source) -> tuple[ModelHistory, list[str]]:
    """The history of ``document`` with lazy tensor sources, and the tensor keys it needs."""
    keys: list[str] = []
    layers = []
    for doc in document["layers"]:
        layer = _layer_from(doc)
        if _get(doc, "saved", bool):
            layer.tensor_source = _StoredTensor(source, layer.label)
            keys.append(layer.label)
        count = _get(doc, "gradient_count", (int, type(None)))
        if count is not None:
            key = _GRAD_PREFIX + layer.label
            layer.gradient_slot = GradientSlot(source=_StoredTensor(source, key), count=count)
            keys.append(key)
        layers.append(layer)
    model = document["model"]
    history = ModelHistory(
        model_name=_get(model, "model_name", str),
        layer_list=layers,
        layer_labels=_strings(model, "layer_labels"),
        module_addresses=_strings(model, "module_addresses"),
        module_types={str(k): str(v) for k, v in _get(model, "module_types", dict).items()},
        module_calls={str(k): _int(v) for k, v in _get(model, "module_calls", dict).items()},
        total_params=_get(model, "total_params", int),
        total_param_bytes=_get(model, "total_param_bytes", int),
        random_seed=_get(model, "random_seed", (int, type(None))),
        rng_states={},
        elapsed_time=float(_get(model, "elapsed_time", (int, float))),
    )
    return history, keys


def _layer_from(doc: Mapping[str, Any]) -> Layer:
    return Layer(
        layer_type=_get(doc, "layer_type", str),
        type_index=_get(doc, "type_index", int),
        layer_index=_get(doc, "layer_index", int),
        pass_num=_get(doc, "pass_num", int),
        index=_get(doc, "index", int),
        func_name=_get(doc, "func_name", str),
        func=None,
        shape=tuple(_ints(doc, "shape")),
        dtype=_dtype(_get(doc, "dtype", str)),
        device=torch.device(_get(doc, "device", str)),
        grad_fn_name=_get(doc, "grad_fn_name", (str, type(None))),
        module_stack=tuple(_strings(doc, "module_stack")),
        params=tuple(
            ParamInfo(_str(name), tuple(_int(n) for n in shape), _int(numel), _int(nbytes))
            for name, shape, numel, nbytes in _get(doc, "params", list)
        ),
        buffers=tuple(_strings(doc, "buffers")),
        parent_indices=_ints(doc, "parent_indices"),
        frames=None,
        stored_call_stack=_stored_call_stack(_get(doc, "func_call_stack", list)),
        is_input=_get(doc, "is_input", bool),
        is_output=_get(doc, "is_output", bool),
        is_inplace=_get(doc, "is_inplace", bool),
        summarized=_get(doc, "summarized", bool) if "summarized" in doc else False,  # newer field
        output_index=_get(doc, "output_index", (int, type(None))),
        time_elapsed=float(_get(doc, "time_elapsed", (int, float))),
        label=_get(doc, "label", str),
        layer_label=_get(doc, "layer_label", str),
        num_passes=_get(doc, "num_passes", int),
        parents=tuple(_strings(doc, "parents")),
        children=tuple(_strings(doc, "children")),
        output_of_modules=tuple(_strings(doc, "output_of_modules")),
    )


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``doc[key]``, checked to be of ``kind`` (JSON ``true`` is no int here)."""
    value = doc[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{key!r} is {value!r}, expected {' or '.join(k.__name__ for k in kinds)}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _ints(doc: Mapping[str, Any], key: str) -> list[int]:
    return [_int(value) for value in _get(doc, key, list)]


def _strings(doc: Mapping[str, Any], key: str) -> list[str]:
    return [_str(value) for value in _get(doc, key, list)]


def _check_tensor_file(root: Path, keys: list[str], capture_id: str) -> None:
    """Fails now, not at the first lazy read, if the tensor file lacks a tensor it should hold."""
    safetensors = _safetensors()
    if not (root / _TENSORS).is_file():
        raise _corrupted(root, f"{_TENSORS} is missing")
    try:
        with safetensors.safe_open(str(root / _TENSORS), framework="pt") as file:
            stored = set(file.keys())
            written_with = (file.metadata() or {}).get("capture_id")
    except (OSError, safetensors.SafetensorError) as error:
        raise _corrupted(root, f"{_TENSORS} cannot be read ({error})") from None
    if written_with != capture_id:
        raise _corrupted(root, f"{_TENSORS} belongs to another capture than {_HISTORY}")
    missing = [key for key in keys if key not in stored]
    if missing:
        raise _corrupted(root, f"{_TENSORS} lacks {len(missing)} tensors ({', '.join(missing[:5])})")


def _corrupted(root: Path, why: str) -> CaptureFormatError:
    return CaptureFormatError(
        f"{root} is a damaged capture: {why}. It was not written completely or was changed "
        "afterwards; save the history again (lens_core.save)."
    )


def _read_json(root: Path, name: str) -> Any:
    try:
        text = (root / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _corrupted(root, f"{name} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _corrupted(root, f"{name} cannot be read ({error})") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise _corrupted(root, f"{name} is not valid JSON ({error})") from None


def _read_history(root: Path) -> dict[str, Any]:
    """history.json of ``root``, checked to be a complete capture of our format version."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder"
        raise CaptureFormatError(
            f"{root} {what}; a saved capture is a folder written by lens_core.save(history, path)."
        )
    if _TEMPORARY.match(root.name):
        raise CaptureFormatError(
            f"{root} is the temporary folder of a save that did not finish; delete it and save "
            "the history again (lens_core.save)."
        )
    if not (root / _HISTORY).exists():
        if any((root / name).exists() for name in _FILES):
            raise _corrupted(root, f"{_HISTORY} is missing")
        raise CaptureFormatError(
            f"{root} is not a saved capture (it has no {_HISTORY}); write one with "
            "lens_core.save(history, path)."
        )
    document = _read_json(root, _HISTORY)
    if not isinstance(document, dict) or document.get("format") != _MAGIC:
        raise CaptureFormatError(
            f"{root / _HISTORY} is not the history of a lens_core capture; write one with "
            "lens_core.save(history, path)."
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        by = document.get("library_version", "an unknown version")
        raise CaptureFormatError(
            f"{root} was saved in capture format version {version!r} (by lens-callbacks {by}); "
            f"this lens-callbacks ({_library_version()}) reads version {FORMAT_VERSION}. Load it "
            f"with lens-callbacks {by} (pip install lens-callbacks=={by}), or save it again."
        )
    return document


def _stored_call_stack(stack: list[Any]) -> tuple[FrameInfo, ...]:
    frames = []
    for fname, line, function in stack:
        if not isinstance(fname, str) or not isinstance(function, str) or not isinstance(line, int):
            raise TypeError(f"func_call_stack entry {[fname, line, function]!r} is no (file, line, function)")
        frames.append(FrameInfo(fname, line, function))
    return tuple(frames)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True, slots=True)
class _Source:
    """The tensor file of one loaded capture, shared by all its lazy tensors."""

    root: Path
    capture_id: str
    device: str


@dataclass(frozen=True, slots=True)
class _StoredTensor:
    """Reads one tensor of a capture's safetensors file when called (a lazy ``tensor_source``)."""

    source: _Source
    key: str

    def __call__(self) -> torch.Tensor:
        safetensors = _safetensors()
        root = self.source.root
        try:
            with safetensors.safe_open(str(root / _TENSORS), framework="pt") as file:
                if (file.metadata() or {}).get("capture_id") != self.source.capture_id:
                    raise CaptureFormatError(
                        f"{root / _TENSORS} was replaced by another capture after this history was "
                        f"loaded, so {self.key!r} is not this history's any more; load {root} again."
                    )
                tensor: torch.Tensor = file.get_tensor(self.key)
        except (OSError, safetensors.SafetensorError) as error:
            raise _corrupted(root, f"tensor {self.key!r} cannot be read ({error})") from None
        # Moved by torch, not by safetensors: any device torch knows works (meta, xpu...).
        return tensor if self.source.device == "cpu" else tensor.to(self.source.device)

