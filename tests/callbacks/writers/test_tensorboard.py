"""TensorBoardWriter: event files read back with TensorBoard's own reader, a real server, a browser."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import attr_value_pb2, config_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import lens_core as lc
from lens_callbacks import CaptureRecord, Lens, LensCallback
from lens_callbacks.record import build_record
from lens_callbacks.writers import TensorBoardWriter
from lens_callbacks.writers import tensorboard_graph as tb_graph
from lens_callbacks.writers.tensorboard import CURATED_SCALARS, STATISTICS
from tests.callbacks.helpers import RecordWriter
from tests.callbacks.lightning_helpers import LitCNN, loader, trainer
from tests.conftest import require

REPO = Path(__file__).resolve().parents[3]
KEEP_ALL = {"histograms": 0, "scalars": 0, "tensors": 0, "compressedHistograms": 0}
TENSORBOARD = Path(sys.executable).with_name("tensorboard")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class NestedCNN(nn.Module):
    """Modules two levels deep (``features.0``), so the graph has nested scopes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        return self.classifier(self.features(x))



def accumulator(logdir: Path) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance=KEEP_ALL)
    events.Reload()
    return events


def tagged_graph(events: EventAccumulator, tag: str) -> tuple[int, Any]:
    """(step, RunMetadata) of a per-step graph summary."""
    (event,) = events.Tensors(tag)
    return event.step, config_pb2.RunMetadata.FromString(event.tensor_proto.string_val[0])


def shapes(node: Any) -> list[tuple[int, ...]]:
    return [tuple(d.size for d in shape.dim) for shape in node.attr["_output_shapes"].list.shape]


def card(node: Any) -> dict[str, str]:
    """The node's attributes as TensorBoard's info card prints them: ``"<name>: <text>"`` keys.

    The card prints a key as it is and a value as the JSON of the ``AttrValue``, so every
    attribute but ``_output_shapes`` (which labels the edges) carries its text in the key.
    """
    facts = {}
    for key, value in node.attr.items():
        if key == "_output_shapes":
            continue
        name, separator, text = key.partition(": ")
        assert separator, key
        assert text, key
        assert value == attr_value_pb2.AttrValue(), f"{key}: the card would print {value} as JSON"
        facts[name] = text
    return facts


def check_graph(graph: Any, history: lc.ModelHistory) -> None:
    """Every op is a node, named by its module, with its parents as inputs and its shape."""
    names = tb_graph.node_names(history)
    nodes = {node.name: node for node in graph.node}
    assert list(nodes) == [names[layer.label] for layer in history]
    for layer in history:
        node = nodes[names[layer.label]]
        assert node.op == layer.layer_type
        assert list(node.input) == [names[parent] for parent in layer.parents]
        assert shapes(node) == [layer.shape]
        facts = card(node)
        assert facts["label"] == layer.label
        assert facts["function"] == layer.func_name
        assert facts["dtype"] == str(layer.dtype).removeprefix("torch.")
        assert facts["shape"] == str(tuple(layer.shape))
        if layer.num_passes > 1:
            assert facts["pass"] == f"{layer.pass_num} of {layer.num_passes}"
        else:
            assert "pass" not in facts  # "1 of 1" says nothing
        scope = "" if layer.is_input or layer.is_output or layer.module is None else layer.module
        assert node.name.rpartition("/")[0] == scope.replace(".", "/")
        assert ":" not in node.name
        if layer.params:
            assert all(param.name in facts["params"] for param in layer.params)


def train_plain(logdir: Path, steps: int = 4, **options: Any) -> RecordWriter:
    torch.manual_seed(0)
    model = NestedCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keep = RecordWriter()
    lens = Lens(model, every_n_steps=2, writers=[TensorBoardWriter(logdir, **options), keep], strict=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        with lens.step(step):
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    lens.close()
    return keep


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RecordWriter]:
    """A run of a plain loop (captures at steps 0 and 2) in ``<root>/plain``."""
    root = tmp_path_factory.mktemp("runs")
    return root, train_plain(root / "plain")


