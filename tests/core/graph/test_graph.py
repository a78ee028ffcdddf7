"""The graph of a forward pass (lens_core.graph) and its drawing with graphviz (lens_core.graph.render).

Three kinds of checks: golden DOT files for a handful of toy models (regenerate them with
``LENS_REGENERATE_GOLDEN=1``), structural invariants of the graph for every model of the toy zoo,
and real renders with the ``dot`` binary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core.graph.model import GraphNode, ModelGraph, build_graph
from lens_core.graph.render import RenderError, RenderTimeoutError
from tests.conftest import require
from tests.core.capture.test_readme_conformance import SimpleRecurrent
from tests.core.capture.toy_models import CASES, CASES_BY_NAME, ToyCase

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("LENS_REGENERATE_GOLDEN") == "1"
SVG = "{http://www.w3.org/2000/svg}"


def require_dot() -> None:
    require(shutil.which("dot") is not None, "the dot binary (Debian package graphviz) is not installed")


@pytest.fixture(autouse=True)
def _needs_graphviz_package() -> None:
    found = importlib.util.find_spec("graphviz") is not None
    require(found, 'the graphviz package is not installed (pip install "lens-callbacks[viz]")')


# -- models -------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Two levels of modules: Sequential blocks of leaf layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _recurrent(gradients: bool = False, **options: Any) -> lc.ModelHistory:
    torch.manual_seed(0)
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(0))
    return lc.log_forward_pass(SimpleRecurrent(), x, save_gradients=gradients, **options)


def _cnn() -> lc.ModelHistory:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return lc.get_model_metadata(SmallCNN().eval(), x)


def _toy(case: ToyCase) -> lc.ModelHistory:
    torch.manual_seed(0)
    model = case.make_model()
    args, kwargs = case.make_inputs()
    torch.manual_seed(0)
    return lc.get_model_metadata(model, list(args), kwargs)


def _recurrent_after_backward() -> lc.ModelHistory:
    history = _recurrent(gradients=True)
    history.backward(history.output_layers[0])
    return history


# -- golden DOT files ---------------------------------------------------------------------------

GOLDEN_CASES = {
    "simple_recurrent_unrolled": lambda: _recurrent().graph_source(),
    "simple_recurrent_rolled": lambda: _recurrent().graph_source(vis_opt="rolled"),
    "simple_recurrent_gradients": lambda: _recurrent_after_backward().graph_source(),
    "small_cnn": lambda: _cnn().graph_source(),
    "small_cnn_depth1": lambda: _cnn().graph_source(vis_nesting_depth=1),
    "nested_modules_rolled_depth2": lambda: _toy(CASES_BY_NAME["nested_modules"]).graph_source(
        vis_opt="rolled", vis_nesting_depth=2
    ),
    "module_called_twice_rolled": lambda: _toy(CASES_BY_NAME["module_called_twice"]).graph_source(
        vis_opt="rolled"
    ),
    "branch_merge_leftright": lambda: _toy(CASES_BY_NAME["branch_merge"]).graph_source(
        vis_direction="leftright"
    ),
}


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_dot_source_matches_golden_file(name: str) -> None:
    source = GOLDEN_CASES[name]()
    path = GOLDEN / f"{name}.gv"
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(source)
    assert path.exists(), f"{path} is missing: run LENS_REGENERATE_GOLDEN=1 pytest {__file__}"
    assert source == path.read_text(), (
        f"the DOT source of {name} changed; if on purpose, regenerate with "
        f"LENS_REGENERATE_GOLDEN=1 pytest {__file__} and review the diff of {path}"
    )


def test_dot_source_is_deterministic() -> None:
    assert _cnn().graph_source() == _cnn().graph_source()
    assert _recurrent().graph_source(vis_opt="rolled") == _recurrent().graph_source(vis_opt="rolled")


# -- structure ----------------------------------------------------------------------------------


def _check_structure(history: lc.ModelHistory, graph: ModelGraph) -> None:
    """Invariants every graph keeps, whatever the model and options."""
    owner = {}
    for node in graph.nodes:
        for label in node.layers:
            assert label not in owner, f"{label} is in two nodes"
            owner[label] = node.id
    assert set(owner) == set(history.all_layer_labels), "every layer pass is in exactly one node"
    assert len({node.id for node in graph.nodes}) == len(graph.nodes)

    clusters = {}
    for cluster in graph.clusters:
        assert cluster.parent is None or cluster.parent in clusters, "parents come first"
        assert cluster.depth == (1 if cluster.parent is None else clusters[cluster.parent].depth + 1)
        clusters[cluster.id] = cluster
    assert all(node.cluster is None or node.cluster in clusters for node in graph.nodes)
    used = {node.cluster for node in graph.nodes} | {c.parent for c in graph.clusters}
    assert set(clusters) <= used, "no empty box"

    # The edges are the history's edges between nodes, minus those inside one collapsed call.
    expected = set()
    for layer in history:
        for parent in layer.parents:
            source, target = owner[parent], owner[layer.label]
            if not (source == target and _inside_one_call(history, graph.node(target), parent, layer)):
                expected.add((source, target))
    pairs = [(edge.source, edge.target) for edge in graph.edges]
    assert len(pairs) == len(set(pairs)), "one edge per pair of nodes"
    assert set(pairs) == expected
    for edge in graph.edges:
        assert set(edge.source_passes) <= set(graph.node(edge.source).passes)
        assert set(edge.target_passes) <= set(graph.node(edge.target).passes)


def _inside_one_call(history: lc.ModelHistory, node: GraphNode, parent: str, child: lc.Layer) -> bool:
    """Whether an edge from ``parent`` to ``child`` stays inside one call of a collapsed module."""
    if node.kind != "module":
        return False
    if node.module is None or ":" in node.module:  # unrolled: one node per call
        return True
    tag = next(t for t in child.module_stack if t.rpartition(":")[0] == node.module)
    return tag in history[parent].module_stack


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_structure_of_every_toy_model(case: ToyCase) -> None:
    history = _toy(case)
    for vis_opt in ("unrolled", "rolled"):
        for depth in (1, 2, 1000):
            graph = build_graph(history, vis_opt, depth)
            _check_structure(history, graph)
            assert graph.num_layers == len(history)
            source = history.graph_source(vis_opt, depth)
            assert source.count(" -> ") == len(graph.edges) + sum(e.gradient for e in graph.edges)
        full = build_graph(history, vis_opt, 1000)
        assert not any(node.kind == "module" for node in full.nodes)
    unrolled = build_graph(history, "unrolled")
    assert [node.id for node in unrolled.nodes] == history.all_layer_labels
    rolled = build_graph(history, "rolled")
    layer_labels = list(dict.fromkeys(layer.layer_label for layer in history))
    assert [node.id for node in rolled.nodes] == layer_labels
    passes = Counter(layer.layer_label for layer in history)
    assert all(node.num_passes == passes[node.id] for node in rolled.nodes)


def test_recurrent_rolled_merges_passes_and_labels_edges() -> None:
    graph = build_graph(_recurrent(), "rolled")
    assert [node.title for node in graph.nodes] == [
        "input_1_0", "linear_1_1 (x4)", "add_1_2 (x4)", "mul_1_3 (x4)", "output_1_4"
    ]
    edges = {(e.source, e.target): (e.source_passes, e.target_passes) for e in graph.edges}
    assert edges == {
        ("input_1_0", "linear_1_1"): ((1,), (1,)),
        ("linear_1_1", "add_1_2"): ((1, 2, 3, 4), (1, 2, 3, 4)),
        ("add_1_2", "mul_1_3"): ((1, 2, 3, 4), (1, 2, 3, 4)),
        ("mul_1_3", "linear_1_1"): ((1, 2, 3), (2, 3, 4)),
        ("mul_1_3", "output_1_4"): ((4,), (1,)),
    }
    linear = graph.node("linear_1_1")
    assert (linear.module, linear.num_params, linear.kind) == ("fc", 30, "op")
    assert graph.clusters == (), "a module that ran one op gets no box"
    source = _recurrent().graph_source(vis_opt="rolled")
    assert 'label="out 1-3, in 2-4"' in source
    assert 'label="in 1"' in source
    assert 'label="out 4"' in source
    assert "linear_1_1 (x4)" in source


def test_recurrent_unrolled_has_a_node_per_pass() -> None:
    graph = build_graph(_recurrent(), "unrolled")
    assert len(graph.nodes) == 14
    assert len(graph.edges) == 13
    assert graph.node("linear_1_1:2").module == "fc:2"
    assert graph.node("linear_1_1:2").passes == (2,)
    assert "@fc:2" in _recurrent().graph_source()


def test_clusters_are_nested_module_calls() -> None:
    history = _cnn()
    graph = build_graph(history)
    assert [(c.id, c.module_type, c.parent) for c in graph.clusters] == [
        ("features:1", "Sequential", None), ("classifier:1", "Sequential", None)
    ]
    conv = graph.node("conv2d_1_1")
    assert (conv.cluster, conv.module) == ("features:1", "features.0")
    assert [p.shape for p in conv.params] == [(8, 3, 3, 3), (8,)]
    batchnorm = graph.node("batchnorm_1_2")
    assert batchnorm.buffers == ("features.1.running_mean", "features.1.running_var")
    source = history.graph_source()
    assert "subgraph cluster_featurespass1 {" in source
    assert "<B>@features</B>" in source
    assert "Sequential" in source
    assert "peripheries=2" in source  # the op that read buffers
    assert "params: 8x3x3x3, x8 (224)" in source


@pytest.mark.parametrize("depth", [1, 2])
def test_nesting_depth_collapses_module_calls(depth: int) -> None:
    history = _toy(CASES_BY_NAME["nested_modules"])
    graph = build_graph(history, "unrolled", depth)
    modules = [node for node in graph.nodes if node.kind == "module"]
    expected = {1: "outer", 2: "outer.mid"}[depth]
    assert [node.module for node in modules] == [expected]
    module = modules[0]
    assert module.func_name == {1: "Outer", 2: "Middle"}[depth]
    assert module.num_ops == {1: 3, 2: 2}[depth]
    assert module.num_params == 20
    assert len(graph.clusters) == depth - 1
    assert f"{module.num_ops} ops, 20 params" in history.graph_source(vis_nesting_depth=depth)
    assert 'shape=box3d' in history.graph_source(vis_nesting_depth=depth)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class BlockLoop(nn.Module):
    """A two-op module called in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = self.block(x) * 2
        return x


