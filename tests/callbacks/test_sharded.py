"""Sharded training on 2 real CPU processes (gloo): FSDP2, FSDP1, tensor parallel.

Each run (tests/callbacks/fsdp_train.py) captures one step of a small MLP on every rank with the
default ``layers="all"``; the oracle is the whole gradient gathered by the test itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lens_core as lc

ROOT = Path(__file__).resolve().parents[2]
MODEL_OPS = ["input", "linear", "relu", "linear", "output", "square", "mean"]
NAMES = ["down.bias", "down.weight", "up.bias", "up.weight"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(tmp_path: Path, variant: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.callbacks.fsdp_train", str(tmp_path), variant, _free_port()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]


def test_fsdp2_layers_names_and_gradients_are_the_model_s(tmp_path: Path) -> None:
    for rank, seen in enumerate(run(tmp_path, "fsdp2")):
        assert seen["layers"] == MODEL_OPS  # no all-gather, copy-in or split of FSDP's
        assert seen["params"] == NAMES  # the unsharded parameters of the forward, by name
        assert sorted(seen["parameter_gradients"]) == NAMES
        for name, summary in seen["parameter_gradients"].items():
            assert summary["l2_norm"] == pytest.approx(seen["oracle"][name], rel=1e-6)
            assert summary["shard"] == f"LocalShard(placements=('Shard(dim=0)',), coordinate=({rank},))"
        assert not seen["skipped"]


@pytest.mark.parametrize("variant", ["fsdp1", "fsdp1_flat"])
def test_fsdp1_keeps_the_original_names(tmp_path: Path, variant: str) -> None:
    names = [f"_fsdp_wrapped_module.{name}" for name in NAMES]
    ranks = run(tmp_path, variant)
    for seen in ranks:
        assert seen["layers"] == MODEL_OPS
        assert seen["params"] == names
        for name, summary in seen["parameter_gradients"].items():  # this rank's slices
            assert summary["l2_norm"] == pytest.approx(seen["oracle"][name], rel=1e-6)
    held = set().union(*(seen["parameter_gradients"] for seen in ranks))
    # use_orig_params=True: every parameter's gradient, sliced over the ranks' flat shards;
    # with flat parameters only, no original parameter has a gradient to report
    assert held == (set(names) if variant == "fsdp1" else set())


def test_tensor_parallel_captures_with_parameters_by_name(tmp_path: Path) -> None:
    placements = {"up.weight": "Shard(dim=0)", "up.bias": "Shard(dim=0)", "down.weight": "Shard(dim=1)"}
    for rank, seen in enumerate(run(tmp_path, "tp")):
        ops = [op for op in seen["layers"] if op != "input"]
        assert ops[:3] == ["linear", "relu", "linear"]
        assert seen["params"] == NAMES
        for name, summary in seen["parameter_gradients"].items():
            assert summary["l2_norm"] == pytest.approx(seen["oracle"][name], rel=1e-6)
            expected = placements.get(name)
            where = f"LocalShard(placements=('{expected}',), coordinate=({rank},))"
            assert summary["shard"] == (None if expected is None else where)


def test_lightning_model_parallel_strategy_with_the_callback_on_every_rank(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.callbacks.model_parallel_train", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = [f"net.{name}" for name in NAMES]
    for rank in (0, 1):
        oracle = json.loads((tmp_path / f"oracle_rank_{rank}.json").read_text())
        for step in (0, 1):
            folder = tmp_path / "lens" / f"rank_{rank}" / f"step_{step:06d}"
            history = lc.load(folder)
            # the LightningModule's training_step calls self.net: its ops and the loss, no output
            assert [layer.layer_type for layer in history] == [op for op in MODEL_OPS if op != "output"]
            assert sorted({p.name for layer in history for p in layer.params}) == names
            gradients = json.loads((folder / "summaries.json").read_text())["parameter_gradients"]
            assert sorted(gradients) == names
            for name, summary in gradients.items():
                assert summary["l2_norm"] == pytest.approx(oracle[str(step)][name], rel=1e-6)
                assert summary["shard"] == {"placements": ["Shard(dim=0)"], "coordinate": [rank]}