@pytest.fixture(scope="module")
def all_scalars_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RecordWriter]:
    """The same run written with ``scalars="all"``."""
    logdir = tmp_path_factory.mktemp("runs") / "all"
    return logdir, train_plain(logdir, scalars="all")


# -- the graph ---------------------------------------------------------------------------------


def test_graph_per_step_and_run_graph(plain_run: tuple[Path, RecordWriter]) -> None:
    root, keep = plain_run
    events = accumulator(root / "plain")
    assert [record.step for record in keep.records] == [0, 2]
    assert events.Tags()["tensors"] == ["lens.graph/step_000000", "lens.graph/step_000002"]
    assert set(events.PluginTagToContent("graph_run_metadata").values()) == {b"1"}
    for record in keep.records:
        step, metadata = tagged_graph(events, f"lens.graph/step_{record.step:06d}")
        assert step == record.step
        graph = metadata.function_graphs[0].pre_optimization_graph
        check_graph(graph, record.history)
        names = {node.name for node in graph.node}
        assert {"features/0/conv2d_1_1", "features/3/conv2d_2_4", "classifier/1/linear_1_8"} <= names
        # compute time: every op but inputs and outputs, laid end to end, in whole microseconds
        (device,) = metadata.step_stats.dev_stats
        assert device.device == "/device:CPU:0"  # the form TensorBoard's profile view counts
        timed = [layer for layer in record.history if not (layer.is_input or layer.is_output)]
        assert [s.node_name for s in device.node_stats] == [tb_graph.node_names(record.history)[x.label]
                                                            for x in timed]
        for stats, layer in zip(device.node_stats, timed, strict=True):
            micros = max(1, math.ceil(layer.time_elapsed * 1e6))
            assert stats.all_end_rel_micros == stats.op_end_rel_micros == micros
            assert stats.all_start_micros >= 1
            assert stats.memory[0].total_bytes == layer.nbytes
    check_graph(events.Graph(), keep.records[0].history)  # the run graph: the first capture's


def test_graph_edges_are_labelled_with_shapes(plain_run: tuple[Path, RecordWriter]) -> None:
    root, keep = plain_run
    _, metadata = tagged_graph(accumulator(root / "plain"), "lens.graph/step_000000")
    nodes = {node.name: node for node in metadata.function_graphs[0].pre_optimization_graph.node}
    assert shapes(nodes["features/0/conv2d_1_1"]) == [(4, 4, 8, 8)]
    assert list(nodes["features/3/conv2d_2_4"].input) == ["features/2/maxpool2d_1_3"]
    assert card(nodes["features/0/conv2d_1_1"]) == {
        "label": "conv2d_1_1", "function": "conv2d", "dtype": "float32", "shape": "(4, 4, 8, 8)",
        "module": "features.0:1 (Conv2d)", "params": "features.0.weight (4, 1, 3, 3), features.0.bias (4,)",
    }
    (loss,) = (layer.label for layer in keep.records[0].history if layer.layer_type == "crossentropy")
    assert shapes(nodes[loss]) == [()]  # the loss: a scalar, at top level


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x), "hidden": x}


class BoolArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        y = self.fc(x)
        return y / y.norm() if normalize else y


