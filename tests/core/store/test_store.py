"""Saving histories to folders and loading them back: round trips, laziness, atomicity, errors."""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc
from lens_core import store
from lens_core.capture.history import ModelHistory
from lens_core.errors import LensError
from lens_core.store import CaptureFormatError
from lens_core.store import _write as store_write
from lens_core.store._tensors import TensorFile
from lens_core.summaries import summarize

# -- models ------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3), nn.ReLU(),
        )
        self.classifier = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Recurrent(nn.Module):
    """One cell called three times: multi-pass labels (``linear_1_1:2``) and module passes."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(3):
            h = torch.tanh(self.cell(h) + x)
        return self.head(h)


class ManyDtypes(nn.Module):
    """Views, in-place ops on them, and outputs of several dtypes (bf16, int64, bool)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.fc(x)
        view = y.view(2, 3, 2)
        view[0].mul_(2)  # writes through a view: shares storage with y
        z = view.relu_()
        half = z.to(torch.bfloat16) * 3
        return half, z.argmax(-1), z > 0.1, torch.empty(0, 3)


def _cnn_with_gradients() -> ModelHistory:
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    with lc.capture(model, gradients=True) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    loss2 = F.cross_entropy(model(x), y)  # outside the capture: no second gradient arrives
    loss2.backward()
    return cap.history


def _recurrent_with_gradients() -> ModelHistory:
    torch.manual_seed(1)
    model = Recurrent()
    history = lc.log_forward_pass(model, torch.randn(3, 4), save_gradients=True, random_seed=5)
    output = history[history.output_layers[0]].tensor_contents
    assert output is not None
    output.sum().backward(retain_graph=True)
    (output**2).sum().backward()  # a second backward pass: count 2, gradients add up
    return history


def _selection() -> ModelHistory:
    torch.manual_seed(2)
    return lc.log_forward_pass(SmallCNN(), torch.randn(1, 3, 8, 8), layers_to_save=["features.4", "relu"])


def _many_dtypes() -> ModelHistory:
    torch.manual_seed(3)
    return lc.log_forward_pass(ManyDtypes(), torch.randn(2, 6))


def _metadata_only() -> ModelHistory:
    torch.manual_seed(4)
    return lc.get_model_metadata(Recurrent(), torch.randn(2, 4))


HISTORIES: dict[str, Callable[[], ModelHistory]] = {
    "cnn_with_gradients": _cnn_with_gradients,
    "recurrent_with_gradients": _recurrent_with_gradients,
    "selection": _selection,
    "many_dtypes": _many_dtypes,
    "metadata_only": _metadata_only,
}

# -- comparison --------------------------------------------------------------------------------

_LAYER_FIELDS = (
    "label", "layer_label", "layer_type", "type_index", "layer_index", "pass_num", "num_passes",
    "index", "func_name", "shape", "dtype", "device", "grad_fn_name", "module_stack", "params",
    "buffers", "parent_indices", "parents", "children", "output_of_modules", "is_input",
    "is_output", "is_inplace", "output_index", "time_elapsed", "lookup_keys", "func_call_stack",
    "has_saved_activations", "module", "nbytes",
)
_HISTORY_FIELDS = (
    "model_name", "layer_labels", "all_layer_labels", "module_addresses", "module_types",
    "module_calls", "total_params", "total_param_bytes", "random_seed", "elapsed_time",
    "input_layers", "output_layers", "num_tensors_saved", "saved_activation_bytes", "module_hierarchy",
)