def test_collapsed_calls_stay_apart_unrolled_and_merge_rolled() -> None:
    torch.manual_seed(0)
    history = lc.get_model_metadata(BlockLoop(), torch.rand(2, 4))
    unrolled = build_graph(history, "unrolled", 1)
    assert [n.id for n in unrolled.nodes if n.kind == "module"] == ["@block:1", "@block:2"]
    assert [(e.source, e.target) for e in unrolled.edges] == [
        ("input_1_0", "@block:1"), ("@block:1", "mul_1_3:1"), ("mul_1_3:1", "@block:2"),
        ("@block:2", "mul_1_3:2"), ("mul_1_3:2", "output_1_4"),
    ]
    rolled = build_graph(history, "rolled", 1)
    block = rolled.node("@block")
    assert (block.title, block.passes, block.num_ops, block.num_params) == ("@block (x2)", (1, 2), 2, 20)
    edges = {(e.source, e.target): (e.source_passes, e.target_passes) for e in rolled.edges}
    assert edges == {
        ("input_1_0", "@block"): ((1,), (1,)),
        ("@block", "mul_1_3"): ((1, 2), (1, 2)),
        ("mul_1_3", "@block"): ((1,), (2,)),
        ("mul_1_3", "output_1_4"): ((2,), (1,)),
    }
    source = history.graph_source("rolled", 1)
    assert 'label="out 1, in 2"' in source
    assert "2 ops, 20 params" in source


