"""The ``lens`` command, run as a real subprocess over captures a short training run writes here.

Between the captures of step 0 and step 2 the middle layer's weights are scaled by 10 and the
last layer's divided by 10: its output grows tenfold while the layers around it barely move,
so ``lens diff`` must rank it first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc
from lens_callbacks import DiskWriter, Lens
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[3]
EXIT_ERROR = 2
Completed = subprocess.CompletedProcess[str]


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 8)
        self.third = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4)
        return self.third(torch.relu(self.second(torch.relu(self.first(x)))))


@dataclass(frozen=True)
class Run:
    root: Path
    """Per-rank run folder: rank_0 captures every layer, rank_1 only ``first`` and ``second``."""
    labels: dict[str, str]
    """Module address -> label of its output."""

    def step(self, step: int, rank: int = 0, stage: str = "train") -> Path:
        prefix = "" if stage == "train" else f"{stage}_"
        return self.root / f"rank_{rank}" / f"{prefix}step_{step:06d}"


def _train(model: ThreeLayers, lens: Lens, accumulate: int, surgery: bool) -> None:
    """Four steps on one fixed batch, so activations change only where the weights do."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(6, 2)
    for step in range(4):
        for _ in range(accumulate):
            with lens.step(step):
                F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 and surgery:
            with torch.no_grad():
                model.second.weight.mul_(10)
                model.second.bias.mul_(10)
                model.third.weight.div_(10)
        if step == 2 and surgery:
            with lens.step(step, stage="validate"), torch.no_grad():
                model(x)
    lens.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = ThreeLayers()
    driver = Lens(model, layers=["first", "second", "third"], every_n_steps=2, stages=("train", "validate"),
                  accumulate_grad_batches=2, writers=[DiskWriter(root, save_tensors=True, per_rank=True)])
    _train(model, driver, accumulate=2, surgery=True)
    other = Lens(ThreeLayers(), layers=["first", "second"], every_n_steps=2,
                 writers=[DiskWriter(root, save_tensors=True, per_rank=True)])
    other.rank = 1
    _train(other.model, other, accumulate=1, surgery=False)  # type: ignore[arg-type]
    # A step the run died in while saving its first micro-batch.
    (root / "rank_0" / "step_000004" / ".micro_batch_0.tmp-0123456789ab").mkdir(parents=True)
    history = lc.load(root / "rank_0" / "step_000000" / "micro_batch_0")
    return Run(root, {name: history[name].label for name in ("first", "second", "third")})


def run_lens(*args: object, env: dict[str, str] | None = None) -> Completed:
    """The console script, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lens_callbacks.cli", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False,
    )


def ok(*args: object) -> str:
    done = run_lens(*args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose cell after the index (or first cell) is ``first_cell``."""
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if first_cell in cells[:2]:
            return cells
    raise AssertionError(f"no row for {first_cell!r} in:\n{output}")


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_step_folder_shows_layers_and_pooled_statistics(run: Run) -> None:
    step = run.step(2)
    out = ok("inspect", step)
    assert f"Capture     {step} (step 2, stage train, rank 0, 2 micro-batches)" in out
    assert "pooled over 2 micro-batches" in out
    assert "ThreeLayers: " in out
    assert "3 selected" in out
    saved = json.loads((step / "summaries.json").read_text())
    second = run.labels["second"]
    cells = row(out, second)
    assert cells[2:5] == ["(6, 8)", "float32", "second"]
    activation, gradient = saved["activations"][second], saved["gradients"][second]
    expected = [activation[k] for k in ("mean", "std", "min", "max")]
    expected += [gradient["mean_abs"], gradient["l2_norm"]]
    assert cells[5:11] == [f"{value:.4g}" for value in expected]
    assert row(out, "relu_1_2")[5:] == ["-"] * 7  # not selected: no statistics
    weight = saved["parameter_gradients"]["second.weight"]
    assert row(out, "second.weight")[1:3] == ["64", f"{weight['mean_abs']:.4g}"]