def _bits(tensor: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return tensor.dtype, tuple(tensor.shape), bytes(flat.view(torch.uint8).numpy())


def _assert_same(original: ModelHistory, loaded: ModelHistory, *, tensors: bool = True) -> None:
    for name in _HISTORY_FIELDS:
        if name in ("num_tensors_saved", "saved_activation_bytes") and not tensors:
            continue
        assert getattr(loaded, name) == getattr(original, name), name
    assert len(loaded) == len(original)
    for before, after in zip(original, loaded, strict=True):
        for name in _LAYER_FIELDS:
            if name == "has_saved_activations" and not tensors:
                assert not after.has_saved_activations
                continue
            assert getattr(after, name) == getattr(before, name), (before.label, name)
        for key in before.lookup_keys:
            assert loaded[key].label == original[key].label, key
        if tensors and before.tensor_contents is not None:
            assert after.tensor_contents is not None
            assert _bits(after.tensor_contents) == _bits(before.tensor_contents), before.label
        if tensors and before.gradient is not None:
            assert after.gradient is not None
            assert after.gradient_slot is not None
            assert _bits(after.gradient) == _bits(before.gradient), before.label
            assert before.gradient_slot is not None
            assert after.gradient_slot.count == before.gradient_slot.count
        else:
            assert after.gradient is None
        if tensors:  # the text shows a preview of the tensor
            assert str(after) == str(before)
    if tensors:
        assert str(loaded) == str(original)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", HISTORIES.values(), ids=HISTORIES.keys())
def test_round_trip_keeps_indexing_structure_and_exact_tensors(
    make: Callable[[], ModelHistory], tmp_path: Path
) -> None:
    history = make()
    written = store.save(history, tmp_path / "capture")
    assert written == tmp_path / "capture"
    loaded = store.load(written)
    _assert_same(history, loaded)
    assert loaded.rng_states == {}
    assert all(layer.func is None and layer.call is None for layer in loaded)
    assert sorted(os.listdir(tmp_path)) == ["capture"]  # no temporary folder left


def test_the_histories_cover_what_they_claim() -> None:
    cnn = _cnn_with_gradients()
    assert all(layer.has_saved_activations for layer in cnn)
    assert sum(layer.gradient is not None for layer in cnn) > 5
    recurrent = _recurrent_with_gradients()
    assert recurrent.is_recurrent
    assert recurrent["cell:2"].label == "linear_1_1:2"
    assert recurrent["linear_1_1:3"].gradient_slot is not None
    assert recurrent["linear_1_1:3"].gradient_slot.count == 2
    selection = _selection()
    assert 0 < selection.num_tensors_saved < len(selection)
    dtypes = {layer.dtype for layer in _many_dtypes()}
    assert {torch.bfloat16, torch.int64, torch.bool, torch.float32} <= dtypes
    assert _metadata_only().num_tensors_saved == 0


def test_saving_a_loaded_history_writes_the_same_json(tmp_path: Path) -> None:
    history = _recurrent_with_gradients()
    first = store.save(history, tmp_path / "first")
    second = store.save(store.load(first), tmp_path / "second")
    assert (first / "summaries.json").read_bytes() == (second / "summaries.json").read_bytes()
    documents = [json.loads((folder / "history.json").read_text()) for folder in (first, second)]
    assert documents[0].pop("capture_id") != documents[1].pop("capture_id")  # a new save, a new id
    assert documents[0] == documents[1]
    _assert_same(history, store.load(second))


def test_metadata_only_and_tensors_false_write_no_tensor_file(tmp_path: Path) -> None:
    store.save(_metadata_only(), tmp_path / "meta")
    assert sorted(os.listdir(tmp_path / "meta")) == ["history.json", "summaries.json"]
    history = _cnn_with_gradients()
    store.save(history, tmp_path / "no_tensors", tensors=False)
    assert not (tmp_path / "no_tensors" / "tensors.safetensors").exists()
    loaded = store.load(tmp_path / "no_tensors")
    _assert_same(history, loaded, tensors=False)
    assert loaded.layer_labels == history.layer_labels


def test_tensors_load_lazily_one_tensor_per_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = _cnn_with_gradients()
    store.save(history, tmp_path / "capture")
    reads: list[str] = []
    real_read = TensorFile.read

    def counting_read(self: TensorFile, key: str) -> torch.Tensor:
        reads.append(key)
        return real_read(self, key)

    monkeypatch.setattr(TensorFile, "read", counting_read)
    loaded = store.load(tmp_path / "capture")
    assert reads == []  # loading checks the header only
    assert all(layer.saved_tensor is None and layer.has_saved_activations for layer in loaded)
    conv = loaded["features.0"]
    assert conv.tensor_contents is not None
    assert reads == [conv.label]
    assert conv.tensor_contents is conv.saved_tensor  # read once, then kept
    assert reads == [conv.label]
    assert conv.gradient_slot is not None
    assert conv.gradient_slot.has_value
    assert conv.gradient is not None
    assert reads == [conv.label, f"grad/{conv.label}"]
    assert sum(layer.saved_tensor is not None for layer in loaded) == 1


def test_tensors_can_be_loaded_onto_another_device(tmp_path: Path) -> None:
    store.save(_selection(), tmp_path / "capture")
    loaded = store.load(tmp_path / "capture", device="meta")
    tensor = loaded["features.4"].tensor_contents
    assert tensor is not None
    assert tensor.device.type == "meta"
    assert loaded["features.4"].device == torch.device("cpu")  # where it was made


def test_summaries_and_extra_come_back(tmp_path: Path) -> None:
    history = _selection()
    summaries = summarize({layer.label: layer.tensor_contents for layer in history.saved_layers
                           if layer.tensor_contents is not None} | {"empty": torch.empty(0)})
    extra = {"step": 100, "stage": "train", "tags": ["a", "b"], "lr": 0.1}
    store.save(history, tmp_path / "capture", summaries=summaries, extra=extra)
    back = store.load_summaries(tmp_path / "capture")
    assert list(back) == list(summaries)
    for name, summary in summaries.items():
        assert back[name].to_dict() == summary.to_dict()
    assert store.load_extra(tmp_path / "capture") == extra
    store.save(history, tmp_path / "plain")
    assert store.load_summaries(tmp_path / "plain") == {}
    assert store.load_extra(tmp_path / "plain") == {}


def test_files_are_plain_json_and_safetensors_with_nothing_else(tmp_path: Path) -> None:
    history = _cnn_with_gradients()
    folder = store.save(history, tmp_path / "capture", summaries=summarize({"x": torch.randn(4)}))
    assert sorted(os.listdir(folder)) == ["history.json", "summaries.json", "tensors.safetensors"]
    document = json.loads((folder / "history.json").read_text())
    assert document["format_version"] == store.FORMAT_VERSION
    assert isinstance(document["library_version"], str)
    json.loads((folder / "summaries.json").read_text())
    # safetensors layout: 8-byte header length, JSON header, then tensor bytes that it maps exactly
    raw = (folder / "tensors.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0
    assert spans[-1][1] == len(raw) - 8 - size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    labels = {layer.label for layer in history.saved_layers}
    grads = {f"grad/{layer.label}" for layer in history if layer.gradient is not None}
    assert set(header) - {"__metadata__"} == labels | grads


# -- atomic writes and overwriting ---------------------------------------------------------------


def _failing_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
    with open(filename, "wb") as file:
        file.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"half")  # a truncated header
    raise OSError("disk full")


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = _selection()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        store.save(history, tmp_path / "capture")
    assert os.listdir(tmp_path) == []


def test_a_crash_mid_save_leaves_only_a_hidden_folder_that_load_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = _selection()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    monkeypatch.setattr(store_write.shutil, "rmtree", lambda *args, **kwargs: None)  # the process dies
    with pytest.raises(OSError, match="disk full"):
        store.save(history, tmp_path / "capture")
    assert not (tmp_path / "capture").exists()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".capture.tmp-")
    with pytest.raises(CaptureFormatError, match="did not finish"):
        store.load(tmp_path / left)