class DataDependent(nn.Module):
    """Loops as often as the data says; ``jit.trace`` bakes in the path of its one example."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        for _ in range(int((h > 0).sum()) % 3 + 1):
            h = torch.relu(self.b(h))
        return h * 2 if h.sum() > 0 else h


def write_histories(logdir: Path, model: nn.Module, histories: list[lc.ModelHistory]) -> None:
    writer = TensorBoardWriter(logdir)
    for step, history in enumerate(histories):
        writer.write(build_record(step, "train", 0, [history], model, bins=8))
    writer.close()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated
@pytest.mark.parametrize(("model", "args"), [
    (DictOutput(), [torch.randn(2, 4)]),
    (BoolArgument(), [torch.randn(2, 4), True]),
])
def test_models_add_graph_cannot_trace(tmp_path: Path, model: nn.Module, args: list[Any]) -> None:
    with SummaryWriter(tmp_path / "add_graph") as summary_writer, pytest.raises(RuntimeError):
        summary_writer.add_graph(model, tuple(args))  # the anchor fails on these
    history = lc.log_forward_pass(model, args)
    write_histories(tmp_path / "lens", model, [history])
    events = accumulator(tmp_path / "lens")
    check_graph(events.Graph(), history)
    _, metadata = tagged_graph(events, "lens.graph/step_000000")
    check_graph(metadata.function_graphs[0].pre_optimization_graph, history)
    assert len(history.output_layers) == (2 if isinstance(model, DictOutput) else 1)


def test_data_dependent_control_flow_gives_each_step_its_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DataDependent()
    histories, passes = [], set()
    for _ in range(20):  # until two inputs take different paths
        history = lc.log_forward_pass(model, torch.randn(2, 4))
        if history["linear_2_4:1"].num_passes not in passes:
            passes.add(history["linear_2_4:1"].num_passes)
            histories.append(history)
        if len(histories) == 2:
            break
    write_histories(tmp_path, model, histories)
    events = accumulator(tmp_path)
    for step, history in enumerate(histories):
        _, metadata = tagged_graph(events, f"lens.graph/step_{step:06d}")
        graph = metadata.function_graphs[0].pre_optimization_graph
        check_graph(graph, history)
        loop = [node.name for node in graph.node if node.name.startswith("b/")]
        count = history["linear_2_4:1"].num_passes
        assert loop == [f"b/linear_2_4_pass{n}" for n in range(1, count + 1)]  # one scope, every pass


# -- histograms and scalars -------------------------------------------------------------------


def expected_tags(record: CaptureRecord) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    for kind, summaries in (("activations", record.activations), ("gradients", record.gradients)):
        for label, summary in summaries.items():
            layer = record.history[label]
            module = None if layer.is_input or layer.is_output else layer.module
            tags[f"{kind}/{module}/{label}" if module else f"{kind}/{label}"] = summary
    for name, summary in record.parameter_gradients.items():
        tags[f"param_grads/{name}"] = summary
    return tags


def test_histograms_are_our_bins(plain_run: tuple[Path, RecordWriter]) -> None:
    root, keep = plain_run
    events = accumulator(root / "plain")
    tags = expected_tags(keep.records[0])
    assert {"activations/features.0/conv2d_1_1", "gradients/classifier.1/linear_1_8",
            "activations/input_1_0", "param_grads/features.3.weight"} <= set(tags)
    assert sorted(events.Tags()["histograms"]) == sorted(f"lens.{tag}" for tag in tags)
    for index, record in enumerate(keep.records):
        for tag, summary in expected_tags(record).items():
            histogram = events.Histograms(f"lens.{tag}")[index]
            assert histogram.step == record.step
            value = histogram.histogram_value
            assert list(value.bucket) == list(summary.histogram.counts)
            assert list(value.bucket_limit) == list(summary.histogram.edges[1:])
            assert (value.min, value.max, value.num) == (summary.min, summary.max, summary.finite_count)
            assert value.sum == pytest.approx(summary.mean * summary.numel, rel=1e-6, abs=1e-9)
            squares = (summary.std**2 + summary.mean**2) * summary.numel
            assert value.sum_squares == pytest.approx(squares, rel=1e-6)


SPARSE = {"zero_fraction", "nan_count", "inf_count"}  # written by default only where not zero


def check_scalars(
    events: EventAccumulator, records: list[CaptureRecord], statistics: dict[str, tuple[str, ...]],
    curated: bool,
) -> None:
    """The scalar tags are exactly ``statistics`` of each kind, each point our statistic at its step;
    ``curated``: one of ``SPARSE`` has a point only where it is not zero, the std of one value none."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, summary in expected_tags(record).items():
            kind, _, path = tag.partition("/")
            for stat in statistics[kind]:
                value = getattr(summary, stat)
                if curated and ((stat in SPARSE and not value > 0) or (stat == "std" and summary.numel == 1)):
                    continue
                expected.setdefault(f"lens.{kind}.{stat}/{path}", []).append((record.step, value))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        scalars = events.Scalars(tag)
        assert [scalar.step for scalar in scalars] == [step for step, _ in points], tag
        for scalar, (_, value) in zip(scalars, points, strict=True):
            assert scalar.value == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), tag