@pytest.mark.parametrize("where", ["step folder", "downloaded artifact"])
def test_inspect_step_folder_of_one_micro_batch(run: Run, tmp_path: Path, where: str) -> None:
    step = run.step(2, rank=1)  # rank 1 did not accumulate gradients
    if where == "downloaded artifact":  # WandbWriter's artifact is the step folder, under W&B's name
        step = shutil.copytree(step, tmp_path / "artifacts" / "lens-capture-1a2b3c:v1")
    out = ok("inspect", step)
    assert f"Capture     {step} (step 2, stage train, rank 1, 1 micro-batch)" in out
    assert f"History     {step / 'micro_batch_0'}" in out
    assert "pooled over 1 micro-batch" in out
    assert "2 selected" in out


def test_inspect_history_folder_computes_what_was_not_summarised(run: Run) -> None:
    folder = run.step(2) / "micro_batch_1"  # DiskWriter saves summaries with micro-batch 0 only
    out = ok("inspect", folder)
    assert "outputs computed from tensors.safetensors; gradients computed from tensors.safetensors" in out
    layer = lc.load(folder)[run.labels["third"]]
    assert layer.tensor_contents is not None
    cells = row(out, layer.label)
    assert cells[5] == f"{layer.tensor_contents.mean().item():.4g}"
    assert "Parameter gradients" not in out


# -- diff --------------------------------------------------------------------------------------


def test_diff_ranks_the_layer_that_changed_most_first(run: Run) -> None:
    out = ok("diff", run.step(0), run.step(2), "--top", "2")
    activations = out.split("Activations:")[1].split("Gradients:")[0]
    rows = [line.split() for line in activations.splitlines()[3:] if line.strip()]
    assert [cells[0] for cells in rows] == [run.labels["second"], run.labels["third"]]  # --top 2
    change = float(rows[0][3].rstrip("%"))
    assert 800 < change < 1000  # tenfold: +900 %
    assert abs(float(rows[1][3].rstrip("%"))) < 50
    assert "Activations: 3 layers in both, the 2 largest changes" in out
    assert "Parameter gradients: 6 parameters in both" in out


def test_diff_lists_layers_found_on_one_side(run: Run) -> None:
    out = ok("diff", run.step(2, rank=0), run.step(2, rank=1), "--stat", "l2_norm")
    assert f"Only in A (1): {run.labels['third']}" in out
    assert "Only in A (2): third.weight, third.bias" in out
    assert "Only in B" not in out
    assert "B l2_norm" in out


# -- list --------------------------------------------------------------------------------------


def test_list_sorts_captures_by_step_across_ranks_and_reports_damage(run: Run) -> None:
    out = ok("list", run.root)
    table = [line.split() for line in out.split("\n\n")[0].splitlines()[2:]]
    assert [cells[:6] for cells in table] == [
        ["0", "train", "0", "2", "9", "3"],
        ["0", "train", "1", "1", "9", "2"],
        ["2", "train", "0", "2", "9", "3"],
        ["2", "train", "1", "1", "9", "2"],
        ["2", "validate", "0", "1", "7", "3"],
        ["4", "train", "0", "0", "-", "-"],
    ]
    assert table[0][-1] == str(run.step(0))
    assert table[0][-2] == "KB"  # size, e.g. "24.1 KB"
    assert "1 of 6 captures cannot be read completely" in out
    assert f"{run.step(4)}: it has no micro_batch_0/" in out


# -- graph -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1], ids=["two micro-batches", "one micro-batch"])
def test_graph_renders_svg(run: Run, tmp_path: Path, rank: int) -> None:
    require(shutil.which("dot") is not None, "graphviz's dot binary is not installed")
    pytest.importorskip("graphviz")
    out = ok("graph", run.step(2, rank=rank), "-o", tmp_path / "graph.svg", "--rolled", "--depth", "1")
    assert out == f"wrote {tmp_path / 'graph.svg'}\n"
    svg = (tmp_path / "graph.svg").read_text()
    assert "<svg" in svg
    assert run.labels["second"].split("_")[0] in svg


@pytest.mark.parametrize("missing", ["dot", "graphviz"])
def test_graph_without_renderer_says_what_to_install(run: Run, tmp_path: Path, missing: str) -> None:
    env = dict(os.environ)
    if missing == "dot":
        env["PATH"] = str(tmp_path)  # no dot on it
        hint = "apt-get install graphviz"
    else:
        shadow = tmp_path / "shadow" / "graphviz"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('graphviz is broken here')\n")
        env["PYTHONPATH"] = str(shadow.parent)
        hint = 'pip install "lens-callbacks[viz]"'
    done = run_lens("graph", run.step(2), "-o", tmp_path / "graph.svg", env=env)
    assert done.returncode == EXIT_ERROR
    assert done.stderr.startswith("lens graph: error: ")
    assert hint in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "graph.svg").exists()


