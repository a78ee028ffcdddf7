"""WandbWriter against a real offline W&B run, read back from its record file."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lens_callbacks import CaptureRecord, Lens
from lens_callbacks.writers.wandb import TABLE_COLUMNS, WandbWriter
from lens_core import store
from lens_core.summaries import TensorSummary
from tests.callbacks.helpers import ListWriter, SmallCNN, batches
from tests.conftest import require

wandb = pytest.importorskip("wandb")  # the [wandb] extra

from tests.callbacks.writers import wandb_records  # noqa: E402  # decodes wandb's own protobuf records


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An offline W&B set-up that writes nothing outside ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for variable, folder in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                             ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    yield tmp_path
    if wandb.run is not None:  # a failed test must not leave its run active for the next one
        wandb.run.finish()


def train(lens: Lens, steps: int, run: Any = None) -> None:
    """A plain loop; each step's loss is logged by the user at that step, after the capture."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(lens.model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches(steps)):
        with lens.step(step):
            loss = F.cross_entropy(lens.model(x), y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if run is not None:
            run.log({"loss": loss.item()}, step=step)
    lens.close()


def lens_rows(records: list[Any]) -> dict[int, dict[str, Any]]:
    """Rows holding a capture, by their ``lens/step``."""
    return {row["lens/step"]: row for row in wandb_records.history_rows(records) if "lens/step" in row}


def captures(records: list[Any]) -> list[Any]:
    return [a for a in wandb_records.artifacts(records) if a.type == "lens-capture"]


def check_histogram(logged: dict[str, Any], summary: TensorSummary) -> None:
    assert logged["_type"] == "histogram"
    assert logged["values"] == list(summary.histogram.counts)
    assert logged["bins"] == list(summary.histogram.edges)


def test_plain_loop_logs_histograms_table_and_artifact_at_the_step(offline: Path) -> None:
    run = wandb.init(project="lens-test", dir=offline)
    seen = ListWriter()
    lens = Lens(SmallCNN(), every_n_steps=2, writers=[WandbWriter(run, graph=False), seen], strict=True)
    train(lens, 5, run)
    run.finish()
    records = wandb_records.finished_records(offline)
    assert wandb_records.run_file(offline).stat().st_size > 32 * 1024  # several blocks were read

    rows = lens_rows(records)
    assert sorted(rows) == [0, 2, 4] == seen.steps
    every = {row["_step"]: row for row in wandb_records.history_rows(records)}
    assert all("loss" in every[step] for step in range(5))  # the user's logs at those steps landed
    for capture in seen.seen:
        row = rows[capture.step]
        assert row["_step"] == capture.step  # the trainer's step axis
        check_histogram(row["lens/activations/conv1/conv2d_1_1"], capture.activations["conv2d_1_1"])
        check_histogram(row["lens/gradients/fc/linear_1_9"], capture.gradients["linear_1_9"])
        check_histogram(row["lens/activations/relu_2_5"], capture.activations["relu_2_5"])  # top level
        check_histogram(row["lens/parameter_gradients/conv2.weight"],
                        capture.parameter_gradients["conv2.weight"])
        table = row["lens/statistics"]
        expected = len(capture.activations) + len(capture.gradients) + len(capture.parameter_gradients)
        assert (table["_type"], table["ncols"], table["nrows"]) == ("table-file", 15, expected)

    table = json.loads((wandb_records.run_file(offline).parent / "files" / table["path"]).read_text())
    assert table["columns"] == list(TABLE_COLUMNS)
    by_key = {(r[0], r[4]): dict(zip(TABLE_COLUMNS, r, strict=True)) for r in table["data"]}
    conv = by_key["conv2d_2_4", "activation"]
    summary = seen.seen[-1].activations["conv2d_2_4"]
    assert (conv["module"], conv["type"], conv["shape"]) == ("conv2", "conv2d", "(4, 8, 4, 4)")
    assert (conv["mean"], conv["l2_norm"], conv["numel"]) == (summary.mean, summary.l2_norm, summary.numel)
    weight = by_key["fc.weight", "param_grad"]
    assert (weight["module"], weight["type"], weight["shape"]) == ("fc", "linear", "(3, 32)")
    assert by_key["linear_1_9", "gradient"]["numel"] == 12

    artifacts = captures(records)
    assert {a.name for a in artifacts} == {f"lens-capture-{run.id}"}
    assert [sorted(a.aliases) for a in artifacts] == [["latest", f"step-{n}"] for n in (0, 2, 4)]
    for artifact in artifacts:  # the step folder, as DiskWriter writes it
        assert {c.path for c in artifact.manifest.contents} == {
            "micro_batch_0/history.json", "micro_batch_0/summaries.json", "summaries.json",
        }
        assert json.loads(artifact.metadata)["micro_batches"] == 1

    axes = {(m.glob_name or m.name, m.step_metric) for m in wandb_records.metrics(records)}
    assert {("lens/step", ""), ("lens/*", "lens/step")} <= axes


def test_a_capture_below_the_run_step_is_kept_under_lens_step(offline: Path) -> None:
    run = wandb.init(project="lens-test", dir=offline)
    run.log({"warmup": 1.0}, step=10)
    run.log({"warmup": 2.0})  # commits step 10: the run is at 11
    keep = offline / "kept"
    writer = WandbWriter(run, log_dir=keep, save_tensors=True, graph=False)
    lens = Lens(SmallCNN(), steps=[3], writers=[writer], strict=True)
    train(lens, 4)
    run.log({"after": 1.0}, step=11)  # the writer left the run's step where it was
    run.finish()
    records = wandb_records.finished_records(offline)

    rows = lens_rows(records)
    assert list(rows) == [3]
    assert rows[3]["_step"] == 11  # the run's current row, not the dropped step 3
    assert "lens/activations/conv1/conv2d_1_1" in rows[3]
    assert rows[3]["after"] == 1.0

    (artifact,) = captures(records)
    assert "step-3" in artifact.aliases
    paths = {c.path for c in artifact.manifest.contents}
    files = ("history.json", "summaries.json", "tensors.safetensors")
    assert {f"micro_batch_0/{name}" for name in files} <= paths
    history = store.load(keep / "step_000003")  # log_dir keeps what was uploaded: a step folder
    assert history["conv2d_1_1"].tensor_contents is not None
    assert store.load_extra(keep / "step_000003")["step"] == 3
    assert store.load(keep / "step_000003" / "micro_batch_0").layer_labels == history.layer_labels


Layers = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
"""Label -> (output, gradient) of each layer of one micro-batch."""


@dataclass
class Snapshots:
    """Keeps a copy of every micro-batch's labels, outputs and gradients, as the writers saw them."""

    steps: dict[int, list[Layers]] = field(default_factory=dict)

    def write(self, record: CaptureRecord) -> None:
        self.steps[record.step] = [
            {layer.label: (_copy(layer.tensor_contents), _copy(layer.gradient)) for layer in history}
            for history in record.histories
        ]

    def close(self) -> None: ...


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def _assert_loads_as(history: Any, layers: Layers) -> None:
    assert [layer.label for layer in history] == list(layers)
    for layer in history:
        output, gradient = layers[layer.label]
        for loaded, written in ((layer.tensor_contents, output), (layer.gradient, gradient)):
            assert (loaded is None) == (written is None), layer.label
            if loaded is not None and written is not None:
                assert torch.equal(loaded, written), layer.label


def test_the_artifact_is_the_step_folder_and_loads_back(offline: Path) -> None:
    run = wandb.init(project="lens-test", dir=offline)
    kept = Snapshots()
    single = Lens(SmallCNN(), steps=[0], writers=[WandbWriter(run, save_tensors=True, graph=False), kept],
                  strict=True)
    train(single, 1)
    model = SmallCNN()
    accumulating = Lens(model, steps=[1], accumulate_grad_batches=2, strict=True,
                        writers=[WandbWriter(run, save_tensors=True, graph=False), kept])
    for x, y in batches(2, seed=1):
        with accumulating.step(1):
            F.cross_entropy(model(x), y).backward()
    accumulating.close()
    run.finish()
    records = wandb_records.finished_records(offline)
    by_step = {json.loads(a.metadata)["step"]: a for a in captures(records)}
    assert sorted(by_step) == [0, 1]
    assert [len(kept.steps[step]) for step in (0, 1)] == [1, 2]
    assert all(output is not None for output, _ in kept.steps[1][1].values())
    assert sum(gradient is not None for _, gradient in kept.steps[1][1].values()) > 5

    one = wandb_records.artifact_folder(by_step[0], offline / "downloaded" / "one")
    assert sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file()) == [
        "micro_batch_0/history.json", "micro_batch_0/summaries.json", "micro_batch_0/tensors.safetensors",
        "summaries.json",
    ]
    _assert_loads_as(store.load(one), kept.steps[0][0])  # one micro-batch: the folder loads as it
    assert store.load_extra(one) == {"step": 0, "stage": "train", "rank": 0}
    assert store.load_summaries(one).keys() == store.load_summaries(one / "micro_batch_0").keys()

    two = wandb_records.artifact_folder(by_step[1], offline / "downloaded" / "two")
    assert json.loads(by_step[1].metadata)["micro_batches"] == 2
    with pytest.raises(store.SeveralCapturesError, match="2 micro-batches") as caught:
        store.load(two)
    assert f"lens_core.load('{two}', micro_batch=1)" in str(caught.value)
    assert caught.value.captures == (two / "micro_batch_0", two / "micro_batch_1")
    for index in (0, 1):
        _assert_loads_as(store.load(two, micro_batch=index), kept.steps[1][index])
        assert store.load_extra(two, micro_batch=index)["step"] == 1