def test_default_scalars_are_a_few_that_matter(plain_run: tuple[Path, RecordWriter]) -> None:
    root, keep = plain_run
    events = accumulator(root / "plain")
    assert CURATED_SCALARS == {
        "activations": ("std", "zero_fraction", "nan_count", "inf_count"),
        "gradients": ("l2_norm", "nan_count", "inf_count"),
        "param_grads": ("l2_norm", "nan_count", "inf_count"),
    }
    check_scalars(events, keep.records, CURATED_SCALARS, curated=True)
    groups = {tag.partition("/")[0] for tag in events.Tags()["scalars"]}
    # a finite run: no NaN/Inf group; zero fractions only of the ops that output zeros
    assert groups == {"lens.activations.std", "lens.activations.zero_fraction",
                      "lens.gradients.l2_norm", "lens.param_grads.l2_norm"}
    zeros = {tag.partition("/")[2] for tag in events.Tags()["scalars"] if ".zero_fraction/" in tag}
    assert {"features.1/relu_1_2", "features.4/relu_2_5"} <= zeros
    assert not any("conv2d" in path or "linear" in path for path in zeros)
    (loss,) = (layer.label for layer in keep.records[0].history if layer.layer_type == "crossentropy")
    assert f"lens.activations.std/{loss}" not in events.Tags()["scalars"]  # one value: no spread
    assert f"lens.gradients.l2_norm/{loss}" in events.Tags()["scalars"]


def test_all_scalars_is_every_statistic(
    all_scalars_run: tuple[Path, RecordWriter], plain_run: tuple[Path, RecordWriter]
) -> None:
    logdir, keep = all_scalars_run
    events = accumulator(logdir)
    every = dict.fromkeys(("activations", "gradients", "param_grads"), STATISTICS)
    check_scalars(events, keep.records, every, curated=False)  # dense: every statistic at every step
    summaries = len(expected_tags(keep.records[0]))
    assert len(events.Tags()["scalars"]) == len(STATISTICS) * summaries  # 9 per summary
    default = accumulator(plain_run[0] / "plain").Tags()
    assert summaries < len(default["scalars"]) < 2 * summaries  # about one per summary
    assert sorted(events.Tags()["histograms"]) == sorted(default["histograms"])  # the option is scalars only


