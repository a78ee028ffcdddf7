"""Loading a saved capture: every file checked before it is trusted, tensors read lazily.

A capture may come from anyone (the threat model in the README), so loading treats its files as
untrusted input: they are opened by :mod:`lens_core.store._files` (regular files of the folder
only, sizes checked first, JSON of bounded nesting), every field of ``history.json`` is checked
for its type and range and the history for its internal references (:mod:`lens_core.store._check`)
before a history is returned, and ``tensors.safetensors`` is checked against it by
:mod:`lens_core.store._tensors`. Whatever is wrong ends as one :class:`CaptureFormatError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lens_core.capture.gradients import GradientSlot
from lens_core.capture.history import ModelHistory
from lens_core.capture.records import FrameInfo, Layer, ParamInfo
from lens_core.store._check import check_references
from lens_core.store._files import read_json
from lens_core.store._find import find_capture
from lens_core.store._layout import (
    FILES,
    FORMAT_VERSION,
    GRAD_PREFIX,
    HISTORY,
    MAGIC,
    SUMMARIES,
    CaptureFormatError,
    corrupted,
    library_version,
)
from lens_core.store._tensors import TensorFile, check_shape
from lens_core.summaries import TensorSummary

# Every torch dtype by the name save writes (``float32``); looked up here, never with getattr on
# torch, whose module __getattr__ imports submodules for some names.
_DTYPES = {str(value).removeprefix("torch."): value for value in vars(torch).values()
           if isinstance(value, torch.dtype)}
# What save writes for a device: ``str(torch.device)``, a type and an optional index.
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}(?::[0-9]{1,6})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_INT = 2**63 - 1
# The exceptions a field of the wrong type or range raises while the history is rebuilt.
_MANGLED = (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError)


def load(
    path: str | os.PathLike[str], *, micro_batch: int | None = None, device: str | torch.device = "cpu"
) -> ModelHistory:
    """Reads a capture written by :func:`save`, or by a writer of ``lens_callbacks``.

    ``path`` may be a capture folder, or a step folder a writer made (``<run>/step_000100``,
    also a downloaded W&B ``lens-capture`` artifact): a step of one micro-batch loads as that
    micro-batch's history; a step of several needs ``micro_batch``.

    The history indexes exactly like the one saved (labels, module addresses, ordinals,
    ``lookup_keys``). Tensors stay on disk until a layer's ``tensor_contents`` or ``gradient``
    is first read, and are checked against the digest saved with them then. Loaded layers have
    no ``func`` and no ``call`` (so they cannot be replayed by ``validate_model_activations``),
    ``rng_states`` is empty, and ``func_call_stack`` shows the source lines saved with the
    capture (no file it names is read).

    A capture from elsewhere is safe to load (see the threat model in the README): loading
    runs no code of the capture's, reads only the regular files of its folder, within limits,
    and any problem is a :class:`CaptureFormatError`.

    Args:
        path: the capture's folder, or a step folder.
        micro_batch: which micro-batch of a step folder to load (``micro_batch_<i>/``); only
            for step folders.
        device: where loaded tensors go (``layer.device`` still says where they were made).

    Raises:
        SeveralCapturesError: ``path`` is a step folder of several micro-batches and
            ``micro_batch`` is None (the message shows the call for each), or a run folder.
        CaptureFormatError: ``path`` holds no complete, consistent capture of this format version.

    Example::

        history = lens_core.load("out/demo/lens/step_000040")
        second = lens_core.load("runs/accumulate/step_000040", micro_batch=1)
    """
    root = find_capture(Path(path), micro_batch, "load")
    target = str(torch.device(device))
    document = _read_history(root)
    try:
        tensors = TensorFile(root, _get(document, "capture_id", str), target)
        history = _rebuild(document, tensors)
        tensors.digests = _digests(document, tensors.expected)
        if "extra" in document:
            _get(document, "extra", dict)
    except CaptureFormatError:
        raise
    except _MANGLED as error:
        why = f"{HISTORY} lacks or mangles a field ({type(error).__name__}: {error})"
        raise corrupted(root, why) from None
    check_references(root, history)
    if tensors.expected:
        tensors.check()
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
    try:
        document = read_json(root, SUMMARIES)
    except FileNotFoundError:
        raise corrupted(root, f"{SUMMARIES} is missing") from None
    if not isinstance(document, dict):
        raise corrupted(root, f"{SUMMARIES} is not a JSON object of summaries")
    try:
        return {name: TensorSummary.from_dict(data) for name, data in document.items()}
    except _MANGLED as error:
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


def _rebuild(document: Mapping[str, Any], tensors: TensorFile) -> ModelHistory:
    """The history of ``document``, its stored tensors to be read from ``tensors``."""
    code = _code_context(document)
    layers = []
    for doc in _get(document, "layers", list):
        layer = _layer_from(doc, code)
        if _get(doc, "saved", bool):
            layer.tensor_source = _expect(tensors, layer.label, layer)
        count = _get(doc, "gradient_count", (int, type(None)))
        if count is not None:
            source = _expect(tensors, GRAD_PREFIX + layer.label, layer)
            layer.gradient_slot = GradientSlot(source=source, count=count)
        layers.append(layer)
    model = _get(document, "model", dict)
    return ModelHistory(
        model_name=_get(model, "model_name", str),
        layer_list=layers,
        layer_labels=_strings(model, "layer_labels"),
        module_addresses=_strings(model, "module_addresses"),
        module_types={_str(k): _str(v) for k, v in _get(model, "module_types", dict).items()},
        module_calls={_str(k): _int(v) for k, v in _get(model, "module_calls", dict).items()},
        total_params=_get(model, "total_params", int),
        total_param_bytes=_get(model, "total_param_bytes", int),
        random_seed=_get(model, "random_seed", (int, type(None)), lowest=-(2**63)),
        rng_states={},
        elapsed_time=float(_get(model, "elapsed_time", (int, float))),
    )


def _expect(tensors: TensorFile, key: str, layer: Layer) -> partial[torch.Tensor]:
    """Registers ``key`` as a tensor of ``layer``'s dtype and shape that the file must hold."""
    if key in tensors.expected:
        raise ValueError(f"two layers are labelled {layer.label!r}")
    tensors.expected[key] = (layer.dtype, layer.shape)
    return partial(tensors.read, key)