def test_googlenet_inception_modules_at_depths_1_2_3() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.googlenet(init_weights=False, aux_logits=False).eval()
    history = lc.get_model_metadata(model, torch.rand(1, 3, 64, 64))
    sizes = []
    for depth in (1, 2, 3):
        graph = build_graph(history, "unrolled", depth)
        _check_structure(history, graph)
        sizes.append(len(graph.nodes))
        if depth == 1:
            inception = graph.node("@inception3a")
            assert inception.func_name == "Inception"
            assert [e.source for e in graph.edges if e.target == inception.id] == ["maxpool2d_2_11"]
            assert [e.target for e in graph.edges if e.source == inception.id] == ["@inception3b"]
            assert inception.shapes == (history["inception3a"].shape,)
        if depth == 2:
            branches = [n.module for n in graph.nodes if n.cluster == "inception3a:1" and n.kind == "module"]
            assert branches == [f"inception3a.branch{i}" for i in (1, 2, 3, 4)]
    assert sizes[0] < sizes[1] < sizes[2] < len(history)


def test_gradient_edges_follow_the_backward_pass() -> None:
    before = _recurrent(gradients=True)
    assert not any(edge.gradient for edge in build_graph(before).edges)
    history = _recurrent_after_backward()
    graph = build_graph(history)
    carried = {(e.source, e.target) for e in graph.edges if e.gradient}
    # every edge but the one from the input, which does not require grad
    assert carried == {(e.source, e.target) for e in graph.edges} - {("input_1_0", "linear_1_1:1")}
    source = history.graph_source()
    assert source.count("dir=back") == 12
    assert build_graph(history, "rolled").edges[0].gradient is False

    x = torch.rand(6, 5, requires_grad=True)
    torch.manual_seed(0)
    history = lc.log_forward_pass(SimpleRecurrent(), x, save_gradients=True)
    history.backward(history.output_layers[0])
    assert all(edge.gradient for edge in build_graph(history).edges)