class NonFinite(nn.Module):
    """``log(relu(h))`` is -inf wherever ``relu`` gave 0, and ``exp`` makes it finite again; the
    backward pass divides 0 by 0 there (a NaN gradient of the ``relu`` output), which ``relu``'s
    own backward turns into zeros: every other tensor is finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4)
        return self.out(torch.exp(torch.log(torch.relu(self.fc(x)))))


def test_nan_and_inf_counts_appear_only_where_there_are_some(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, keep = NonFinite(), RecordWriter()
    # findings=False: the non-finite values would also write the findings' own tags
    lens = Lens(model, every_n_steps=1, writers=[TensorBoardWriter(tmp_path), keep], strict=True,
                findings=False)
    x = torch.randn(16, 4)
    with lens.step(5):
        model(x).sum().backward()
    lens.close()
    (record,) = keep.records
    events = accumulator(tmp_path)
    check_scalars(events, keep.records, CURATED_SCALARS, curated=True)  # counts where not zero
    non_finite = {tag for tag in events.Tags()["scalars"] if ".nan_count/" in tag or ".inf_count/" in tag}
    assert non_finite == {"lens.activations.inf_count/log_1_3", "lens.gradients.nan_count/relu_1_2"}
    (point,) = events.Scalars("lens.activations.inf_count/log_1_3")
    assert point.step == 5
    assert point.value == record.activations["log_1_3"].inf_count  # log of each zero the relu gave
    assert point.value == record.activations["relu_1_2"].zero_fraction * record.activations["relu_1_2"].numel
    assert len(events.Tags()["histograms"]) == len(expected_tags(record))  # finite values still drawn


def test_scalars_option_is_checked_and_passed_through_from_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    fix = r'use True \(a few per layer\), "all" \(every statistic\) or False \(none\)\.'
    for bad, error in (("everything", ValueError), ("All", ValueError), (1, TypeError), (None, TypeError)):
        with pytest.raises(error, match=rf"scalars={bad!r}: {fix}"):
            TensorBoardWriter(tmp_path, scalars=bad)
    assert TensorBoardWriter(tmp_path, scalars=False).scalars is False
    logger = TensorBoardLogger(tmp_path, name="lit")
    writer = TensorBoardWriter.from_logger(logger, scalars="all")
    assert writer is not None
    assert writer.scalars == "all"
    with pytest.raises(ValueError, match="scalars='some'"):
        TensorBoardWriter.from_logger(logger, scalars="some")


def test_other_stages_have_their_own_tags(tmp_path: Path) -> None:
    model = NestedCNN()
    history = lc.log_forward_pass(model, torch.randn(2, 1, 8, 8), layers_to_save="features.0")
    writer = TensorBoardWriter(tmp_path, scalars=False)
    writer.write(build_record(7, "validate", 0, [history], model, bins=4))
    writer.close()
    tags = accumulator(tmp_path).Tags()
    assert tags["tensors"] == ["lens.validate.graph/step_000007"]
    assert tags["histograms"] == ["lens.validate.activations/features.0/conv2d_1_1"]
    assert tags["scalars"] == []


# -- the writer's lifecycle and Lightning ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints on tiny runs
def test_lightning_tensorboard_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="lit")
    writer = TensorBoardWriter.from_logger(logger)
    assert writer is not None
    assert logger._experiment is None  # the logger still picks its version folder itself
    assert TensorBoardWriter.from_logger(CSVLogger(tmp_path)) is None
    assert TensorBoardWriter.from_logger(None) is None
    keep = RecordWriter()
    torch.manual_seed(0)
    callback = LensCallback(layers="conv", every_n_steps=2, writers=[writer, keep])
    trainer(tmp_path, [callback], logger=logger, max_steps=4).fit(LitCNN(), loader())
    events = accumulator(Path(logger.log_dir))
    assert [record.step for record in keep.records] == [0, 2]
    assert events.Tags()["tensors"] == ["lens.graph/step_000000", "lens.graph/step_000002"]
    check_graph(events.Graph(), keep.records[0].history)
    histogram = events.Histograms("lens.activations/net.conv2/conv2d_2_4")
    assert [event.step for event in histogram] == [0, 2]
    for event, record in zip(histogram, keep.records, strict=True):
        assert list(event.histogram_value.bucket) == list(record.activations["conv2d_2_4"].histogram.counts)
    assert "lens.param_grads/net.conv1.weight" in events.Tags()["histograms"]


def test_close_flushes_but_leaves_a_given_summary_writer_open(tmp_path: Path) -> None:
    model = NestedCNN()
    history = lc.log_forward_pass(model, torch.randn(2, 1, 8, 8), layers_to_save=None)
    summary_writer = SummaryWriter(tmp_path)
    writer = TensorBoardWriter(summary_writer, histograms=False)
    writer.write(build_record(3, "train", 0, [history], model, bins=4))
    writer.close()
    assert summary_writer.all_writers is not None  # still open: its owner closes it
    assert accumulator(tmp_path).Tags()["tensors"] == ["lens.graph/step_000003"]
    summary_writer.close()
    owned = TensorBoardWriter(tmp_path / "owned")
    owned.close()
    assert owned.experiment.all_writers is None


def test_bad_arguments_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match=r"logdir_or_writer .* got int\..*from_logger"):
        TensorBoardWriter(42)
    with pytest.raises(TypeError, match="graphs must be True or False"):
        TensorBoardWriter("unused", graphs="yes")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install "lens-callbacks\[tensorboard\]"'):
        TensorBoardWriter("unused")


# -- a real TensorBoard, and a browser ----------------------------------------------------------


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tensorboard_server(plain_run: tuple[Path, RecordWriter]) -> Iterator[str]:
    """A real ``tensorboard`` serving the plain run; stopped by its PID whatever happens."""
    require(TENSORBOARD.exists(), 'no tensorboard beside python (pip install "lens-callbacks[tensorboard]")')
    root, _ = plain_run
    port, log = free_port(), root.parent / "tensorboard.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(TENSORBOARD), "--logdir", str(root), "--host", "127.0.0.1", "--port", str(port),
             "--load_fast=false", "--reload_interval", "1"],
            stdout=output, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if "plain" in json.loads(get(f"{url}/data/plugin/graphs/info")):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard (port {port}) did not serve the run: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(**params: str) -> str:
    return urllib.parse.urlencode(params)


def served_attributes(pbtxt: str) -> Iterator[tuple[str, str]]:
    """(key, value body) of each node attribute in a served graph, as the text the page reads."""
    lines = iter(line.strip() for line in pbtxt.splitlines())
    for line in lines:
        if line != "attr {":
            continue
        key = next(lines).removeprefix('key: "').removesuffix('"')
        assert next(lines) == "value {"
        depth, body = 1, []
        while depth:
            inner = next(lines)
            depth += inner.endswith("{") - (inner == "}")
            body.append(inner)
        next(lines)  # the attr's closing brace
        yield key, "\n".join(body[:-1])


def test_tensorboard_serves_our_graph_and_histograms(
    tensorboard_server: str, plain_run: tuple[Path, RecordWriter]
) -> None:
    url, (_, keep) = tensorboard_server, plain_run
    info = json.loads(get(f"{url}/data/plugin/graphs/info"))["plain"]
    assert info["run_graph"] is True
    assert info["tags"]["lens.graph/step_000002"] == {
        "tag": "lens.graph/step_000002", "conceptual_graph": False, "op_graph": True, "profile": True,
    }
    tagged = query(run="plain", tag="lens.graph/step_000002")
    graph = get(f"{url}/data/plugin/graphs/graph?{tagged}").decode()
    assert 'name: "features/3/conv2d_2_4"' in graph
    assert 'input: "features/2/maxpool2d_1_3"' in graph
    assert "_output_shapes" in graph
    assert 'key: "module: features.0:1 (Conv2d)"' in graph
    assert 'key: "params: features.3.weight (8, 4, 3, 3), features.3.bias (8,)"' in graph
    for key, value in served_attributes(graph):
        if key != "_output_shapes":  # the info card prints the key as it is, the value as JSON
            assert value == "", f"{key}: {value}"
            assert key.isascii(), key  # the page prints escapes as they are served
            assert key.isprintable(), key
            assert '"' not in key, key
            assert "\\" not in key, key
    run_graph = get(f"{url}/data/plugin/graphs/graph?" + query(run="plain")).decode()
    assert 'name: "features/0/conv2d_1_1"' in run_graph
    profile = get(f"{url}/data/plugin/graphs/run_metadata?{tagged}")
    assert b'node_name: "features/0/conv2d_1_1"' in profile
    assert b"all_end_rel_micros" in profile
    tag = "lens.activations/features.0/conv2d_1_1"
    served = json.loads(get(f"{url}/data/plugin/histograms/histograms?" + query(run="plain", tag=tag)))
    assert [step for _, step, _ in served] == [0, 2]
    for (_, _, buckets), record in zip(served, keep.records, strict=True):
        summary = record.activations["conv2d_1_1"]
        assert [count for _, _, count in buckets] == list(summary.histogram.counts)
        assert buckets[0][0] == pytest.approx(summary.min)
        assert buckets[-1][1] == pytest.approx(summary.max)


def test_graph_page_renders_in_chromium(tensorboard_server: str, tmp_path: Path) -> None:
    require(Path(CHROMIUM).exists(), "no chromium (Debian package chromium: apt-get install chromium)")
    from PIL import Image

    screenshot = tmp_path / "tb_graph.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1400,900",
         "--virtual-time-budget=15000", f"{tensorboard_server}/#graphs"],
        check=True, timeout=90, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    artifact = REPO / "out" / "test-artifacts" / "tb_graph.png"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, artifact)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as image:
        assert image.size == (1400, 900)
        graph_area = image.convert("RGB").crop((400, 120, 1000, 880))  # right of the side panel
        colours = graph_area.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20, "the graph area is blank"