def test_a_crash_after_the_last_file_still_leaves_nothing_at_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_rename(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_write.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        store.save(_selection(), tmp_path / "capture")
    assert os.listdir(tmp_path) == []


def test_an_existing_capture_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "capture"
    store.save(_selection(), path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store.save(_recurrent_with_gradients(), path)
    assert store.load(path).model_name == "SmallCNN"
    newer = _recurrent_with_gradients()
    store.save(newer, path, overwrite=True)
    _assert_same(newer, store.load(path))
    assert os.listdir(tmp_path) == ["capture"]


def test_a_failed_overwrite_keeps_the_old_capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "capture"
    old = _selection()
    store.save(old, path)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        store.save(_cnn_with_gradients(), path, overwrite=True)
    _assert_same(old, store.load(path))
    assert os.listdir(tmp_path) == ["capture"]


def test_a_folder_that_is_not_a_capture_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me")
    for name in ("mine", "file"):
        with pytest.raises(FileExistsError, match="not a saved capture"):
            store.save(_selection(), tmp_path / name, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me"


def test_save_creates_missing_parents(tmp_path: Path) -> None:
    path = store.save(_selection(), tmp_path / "run" / "step_1" / "micro_batch_0")
    assert store.load(path).model_name == "SmallCNN"


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    history = _selection()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        store.save(history, tmp_path / "a", extra={"model": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="TensorSummary"):
        store.save(history, tmp_path / "a", summaries={"x": torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="ModelHistory"):
        store.save(object(), tmp_path / "a")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_saving_without_tensors_needs_no_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    history = _selection()
    store.save(history, tmp_path / "meta", tensors=False)
    assert store.load(tmp_path / "meta").model_name == "SmallCNN"
    with pytest.raises(ImportError, match=r'pip install "lens-callbacks\[all\]"'):
        store.save(history, tmp_path / "full")
    assert sorted(os.listdir(tmp_path)) == ["meta"]


# -- loading errors -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return store.save(_cnn_with_gradients(), tmp_path / "capture")


def _load_fails(path: Path, match: str) -> CaptureFormatError:
    with pytest.raises(CaptureFormatError, match=match) as caught:
        store.load(path)
    assert isinstance(caught.value, LensError)
    assert str(path) in str(caught.value)
    return caught.value


def test_paths_that_are_not_captures(tmp_path: Path) -> None:
    _load_fails(tmp_path / "missing", "does not exist")
    (tmp_path / "file").write_text("x")
    _load_fails(tmp_path / "file", "is a file")
    (tmp_path / "empty").mkdir()
    _load_fails(tmp_path / "empty", r"not a saved capture .*lens_core\.save")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "history.json").write_text('{"something": "else"}')
    _load_fails(tmp_path / "other", "not the history of a lens_core capture")


@pytest.mark.parametrize("name", ["history.json", "summaries.json", "tensors.safetensors"])
def test_a_missing_file_is_reported(saved: Path, name: str) -> None:
    (saved / name).unlink()
    if name == "summaries.json":
        with pytest.raises(CaptureFormatError, match=r"summaries\.json is missing"):
            store.load_summaries(saved)
    else:
        _load_fails(saved, f"damaged capture: {name} is missing")


def test_json_that_does_not_parse(saved: Path) -> None:
    text = (saved / "history.json").read_text()
    (saved / "history.json").write_text(text[: len(text) // 2])
    _load_fails(saved, "history.json is not valid JSON")
    (saved / "summaries.json").write_text("{")
    with pytest.raises(CaptureFormatError):
        store.load_summaries(saved)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["layers"][2].pop("shape"), "KeyError: 'shape'"),
        (lambda d: d["layers"][0].__setitem__("index", "zero"), "'index' is 'zero'"),
        (lambda d: d["layers"][1].__setitem__("dtype", "float33"), "unknown dtype"),
        (lambda d: d["model"].pop("module_types"), "module_types"),
        (lambda d: d.pop("layers"), "layers"),
    ],
)
def test_mangled_fields_are_reported(saved: Path, edit: Callable[[dict[str, Any]], Any], match: str) -> None:
    document = json.loads((saved / "history.json").read_text())
    edit(document)
    (saved / "history.json").write_text(json.dumps(document))
    _load_fails(saved, match)


def test_another_format_version_names_both_versions(saved: Path) -> None:
    document = json.loads((saved / "history.json").read_text())
    document["format_version"] = 99
    document["library_version"] = "9.9.0"
    (saved / "history.json").write_text(json.dumps(document))
    error = _load_fails(saved, "format version 99")
    assert f"reads version {store.FORMAT_VERSION}" in str(error)
    assert "lens-callbacks==9.9.0" in str(error)


def test_a_tensor_file_without_a_tensor_it_should_hold(saved: Path) -> None:
    label = store.load(saved)["features.4"].label  # the second conv2d
    with safetensors.safe_open(str(saved / "tensors.safetensors"), framework="pt") as file:
        kept = [key for key in file.keys() if key != label]  # noqa: SIM118  # not a dict
        tensors = {key: file.get_tensor(key) for key in kept}
        metadata = file.metadata()
    safetensors.torch.save_file(tensors, str(saved / "tensors.safetensors"), metadata=metadata)
    _load_fails(saved, f"tensors.safetensors lacks 1 tensors .{label}.")


def test_a_garbled_tensor_file(saved: Path) -> None:
    (saved / "tensors.safetensors").write_bytes(b"garbage")
    _load_fails(saved, "tensors.safetensors is 7 bytes, too short for a safetensors file")


def test_a_tensor_file_removed_after_loading_fails_clearly_on_first_read(saved: Path) -> None:
    loaded = store.load(saved)
    (saved / "tensors.safetensors").unlink()
    with pytest.raises(CaptureFormatError, match="cannot be read"):
        _ = loaded["features.0"].tensor_contents


def test_a_tensor_file_of_another_capture_is_refused(saved: Path, tmp_path: Path) -> None:
    other = store.save(_cnn_with_gradients(), tmp_path / "other")  # same model, same keys
    (saved / "tensors.safetensors").write_bytes((other / "tensors.safetensors").read_bytes())
    _load_fails(saved, "tensors.safetensors belongs to another capture")


def test_a_capture_overwritten_after_loading_is_not_read_as_this_one(saved: Path) -> None:
    loaded = store.load(saved)
    store.save(_cnn_with_gradients(), saved, overwrite=True)
    with pytest.raises(CaptureFormatError, match=r"replaced by another capture .* load .* again"):
        _ = loaded["features.0"].tensor_contents