def _layer_from(doc: Mapping[str, Any], code: Mapping[tuple[str, int], tuple[str, ...]]) -> Layer:
    if not isinstance(doc, dict):
        raise TypeError(f"a layer is {type(doc).__name__}, not an object")
    return Layer(
        layer_type=_get(doc, "layer_type", str),
        type_index=_get(doc, "type_index", int),
        layer_index=_get(doc, "layer_index", int),
        pass_num=_get(doc, "pass_num", int),
        index=_get(doc, "index", int),
        func_name=_get(doc, "func_name", str),
        func=None,
        shape=check_shape(doc["shape"]),
        dtype=_dtype(_get(doc, "dtype", str)),
        device=_device(_get(doc, "device", str)),
        grad_fn_name=_get(doc, "grad_fn_name", (str, type(None))),
        module_stack=tuple(_strings(doc, "module_stack")),
        params=tuple(_param(entry) for entry in _get(doc, "params", list)),
        buffers=tuple(_strings(doc, "buffers")),
        parent_indices=_ints(doc, "parent_indices"),
        frames=None,
        stored_call_stack=_stored_call_stack(_get(doc, "func_call_stack", list), code),
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


def _param(entry: Any) -> ParamInfo:
    if not isinstance(entry, list) or len(entry) != 4:
        raise TypeError(f"params entry {entry!r:.80} is no [name, shape, numel, nbytes]")
    name, shape, numel, nbytes = entry
    return ParamInfo(_str(name), check_shape(shape), _int(numel), _int(nbytes))


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], lowest: int = 0) -> Any:
    """``doc[key]``, checked to be of ``kind`` (JSON ``true`` is no int here); an int also to be
    from ``lowest`` to the largest int64, as every count, size and index of a capture is."""
    value = doc[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{key!r} is {value!r:.80}, expected {' or '.join(k.__name__ for k in kinds)}")
    if isinstance(value, int) and not isinstance(value, bool) and not lowest <= value <= _MAX_INT:
        raise ValueError(f"{key!r} is {value!r:.80}, out of the range from {lowest} to 2**63 - 1")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r:.80}")
    if not 0 <= value <= _MAX_INT:
        raise ValueError(f"{value!r:.80} is out of the range from 0 to 2**63 - 1")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r:.80}")
    return value


