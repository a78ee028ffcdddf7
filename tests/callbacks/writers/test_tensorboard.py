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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import config_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import lens_core as lc
from lens_callbacks import CaptureRecord, Lens, LensCallback
from lens_callbacks.record import build_record
from lens_callbacks.writers import TensorBoardWriter
from lens_callbacks.writers import tensorboard_graph as tb_graph
from lens_callbacks.writers.tensorboard import STATISTICS
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


@dataclass
class Keep:
    """Keeps every record, to compare what TensorBoard read back with what was written."""

    records: list[CaptureRecord] = field(default_factory=list)

    def write(self, record: CaptureRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


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
        assert node.attr["label"].s.decode() == layer.label
        assert node.attr["function"].s.decode() == layer.func_name
        assert node.attr["pass"].s.decode() == f"{layer.pass_num} of {layer.num_passes}"
        scope = "" if layer.is_input or layer.is_output or layer.module is None else layer.module
        assert node.name.rpartition("/")[0] == scope.replace(".", "/")
        assert ":" not in node.name
        if layer.params:
            params = node.attr["params"].s.decode()
            assert all(param.name in params for param in layer.params)


def train_plain(logdir: Path, steps: int = 4) -> Keep:
    torch.manual_seed(0)
    model = NestedCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keep = Keep()
    lens = Lens(model, every_n_steps=2, writers=[TensorBoardWriter(logdir), keep], strict=True)
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
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keep]:
    """A run of a plain loop (captures at steps 0 and 2) in ``<root>/plain``."""
    root = tmp_path_factory.mktemp("runs")
    return root, train_plain(root / "plain")


# -- the graph ---------------------------------------------------------------------------------


def test_graph_per_step_and_run_graph(plain_run: tuple[Path, Keep]) -> None:
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


def test_graph_edges_are_labelled_with_shapes(plain_run: tuple[Path, Keep]) -> None:
    root, keep = plain_run
    _, metadata = tagged_graph(accumulator(root / "plain"), "lens.graph/step_000000")
    nodes = {node.name: node for node in metadata.function_graphs[0].pre_optimization_graph.node}
    assert shapes(nodes["features/0/conv2d_1_1"]) == [(4, 4, 8, 8)]
    assert list(nodes["features/3/conv2d_2_4"].input) == ["features/2/maxpool2d_1_3"]
    assert nodes["features/0/conv2d_1_1"].attr["module"].s == b"features.0:1 (Conv2d)"
    params = nodes["features/0/conv2d_1_1"].attr["params"].s
    assert params == b"features.0.weight (4, 1, 3, 3), features.0.bias (4,)"
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


def test_histograms_are_our_bins_and_scalars_our_statistics(plain_run: tuple[Path, Keep]) -> None:
    root, keep = plain_run
    events = accumulator(root / "plain")
    tags = expected_tags(keep.records[0])
    assert {"activations/features.0/conv2d_1_1", "gradients/classifier.1/linear_1_8",
            "activations/input_1_0", "param_grads/features.3.weight"} <= set(tags)
    assert sorted(events.Tags()["histograms"]) == sorted(f"lens.{tag}" for tag in tags)
    assert sorted(events.Tags()["scalars"]) == sorted(
        f"lens.{tag.partition('/')[0]}.{stat}/{tag.partition('/')[2]}" for tag in tags for stat in STATISTICS
    )
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
            kind, _, path = tag.partition("/")
            for stat in STATISTICS:
                scalar = events.Scalars(f"lens.{kind}.{stat}/{path}")[index]
                assert scalar.step == record.step
                assert scalar.value == pytest.approx(getattr(summary, stat), rel=1e-6, abs=1e-12)


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
    keep = Keep()
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
def tensorboard_server(plain_run: tuple[Path, Keep]) -> Iterator[str]:
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


def test_tensorboard_serves_our_graph_and_histograms(
    tensorboard_server: str, plain_run: tuple[Path, Keep]
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