def test_gradient_edges_with_a_subset_saved() -> None:
    history = _recurrent(gradients=True, layers_to_save="mul")
    history.backward("mul_1_3:4")
    graph = build_graph(history)
    carried = {(e.source, e.target) for e in graph.edges if e.gradient}
    # unsaved parents inside the autograd graph pass the gradient on to a saved child
    assert ("add_1_2:1", "mul_1_3:1") in carried
    assert ("linear_1_1:2", "add_1_2:2") not in carried  # the child was not watched


def _layer_state(history: lc.ModelHistory) -> list[tuple[Any, ...]]:
    state = []
    for layer in history:
        for field in dataclasses.fields(layer):
            value = getattr(layer, field.name)
            if isinstance(value, torch.Tensor):
                value = (id(value), value._version)
            elif isinstance(value, list):
                value = tuple(value)
            elif field.name == "gradient_slot" and value is not None:
                value = (id(value), id(value.value), value.count)
            state.append((layer.label, field.name, value))
    return state


def test_drawing_never_changes_the_history(tmp_path: Path) -> None:
    history = _recurrent_after_backward()
    before = _layer_state(history)
    lookup = dict(history.lookup)
    for vis_opt in ("unrolled", "rolled"):
        for depth in (1, 1000):
            build_graph(history, vis_opt, depth)
            history.graph_source(vis_opt, depth)
            history.to_digraph(vis_opt, depth)
    if shutil.which("dot"):
        history.render_graph(vis_outpath=str(tmp_path / "graph"), vis_fileformat="svg")
    assert _layer_state(history) == before
    assert history.lookup == lookup


