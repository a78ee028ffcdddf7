"""Loading the folders training writes: step folders of micro-batches, run folders of steps.

The folders are made here as the writers of lens_callbacks make them (one ``store.save`` per
micro-batch, then the step's ``summaries.json``); ``tests/callbacks`` loads the writers' own.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core import store
from lens_core.capture.history import ModelHistory
from lens_core.store import CaptureFormatError, SeveralCapturesError
from lens_core.store.folders import micro_batch_name, rank_folder_name, step_folder_name
from lens_core.summaries import summarize


def _history(seed: int) -> ModelHistory:
    torch.manual_seed(seed)
    return lc.log_forward_pass(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.randn(2, 3))


def _step(
    folder: Path, micro_batches: int = 1, *, step: int = 40, finished: bool = True
) -> list[ModelHistory]:
    """A step folder as DiskWriter writes it; returns the histories saved in it."""
    histories = [_history(index) for index in range(micro_batches)]
    for index, history in enumerate(histories):
        outputs = {layer.label: layer.tensor_contents for layer in history.saved_layers
                   if layer.tensor_contents is not None}
        store.save(history, folder / micro_batch_name(index), summaries=summarize(outputs),
                   extra={"step": step, "micro_batch": index})
    if finished:  # written last
        pooled = {"step": step, "stage": "train", "rank": 0, "activations": {}, "gradients": {},
                  "parameter_gradients": {}}
        (folder / "summaries.json").write_text(json.dumps(pooled))
    return histories


def _same(loaded: ModelHistory, saved: ModelHistory) -> None:
    assert loaded.layer_labels == saved.layer_labels
    for layer in saved.saved_layers:
        back, written = loaded[layer.label].tensor_contents, layer.tensor_contents
        assert back is not None
        assert written is not None
        assert torch.equal(back, written)


# -- step folders ----------------------------------------------------------------------------------


def test_a_step_of_one_micro_batch_loads_as_its_history(tmp_path: Path) -> None:
    step = tmp_path / "lens" / "step_000040"
    (saved,) = _step(step)
    (step / "graph.svg").write_text("<svg/>")  # extra files of a step are fine (the W&B artifact has one)
    _same(lc.load(step), saved)
    _same(lc.load(step, micro_batch=0), saved)
    assert lc.load_extra(step) == {"step": 40, "micro_batch": 0} == lc.load_extra(step, micro_batch=0)
    summaries = lc.load_summaries(step)  # the micro-batch's, not the step's pooled summaries.json
    assert summaries.keys() == lc.load_summaries(step / "micro_batch_0").keys() == set(saved.layer_labels)


def test_a_step_of_several_micro_batches_says_how_to_load_each(tmp_path: Path) -> None:
    step = tmp_path / "step_000040"
    saved = _step(step, 2)
    with pytest.raises(SeveralCapturesError) as caught:
        lc.load(step)
    message = str(caught.value)
    assert message.startswith(f"{step} is a step folder of 2 micro-batches")
    assert f"lens_core.load('{step}', micro_batch=0), lens_core.load('{step}', micro_batch=1)" in message
    assert "damaged" not in message
    assert isinstance(caught.value, CaptureFormatError)
    assert caught.value.captures == (step / "micro_batch_0", step / "micro_batch_1")
    for index, history in enumerate(saved):
        _same(lc.load(step, micro_batch=index), history)
        _same(lc.load(caught.value.captures[index]), history)
        assert lc.load_extra(step, micro_batch=index)["micro_batch"] == index
        assert lc.load_summaries(step, micro_batch=index).keys() == set(history.layer_labels)
    with pytest.raises(SeveralCapturesError, match=r"lens_core\.load_extra\(.*, micro_batch=1\)"):
        lc.load_extra(step)
    with pytest.raises(SeveralCapturesError, match=r"lens_core\.load_summaries\(.*, micro_batch=1\)"):
        lc.load_summaries(step)


def test_micro_batches_sort_by_number_and_long_lists_are_shortened(tmp_path: Path) -> None:
    step = tmp_path / "step_000001"
    _step(step, 11)
    assert [p.name for p in store.micro_batch_folders(step)] == [f"micro_batch_{i}" for i in range(11)]
    with pytest.raises(SeveralCapturesError) as caught:
        lc.load(step)
    assert "micro_batch=1), ..., lens_core.load" in str(caught.value)
    assert "micro_batch=10)" in str(caught.value)
    assert len(caught.value.captures) == 11


def test_micro_batch_is_checked(tmp_path: Path) -> None:
    step = tmp_path / "step_000040"
    _step(step, 2)
    with pytest.raises(CaptureFormatError, match=r"has no micro_batch_2/ .*saved there are: 0, 1"):
        lc.load(step, micro_batch=2)
    with pytest.raises(TypeError, match="micro_batch='1'"):
        lc.load(step, micro_batch="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="micro_batch=True"):
        lc.load(step, micro_batch=True)
    with pytest.raises(ValueError, match="micro_batch=-1: micro-batches count from 0"):
        lc.load(step, micro_batch=-1)
    with pytest.raises(ValueError, match=r"is one saved capture .* without micro_batch"):
        lc.load(step / "micro_batch_1", micro_batch=0)


def test_the_error_survives_pickling(tmp_path: Path) -> None:
    _step(tmp_path / "step_000040", 2)
    with pytest.raises(SeveralCapturesError) as caught:
        lc.load(tmp_path / "step_000040")
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value)


# -- run folders -------------------------------------------------------------------------------


def test_a_run_folder_names_its_steps(tmp_path: Path) -> None:
    run = tmp_path / "lens"
    for step in (0, 20, 40):
        _step(run / step_folder_name(step), step=step)
    _step(run / step_folder_name(20, "validate"), step=20)
    with pytest.raises(SeveralCapturesError) as caught:
        lc.load(run)
    message = str(caught.value)
    assert message.startswith(
        f"{run} is a run folder holding 4 captured steps (step_000000, step_000020, validate_step_000020, "
        "step_000040), not one capture"
    )
    assert f"lens_core.load('{run / 'step_000040'}')" in message
    assert f"lens_core.store.step_folders('{run}')" in message
    assert [found.path.name for found in store.step_folders(run)] == [
        "step_000000", "step_000020", "validate_step_000020", "step_000040",
    ]
    hint = r"is not a saved capture .*Its subfolder .*lens is a run folder"
    with pytest.raises(CaptureFormatError, match=hint):
        lc.load(tmp_path)


def test_a_run_folder_per_rank(tmp_path: Path) -> None:
    for rank in (1, 0):
        for step in range(6):
            _step(tmp_path / rank_folder_name(rank) / step_folder_name(step), step=step)
    found = store.step_folders(tmp_path)
    assert [(f.step, f.rank) for f in found[:3]] == [(0, 0), (0, 1), (1, 0)]
    listed = r"holding 12 captured steps \(rank_0/step_000000, .* and 4 more\)"
    with pytest.raises(SeveralCapturesError, match=listed):
        lc.load(tmp_path)
    with pytest.raises(SeveralCapturesError, match="holding 6 captured steps"):
        lc.load(tmp_path / "rank_1")


# -- unfinished and damaged --------------------------------------------------------------------


def test_a_damaged_micro_batch_is_called_damaged(tmp_path: Path) -> None:
    step = tmp_path / "step_000040"
    _step(step)
    (step / "micro_batch_0" / "history.json").unlink()
    with pytest.raises(CaptureFormatError, match=r"is a damaged capture: history\.json is missing") as caught:
        lc.load(step)
    assert str(caught.value).startswith(str(step / "micro_batch_0"))


def test_a_step_left_half_written_is_not_called_damaged(tmp_path: Path) -> None:
    died = tmp_path / "step_000001"
    _step(died, finished=False)
    (died / ".micro_batch_1.tmp-0123456789ab").mkdir()
    cut = r"half-written step folder: the save of \.micro_batch_1"
    with pytest.raises(CaptureFormatError, match=cut) as caught:
        lc.load(died)
    assert f"lens_core.load('{died}', micro_batch=0)" in str(caught.value)
    assert "damaged" not in str(caught.value)
    assert lc.load(died, micro_batch=0).layer_labels

    unfinished = tmp_path / "step_000002"
    _step(unfinished, finished=False)  # micro-batch 0 saved; the next not begun, summaries.json not written
    with pytest.raises(CaptureFormatError, match=r"half-written step folder: its summaries\.json, written"):
        lc.load(unfinished)

    first = tmp_path / "step_000003"
    (first / ".micro_batch_0.tmp-0123456789ab").mkdir(parents=True)
    with pytest.raises(CaptureFormatError, match=r"half-written .* capture that step again\.$"):
        lc.load(first)


def test_step_folders_without_a_capture(tmp_path: Path) -> None:
    moved = tmp_path / "download"  # a step's files, its micro-batch folders gone
    _step(moved)
    (moved / "micro_batch_0").rename(tmp_path / "elsewhere")
    with pytest.raises(CaptureFormatError, match=r"is a damaged step folder: it has the step's summaries"):
        lc.load(moved)
    anomaly = tmp_path / "step_000007"
    anomaly.mkdir()
    (anomaly / "anomaly.json").write_text("{}")
    with pytest.raises(CaptureFormatError, match=r"only the anomaly report of that step \(anomaly\.json"):
        lc.load(anomaly)
    with pytest.raises(CaptureFormatError, match=r"pass the folder that holds it"):
        lc.load(tmp_path / "elsewhere" / "history.json")
