"""Loading a saved capture: every file checked before it is trusted, tensors read lazily."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_core.capture.gradients import GradientSlot
from lens_core.capture.history import ModelHistory
from lens_core.capture.records import FrameInfo, Layer, ParamInfo
from lens_core.store._find import find_capture
from lens_core.store._layout import (
    FILES,
    FORMAT_VERSION,
    GRAD_PREFIX,
    HISTORY,
    MAGIC,
    SUMMARIES,
    TENSORS,
    CaptureFormatError,
    corrupted,
    library_version,
    safetensors_module,
)
from lens_core.summaries import TensorSummary


def load(
    path: str | os.PathLike[str], *, micro_batch: int | None = None, device: str | torch.device = "cpu"
) -> ModelHistory:
    """Reads a capture written by :func:`save`, or by a writer of ``lens_callbacks``.

    ``path`` may be a capture folder, or a step folder a writer made (``<run>/step_000100``,
    also a downloaded W&B ``lens-capture`` artifact): a step of one micro-batch loads as that
    micro-batch's history; a step of several needs ``micro_batch``.

    The history indexes exactly like the one saved (labels, module addresses, ordinals,
    ``lookup_keys``). Tensors stay on disk until a layer's ``tensor_contents`` or ``gradient``
    is first read. Loaded layers have no ``func`` and no ``call`` (so they cannot be
    replayed by ``validate_model_activations``), and ``rng_states`` is empty.

    Args:
        path: the capture's folder, or a step folder.
        micro_batch: which micro-batch of a step folder to load (``micro_batch_<i>/``); only
            for step folders.
        device: where loaded tensors go (``layer.device`` still says where they were made).

    Raises:
        SeveralCapturesError: ``path`` is a step folder of several micro-batches and
            ``micro_batch`` is None (the message shows the call for each), or a run folder.
        CaptureFormatError: ``path`` holds no complete capture of this format version.
        ImportError: the capture holds tensors and safetensors is not installed.

    Example::

        history = lens_core.load("out/demo/lens/step_000040")
        second = lens_core.load("runs/accumulate/step_000040", micro_batch=1)
    """
    root = find_capture(Path(path), micro_batch, "load")
    target = str(torch.device(device))
    document = _read_history(root)
    try:
        capture_id = _get(document, "capture_id", str)
        history, keys = _rebuild(root, document, _Source(root, capture_id, target))
    except CaptureFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        why = f"{HISTORY} lacks or mangles a field ({type(error).__name__}: {error})"
        raise corrupted(root, why) from None
    if keys:
        _check_tensor_file(root, keys, capture_id)
    return history


def load_summaries(
    path: str | os.PathLike[str], *, micro_batch: int | None = None
) -> dict[str, TensorSummary]:
    """The summaries saved with a capture (``save(..., summaries=...)``); empty if none were.

    ``path`` and ``micro_batch`` are read as :func:`load` reads them: for a step folder these
    are the summaries saved with that micro-batch, not the step's pooled ``summaries.json``.

    Raises:
        SeveralCapturesError: as :func:`load`.
        CaptureFormatError: ``path`` is not a complete capture, or its summaries are corrupted.
    """
    root = find_capture(Path(path), micro_batch, "load_summaries")
    _read_history(root)
    document = _read_json(root, SUMMARIES)
    try:
        return {name: TensorSummary.from_dict(data) for name, data in document.items()}
    except (AttributeError, ValueError) as error:
        raise corrupted(root, f"{SUMMARIES} does not hold summaries ({error})") from None


def load_extra(path: str | os.PathLike[str], *, micro_batch: int | None = None) -> dict[str, Any]:
    """The ``extra`` values saved with a capture (``save(..., extra=...)``).

    ``path`` and ``micro_batch`` are read as :func:`load` reads them.

    Raises:
        SeveralCapturesError: as :func:`load`.
        CaptureFormatError: ``path`` is not a complete capture.
    """
    root = find_capture(Path(path), micro_batch, "load_extra")
    extra = _read_history(root).get("extra", {})
    if not isinstance(extra, dict):
        raise corrupted(root, "the extra field of history.json is not an object")
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
            key = GRAD_PREFIX + layer.label
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
    safetensors = safetensors_module()
    if not (root / TENSORS).is_file():
        raise corrupted(root, f"{TENSORS} is missing")
    try:
        with safetensors.safe_open(str(root / TENSORS), framework="pt") as file:
            stored = set(file.keys())
            written_with = (file.metadata() or {}).get("capture_id")
    except (OSError, safetensors.SafetensorError) as error:
        raise corrupted(root, f"{TENSORS} cannot be read ({error})") from None
    if written_with != capture_id:
        raise corrupted(root, f"{TENSORS} belongs to another capture than {HISTORY}")
    missing = [key for key in keys if key not in stored]
    if missing:
        raise corrupted(root, f"{TENSORS} lacks {len(missing)} tensors ({', '.join(missing[:5])})")


def _read_json(root: Path, name: str) -> Any:
    try:
        text = (root / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise corrupted(root, f"{name} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise corrupted(root, f"{name} cannot be read ({error})") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise corrupted(root, f"{name} is not valid JSON ({error})") from None


def _read_history(root: Path) -> dict[str, Any]:
    """history.json of ``root`` (a folder :func:`find_capture` chose), checked to be a complete
    capture of our format version."""
    if not (root / HISTORY).exists():
        if any((root / name).exists() for name in FILES):
            raise corrupted(root, f"{HISTORY} is missing")
        raise CaptureFormatError(
            f"{root} is not a saved capture (it has no {HISTORY}); write one with "
            "lens_core.save(history, path)."
        )
    document = _read_json(root, HISTORY)
    if not isinstance(document, dict) or document.get("format") != MAGIC:
        raise CaptureFormatError(
            f"{root / HISTORY} is not the history of a lens_core capture; write one with "
            "lens_core.save(history, path)."
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        by = document.get("library_version", "an unknown version")
        raise CaptureFormatError(
            f"{root} was saved in capture format version {version!r} (by lens-callbacks {by}); "
            f"this lens-callbacks ({library_version()}) reads version {FORMAT_VERSION}. Load it "
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
        safetensors = safetensors_module()
        root = self.source.root
        try:
            with safetensors.safe_open(str(root / TENSORS), framework="pt") as file:
                if (file.metadata() or {}).get("capture_id") != self.source.capture_id:
                    raise CaptureFormatError(
                        f"{root / TENSORS} was replaced by another capture after this history was "
                        f"loaded, so {self.key!r} is not this history's any more; load {root} again."
                    )
                tensor: torch.Tensor = file.get_tensor(self.key)
        except (OSError, safetensors.SafetensorError) as error:
            raise corrupted(root, f"tensor {self.key!r} cannot be read ({error})") from None
        # Moved by torch, not by safetensors: any device torch knows works (meta, xpu...).
        return tensor if self.source.device == "cpu" else tensor.to(self.source.device)
