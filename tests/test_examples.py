"""Every example runs (tiny sizes), so none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "core_quickstart.py": [],
    "lightning_quickstart.py": ["--steps", "4", "--every", "2"],
    "plain_loop.py": ["--quick"],
    "recurrent_graph.py": ["--quick"],
    "transformer_wandb.py": ["--quick"],
    "nan_forensics.py": ["--quick"],
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name: str, tmp_path: Path) -> None:
    out = [] if name in ("core_quickstart.py", "nan_forensics.py") else ["--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *EXAMPLES[name], *out],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