def test_a_history_loaded_from_disk_draws_the_same_without_loading_gradients(tmp_path: Path) -> None:
    store = pytest.importorskip("lens_core.store")
    pytest.importorskip("safetensors")
    history = _recurrent_after_backward()
    store.save(history, tmp_path / "capture")
    loaded = store.load(tmp_path / "capture")
    assert loaded.graph_source() == history.graph_source()
    slots = [layer.gradient_slot for layer in loaded if layer.gradient_slot is not None]
    assert slots
    assert all(slot._value is None for slot in slots), "drawing read the gradients from disk"


def test_to_digraph_is_a_graphviz_digraph() -> None:
    import graphviz

    history = _cnn()
    digraph = history.to_digraph(vis_opt="rolled")
    assert isinstance(digraph, graphviz.Digraph)
    assert digraph.source == history.graph_source(vis_opt="rolled")


def test_ids_are_safe_for_dot_whatever_the_module_names() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleDict({
                'a:b "<x>" & \\': nn.Sequential(nn.Linear(3, 3), nn.ReLU()),
                "node": nn.Sequential(nn.Linear(3, 3), nn.Tanh()),
            })

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks.values():
                x = block(x)
            return x

    history = lc.get_model_metadata(Odd(), torch.rand(2, 3))
    for depth in (1, 1000):
        source = history.graph_source(vis_nesting_depth=depth)
        assert "&lt;x&gt;" in source
        assert "&amp;" in source
        assert '"<x>"' not in source
        if shutil.which("dot"):
            done = subprocess.run(["dot", "-Tcanon"], input=source.encode(), capture_output=True, check=False)
            assert done.returncode == 0, done.stderr.decode()
            assert not done.stderr, done.stderr.decode()


# -- options and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("vis_opt", "folded", r"vis_opt='folded': use 'unrolled'.*or 'rolled'"),
        ("vis_opt", "none", r"vis_opt='none'"),
        ("vis_nesting_depth", 0, r"vis_nesting_depth=0: use an int >= 1"),
        ("vis_nesting_depth", True, r"vis_nesting_depth=True: use an int >= 1"),
        ("vis_nesting_depth", "2", r"vis_nesting_depth='2': use an int >= 1"),
        ("vis_direction", "up", r"vis_direction='up': use 'bottomup'.*'topdown' or 'leftright'"),
        ("vis_fileformat", "docx", r"vis_fileformat='docx': use an output format of graphviz's dot"),
        ("timeout", 0, r"timeout=0: use a number of seconds > 0"),
    ],
)
def test_bad_options_name_the_argument_and_the_fix(option: str, value: Any, message: str) -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the model must not run when an option is wrong")

    with pytest.raises(ValueError, match=message):
        lc.show_model_graph(Boom(), torch.rand(2), **{option: value})
    history = _recurrent()
    with pytest.raises(ValueError, match=message):
        history.render_graph(**{option: value})
    if option in ("vis_opt", "vis_nesting_depth", "vis_direction"):
        with pytest.raises(ValueError, match=message):
            history.graph_source(**{option: value})


def test_import_lens_core_does_not_import_graphviz() -> None:
    code = "import sys, lens_core; assert 'graphviz' not in sys.modules, 'graphviz imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_graphviz_package_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(ImportError, match=r'pip install "lens-callbacks\[viz\]"'):
        _recurrent().graph_source()


def test_missing_dot_names_the_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder without dot
    with pytest.raises(RenderError, match=r"Debian package graphviz.*apt-get install graphviz"):
        _recurrent().render_graph(vis_outpath=str(tmp_path / "graph"))
    with pytest.raises(RenderError, match="Debian package graphviz"):
        lc.show_model_graph(SimpleRecurrent(), torch.rand(2, 5), vis_outpath=str(tmp_path / "graph"))
    assert not list(tmp_path.iterdir())
    assert "digraph" in _recurrent().graph_source(), "the source needs no dot"