def _ints(doc: Mapping[str, Any], key: str) -> list[int]:
    return [_int(value) for value in _get(doc, key, list)]


def _strings(doc: Mapping[str, Any], key: str) -> list[str]:
    return [_str(value) for value in _get(doc, key, list)]


def _dtype(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r:.80}")
    return dtype


def _device(text: str) -> torch.device:
    """The device a layer was made on; a name torch does not know is a damaged field, not torch's error."""
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"'device' is {text!r:.80}, not a torch device such as 'cpu' or 'cuda:0'")
    try:
        return torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"'device' is {text!r}, a device type torch does not know") from None


def _code_context(document: Mapping[str, Any]) -> dict[tuple[str, int], tuple[str, ...]]:
    """The source lines saved for each distinct frame; none in captures saved before they were."""
    lines: dict[tuple[str, int], tuple[str, ...]] = {}
    for entry in _get(document, "code_context", list) if "code_context" in document else ():
        if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[2], list):
            raise TypeError(f"code_context entry {entry!r:.80} is no [file, line, lines]")
        lines[_str(entry[0]), _int(entry[1])] = tuple(_str(line) for line in entry[2])
    return lines


def _stored_call_stack(
    stack: list[Any], code: Mapping[tuple[str, int], tuple[str, ...]]
) -> tuple[FrameInfo, ...]:
    frames = []
    for entry in stack:
        if not isinstance(entry, list) or len(entry) != 3:
            raise TypeError(f"func_call_stack entry {entry!r:.80} is no [file, line, function]")
        fname, line, function = _str(entry[0]), _int(entry[1]), _str(entry[2])
        frames.append(FrameInfo(fname, line, function, stored_context=code.get((fname, line), ())))
    return tuple(frames)


def _digests(document: Mapping[str, Any], expected: Mapping[str, object]) -> dict[str, str] | None:
    """The SHA-256 of each stored tensor; None for captures saved before digests were kept."""
    if "tensor_sha256" not in document:
        return None
    digests: dict[str, str] = _get(document, "tensor_sha256", dict)
    if set(digests) != set(expected) or not all(isinstance(d, str) and _SHA256.fullmatch(d)
                                                for d in digests.values()):
        raise ValueError(f"'tensor_sha256' does not hold one SHA-256 digest per stored tensor "
                         f"({len(digests)} entries for {len(expected)} tensors)")
    return digests


def _read_history(root: Path) -> dict[str, Any]:
    """history.json of ``root`` (a folder :func:`find_capture` chose), checked to be a complete
    capture of our format version."""
    try:
        document = read_json(root, HISTORY)
    except FileNotFoundError:
        if any(os.path.lexists(root / name) for name in FILES):
            raise corrupted(root, f"{HISTORY} is missing") from None
        raise CaptureFormatError(
            f"{root} is not a saved capture (it has no {HISTORY}); write one with "
            "lens_core.save(history, path)."
        ) from None
    if not isinstance(document, dict) or document.get("format") != MAGIC:
        raise CaptureFormatError(
            f"{root / HISTORY} is not the history of a lens_core capture; write one with "
            "lens_core.save(history, path)."
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        by = document.get("library_version", "an unknown version")
        by = by if isinstance(by, str) and len(by) < 40 else "an unknown version"
        raise CaptureFormatError(
            f"{root} was saved in capture format version {version!r:.40} (by lens-callbacks {by}); "
            f"this lens-callbacks ({library_version()}) reads version {FORMAT_VERSION}. Load it "
            f"with lens-callbacks {by} (pip install lens-callbacks=={by}), or save it again."
        )
    return document