def test_other_stages_and_too_many_bins(offline: Path) -> None:
    run = wandb.init(project="lens-test", dir=offline)
    seen = ListWriter()
    model = SmallCNN()
    lens = Lens(model, steps=[1], stages=("train", "validate"), bins=600,
                writers=[WandbWriter(run, graph=False), seen], strict=True)
    train(lens, 2)
    x, y = batches(1, seed=1)[0]
    with torch.no_grad(), lens.step(1, "validate"):
        F.cross_entropy(model(x), y)
    lens.close()
    run.finish()
    records = wandb_records.finished_records(offline)

    row = lens_rows(records)[1]
    assert "lens/activations/conv1/conv2d_1_1" in row
    logged = row["lens/validate/activations/conv1/conv2d_1_1"]  # same step, its own keys
    summary = seen.seen[1].activations["conv2d_1_1"]
    assert seen.seen[1].stage == "validate"
    counts, edges = summary.histogram.counts, summary.histogram.edges
    # W&B takes at most 512 bins: pairs of bins are merged, counts stay exact
    assert logged["values"] == [counts[i] + counts[i + 1] for i in range(0, 600, 2)]
    assert logged["bins"] == list(edges[::2])
    assert {(a.name, tuple(sorted(a.aliases))) for a in captures(records)} == {
        (f"lens-capture-{run.id}", ("latest", "step-1")),
        (f"lens-capture-{run.id}-validate", ("latest", "step-1")),
    }