# -- real renders -------------------------------------------------------------------------------


def _svg_counts(path: str) -> Counter[str]:
    root = ET.parse(path).getroot()
    return Counter(g.get("class") for g in root.iter(f"{SVG}g"))


@pytest.mark.parametrize("vis_opt", ["unrolled", "rolled"])
def test_render_svg_has_every_node_and_box(vis_opt: str, tmp_path: Path) -> None:
    require_dot()
    history = _cnn()
    graph = build_graph(history, vis_opt)
    path = history.render_graph(vis_opt=vis_opt, vis_outpath=str(tmp_path / "cnn"), vis_fileformat="svg")
    assert path == str(tmp_path / "cnn.svg")
    counts = _svg_counts(path)
    assert counts["node"] == len(graph.nodes)
    assert counts["edge"] == len(graph.edges)
    assert counts["cluster"] == len(graph.clusters) == 2


def test_render_png_and_pdf_and_paths(tmp_path: Path) -> None:
    require_dot()
    history = _recurrent_after_backward()
    png = history.render_graph("rolled", vis_outpath=str(tmp_path / "a" / "b" / "rec"), vis_fileformat="png")
    assert png == str(tmp_path / "a" / "b" / "rec.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = history.render_graph(vis_outpath=str(tmp_path / "rec.pdf"))
    assert pdf == str(tmp_path / "rec.pdf")
    assert Path(pdf).read_bytes()[:5] == b"%PDF-"
    svg = history.render_graph(vis_outpath=str(tmp_path / "rec.png"), vis_fileformat="svg")
    assert svg == str(tmp_path / "rec.svg")
    counts = _svg_counts(svg)
    assert counts["edge"] == 13 + 12  # forward edges and the backward ones beside them


@pytest.mark.parametrize("vis_direction", ["bottomup", "topdown", "leftright"])
def test_show_model_graph_runs_the_model_and_renders(vis_direction: str, tmp_path: Path) -> None:
    require_dot()
    torch.manual_seed(0)
    path = lc.show_model_graph(
        SmallCNN().eval(), torch.rand(1, 3, 16, 16), vis_nesting_depth=1,
        vis_outpath=str(tmp_path / "cnn"), vis_fileformat="svg", vis_direction=vis_direction,
    )
    counts = _svg_counts(path)
    assert counts["node"] == 4  # input, two collapsed Sequentials, output
    assert counts["cluster"] == 0


def test_dot_too_slow_raises_with_advice_and_leaves_no_file(tmp_path: Path) -> None:
    require_dot()
    history = _cnn()
    with pytest.raises(RenderTimeoutError, match=r"vis_nesting_depth=1 draws 4 nodes") as error:
        history.render_graph(vis_outpath=str(tmp_path / "cnn"), vis_fileformat="svg", timeout=1e-6)
    assert "did not finish within" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_big_models_render(tmp_path: Path) -> None:
    """swin_t and a 12-layer GPT-2 draw in full (timings: benchmarks/, not here)."""
    require_dot()
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    swin = torchvision.models.swin_t().eval()
    history = lc.get_model_metadata(swin, torch.rand(1, 3, 224, 224))
    path = history.render_graph(vis_outpath=str(tmp_path / "swin"), vis_fileformat="svg")
    assert _svg_counts(path)["node"] == len(history)

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=12, n_head=2, bos_token_id=0, eos_token_id=0
    )
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    history = lc.get_model_metadata(gpt2, [], {"input_ids": torch.randint(0, 100, (1, 16))})
    path = history.render_graph("rolled", vis_outpath=str(tmp_path / "gpt2"), vis_fileformat="svg")
    assert _svg_counts(path)["node"] == len(build_graph(history, "rolled").nodes)
