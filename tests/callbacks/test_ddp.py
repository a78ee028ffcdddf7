"""Real 2-process DDP runs (gloo on CPU), in a subprocess so Lightning can launch its ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, strategy: str, ranks: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.callbacks.ddp_train", str(tmp_path), strategy, ranks],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "lens"


def summary(folder: Path) -> dict[str, object]:
    return json.loads((folder / "summaries.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_rank_zero_captures_by_default(tmp_path: Path, strategy: str) -> None:
    root = run(tmp_path, strategy, "zero")
    assert sorted(p.name for p in root.iterdir()) == ["step_000000", "step_000002"]
    assert summary(root / "step_000002")["rank"] == 0


def test_all_ranks_capture_into_their_own_folders(tmp_path: Path) -> None:
    root = run(tmp_path, "ddp", "all")
    assert sorted(p.name for p in root.iterdir()) == ["rank_0", "rank_1"]
    for rank in (0, 1):
        folder = root / f"rank_{rank}" / "step_000002"
        data = summary(folder)
        assert data["rank"] == rank
        # parameter gradients are all-reduced: both ranks see the same ones
        assert data["parameter_gradients"]
    zero = summary(root / "rank_0" / "step_000002")["parameter_gradients"]
    one = summary(root / "rank_1" / "step_000002")["parameter_gradients"]
    assert zero == one
    activations_0 = summary(root / "rank_0" / "step_000002")["activations"]
    activations_1 = summary(root / "rank_1" / "step_000002")["activations"]
    assert activations_0 != activations_1  # each rank saw its own shard of the batch
