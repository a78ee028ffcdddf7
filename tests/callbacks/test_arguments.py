"""Every public argument is checked where it is given, and the error names it with the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lens_callbacks import DiskWriter, Lens
from tests.callbacks.helpers import ListWriter, SmallCNN, batches

LENS_AND_CALLBACKS = [
    ({"save_tensors": "yes"}, TypeError, "save_tensors='yes': use True or False"),
    ({"strict": "no"}, TypeError, "strict='no': use True or False"),
    ({"background": 1}, TypeError, "background=1: use True or False"),
    ({"bins": 0}, ValueError, "bins=0"),
    ({"layers": 3.5}, TypeError, "layers=3.5 is not a layer selection"),
    ({"writers": [object()]}, TypeError, "writers holds <object .*has no write"),
    ({"writers": DiskWriter("runs")}, TypeError, r"writers=DiskWriter\(...\) is one writer: pass a list"),
    ({"writers": "runs"}, TypeError, "writers='runs': use a list of writers"),
    ({"log_dir": 123}, TypeError, "log_dir=123: use a folder path"),
    ({"every_n_steps": 2.5}, ValueError, "every_n_steps=2.5: use an int >= 1"),
    ({"steps": [1.5]}, ValueError, "steps contains 1.5"),
    ({"write_timeout": 0}, ValueError, "write_timeout=0: use a number of seconds > 0"),
    ({"write_timeout": "5"}, ValueError, "write_timeout='5'"),
    ({"max_queued": 0}, ValueError, "max_queued=0: use an int >= 1"),
]
WITH_STAGES = [
    ({"stages": None}, TypeError, "stages=None: use a stage or a list of them"),
    ({"stages": "validation"}, ValueError, r"stages=\['validation'\]: choose from .*'validate'"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [*LENS_AND_CALLBACKS, *WITH_STAGES, ({"log_dir": None}, TypeError, "log_dir=None: use a folder path")],
)
def test_lens_rejects_at_construction(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Lens(SmallCNN(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [*LENS_AND_CALLBACKS, *WITH_STAGES, ({"ranks": "one"}, ValueError, "ranks='one'")],
)
def test_lightning_callback_rejects_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    pytest.importorskip("lightning")
    from lens_callbacks import LensCallback

    with pytest.raises(error, match=match):
        LensCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), [*LENS_AND_CALLBACKS, ({"ranks": "some"}, ValueError, "ranks='some'")]
)
def test_trainer_callback_rejects_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    pytest.importorskip("transformers")
    from lens_callbacks import LensTrainerCallback

    with pytest.raises(error, match=match):
        LensTrainerCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"root": None}, TypeError, "root=None: use a folder path"),
        ({"root": 123}, TypeError, "root=123: use a folder path"),
        ({"root": "r", "per_rank": "no"}, TypeError, "per_rank='no': use True or False"),
        ({"root": "r", "save_tensors": "yes"}, TypeError, "save_tensors='yes': use True or False"),
    ],
)
def test_disk_writer_rejects_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        DiskWriter(**kwargs)


@pytest.mark.parametrize(
    ("step", "stage", "error", "match"),
    [
        (-1, "train", ValueError, "step=-1: steps are ints >= 0"),
        ("a", "train", TypeError, "step='a' .*use an int >= 0"),
        (3.0, "train", TypeError, r"step=3.0 \(float\): use an int >= 0"),
        (True, "train", TypeError, "step=True"),
        (0, "validation", ValueError, "stage='validation': use one of .*'validate'"),
    ],
)
def test_bad_steps_and_stages_raise_before_anything_runs(
    step: Any, stage: Any, error: type[Exception], match: str
) -> None:
    lens = Lens(SmallCNN(), every_n_steps=1, writers=[ListWriter()])
    with pytest.raises(error, match=match), lens.step(step, stage):
        pass
    with pytest.raises(error, match=match):
        lens.arm(step, stage)
    assert not lens.capturing


def test_numpy_steps_work_end_to_end(tmp_path: Path) -> None:
    model = SmallCNN()
    lens = Lens(model, layers="conv", every_n_steps=np.int64(2), steps=[np.int32(3)], log_dir=tmp_path)
    for step, (x, y) in zip(np.arange(5, dtype=np.int64), batches(5), strict=True):
        with lens.step(step):
            torch.nn.functional.cross_entropy(model(x), y).backward()
    lens.close()
    written = sorted(path.parent.name for path in tmp_path.glob("*/summaries.json"))
    assert written == ["step_000000", "step_000002", "step_000003", "step_000004"]
    summaries = json.loads((tmp_path / "step_000003" / "summaries.json").read_text())
    assert summaries["step"] == 3
    assert type(lens.last_step) is int


def test_a_step_lower_than_the_last_written_is_warned_about_once() -> None:
    model = SmallCNN()
    writer = ListWriter()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    x = torch.randn(2, 1, 8, 8)
    with lens.step(5):
        model(x).sum().backward()
    backwards = "step 3 comes after step 5 was written: steps up to 5 are not"
    with pytest.warns(RuntimeWarning, match=backwards), lens.step(3):
        model(x).sum().backward()
    with lens.step(4):  # said once
        model(x).sum().backward()
    with lens.step(6):
        model(x).sum().backward()
    lens.close()
    assert writer.steps == [5, 6]