@pytest.mark.filterwarnings("error:WandbWriter could not render:RuntimeWarning")
def test_graph_is_logged_when_dot_is_there(offline: Path) -> None:
    require(shutil.which("dot") is not None, "the dot binary (Debian package graphviz) is not installed")
    run = wandb.init(project="lens-test", dir=offline)
    train(Lens(SmallCNN(), steps=[0], writers=[WandbWriter(run)], strict=True), 1)
    run.finish()
    records = wandb_records.finished_records(offline)
    assert lens_rows(records)[0]["lens/graph"]["_type"] == "html-file"
    (artifact,) = captures(records)
    assert "graph.svg" in {c.path for c in artifact.manifest.contents}


def test_lightning_wandb_logger(offline: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lens_callbacks import LensCallback
    from tests.callbacks.lightning_helpers import LitCNN, loader, trainer

    assert WandbWriter.from_logger(CSVLogger(offline)) is None
    assert WandbWriter.from_logger(None) is None
    logger = WandbLogger(project="lens-test", offline=True, save_dir=str(offline))
    writer = WandbWriter.from_logger(logger)
    assert writer is not None
    pickle.loads(pickle.dumps(writer))  # ddp_spawn pickles callbacks: the run is not started yet
    callback = LensCallback(every_n_steps=2, writers=[writer], strict=True)
    trainer(offline, [callback], logger=logger, max_steps=4).fit(LitCNN(), loader())
    run_id = logger.experiment.id
    logger.experiment.finish()
    records = wandb_records.finished_records(offline)

    rows = lens_rows(records)
    assert sorted(rows) == [0, 2]
    assert all("lens/gradients/net.fc/linear_1_9" in row for row in rows.values())
    assert [sorted(a.aliases) for a in captures(records)] == [["latest", "step-0"], ["latest", "step-2"]]
    assert {a.name for a in captures(records)} == {f"lens-capture-{run_id}"}


def test_no_op_experiment_off_rank_zero_writes_nothing(offline: Path) -> None:
    from lightning.pytorch.loggers.logger import DummyExperiment

    seen = ListWriter()
    train(Lens(SmallCNN(), steps=[0], writers=[WandbWriter(DummyExperiment()), seen], strict=True), 1)
    assert seen.steps == [0]
    assert not list(offline.glob("**/*.wandb"))


def test_errors_name_the_fix(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert wandb.run is None
    with pytest.raises(ValueError, match=r"wandb\.init\(\.\.\.\).*run="):
        WandbWriter()
    with pytest.raises(TypeError, match="not a wandb run"):
        WandbWriter(object())
    with pytest.raises(TypeError, match="save_tensors='yes'"):
        WandbWriter(_FakeRun(), save_tensors="yes")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r'pip install "lens-callbacks\[wandb\]"'):
        WandbWriter(_FakeRun())


class _FakeRun:
    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None: ...

    def log_artifact(self, artifact: Any, aliases: list[str] | None = None) -> None: ...

    def define_metric(self, name: str, step_metric: str | None = None) -> None: ...