# -- errors ------------------------------------------------------------------------------------


def _missing_history_json(folder: Path) -> Path:
    (folder / "history.json").unlink()
    return folder


def _invalid_json(folder: Path) -> Path:
    (folder / "history.json").write_text('{"format": "lens-callbacks capture", "format_')
    return folder


def _hidden_temporary(folder: Path) -> Path:
    return folder.rename(folder.parent / ".micro_batch_0.tmp-0123456789ab")


def _newer_format(folder: Path) -> Path:
    document = json.loads((folder / "history.json").read_text())
    document["format_version"] = 99
    (folder / "history.json").write_text(json.dumps(document))
    return folder


def _step_without_summaries(folder: Path) -> Path:
    (folder.parent / "summaries.json").unlink()
    return folder.parent


def _not_a_capture(folder: Path) -> Path:
    notes = folder.parent.parent / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("hello")
    return notes


def _does_not_exist(folder: Path) -> Path:
    return folder / "nowhere"


def _run_folder(folder: Path) -> Path:
    return folder.parent.parent


DAMAGES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "does not exist": (_does_not_exist, "does not exist; pass a step folder"),
    "not a capture": (_not_a_capture, "is not a capture (no history.json, summaries.json or micro_batch_0/)"),
    "no history.json": (_missing_history_json, "is a damaged capture: history.json is missing"),
    "invalid JSON": (_invalid_json, "is a damaged capture: history.json is not valid JSON"),
    "hidden temporary": (_hidden_temporary, "is the temporary folder of a save that did not finish"),
    "newer format": (_newer_format, "was saved in capture format version 99"),
    "step without summaries": (
        _step_without_summaries, "is a half-written step folder: summaries.json is missing"
    ),
    "run folder": (_run_folder, "is a run folder holding 1 captured step, not one capture; pass one of them"),
}


@pytest.fixture(scope="module")
def refusals(run: Run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Completed]]:
    """``lens inspect`` of each damaged copy of a step, run side by side: each run imports torch."""
    base = tmp_path_factory.mktemp("damaged")
    paths = {}
    for name, (damage, _) in DAMAGES.items():
        step = shutil.copytree(run.step(0), base / name.replace(" ", "_") / "step_000000")
        paths[name] = damage(step / "micro_batch_0")
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(paths, pool.map(lambda path: run_lens("inspect", path), paths.values()), strict=True))
    return {name: (paths[name], done[name]) for name in paths}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_unusable_paths_exit_2_with_the_path_and_the_fix(
    refusals: dict[str, tuple[Path, Completed]], case: str
) -> None:
    path, done = refusals[case]
    assert done.returncode == EXIT_ERROR
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"lens inspect: error: {path}")
    assert DAMAGES[case][1] in done.stderr
    assert len(done.stderr.splitlines()) == 1


# -- the same folders in Python ------------------------------------------------------------------


def test_every_folder_the_run_wrote_loads_with_lens_core(run: Run) -> None:
    steps = lc.store.step_folders(run.root)
    assert len(steps) == 6
    for found in steps:
        count = len(lc.store.micro_batch_folders(found.path))
        if found.step == 4:  # the step the run died in
            with pytest.raises(lc.CaptureFormatError, match="half-written step folder") as refused:
                lc.load(found.path)
            assert "damaged" not in str(refused.value)
        elif count == 1:
            assert lc.load(found.path).layer_labels == lc.load(found.path / "micro_batch_0").layer_labels
            assert lc.load_extra(found.path) == {"step": found.step, "stage": found.stage, "rank": found.rank}
        else:
            assert count == 2
            with pytest.raises(lc.store.SeveralCapturesError, match=r"micro_batch=1\)"):
                lc.load(found.path)
            for index in range(count):
                history = lc.load(found.path, micro_batch=index)
                assert history.layer_labels == lc.load(found.path / f"micro_batch_{index}").layer_labels
    with pytest.raises(lc.store.SeveralCapturesError, match="run folder holding 6 captured steps") as caught:
        lc.load(run.root)
    assert caught.value.captures == tuple(found.path for found in steps)
