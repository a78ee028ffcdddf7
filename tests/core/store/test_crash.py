"""``kill -9`` during saves: whatever a killed writer leaves loads completely or is refused clearly.

A child process saves a capture of a few megabytes over and over (``overwrite=True``, and to new
folders), and is killed with SIGKILL at a random moment of a save: in the middle of writing
the tensors, between the files, between the renames. Every folder left beside it, the hidden
temporary ones included, must then either load with every tensor intact (its digests checked)
or raise a ``CaptureFormatError``; the SIGKILL can never leave a capture that loads with wrong
data.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lens_core import store
from lens_core.store import CaptureFormatError

ROOT = Path(__file__).resolve().parents[3]
ROUNDS = 3
_WRITER = """
import sys, torch
from pathlib import Path
import lens_core as lc
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
with lc.capture(model, gradients=True) as cap:
    loss = model(torch.randn(256, 512)).sum()
loss.backward()
folder = Path(sys.argv[1])
for count in range(10**6):
    lc.save(cap.history, folder / "capture", overwrite=True)
    lc.save(cap.history, folder / f"capture_{count}")
    print("saved", count, flush=True)
"""


def _outcome(folder: Path) -> str:
    try:
        history = store.load(folder)
        for layer in history:
            _ = layer.tensor_contents, layer.gradient
    except CaptureFormatError:
        return "refused"
    return "complete"


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_save_killed_at_any_moment_leaves_nothing_that_loads_wrong(tmp_path: Path, round_: int) -> None:
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().startswith("saved 0")  # one save of each kind is complete
        time.sleep(random.Random(round_).uniform(0.0, 0.4))
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    left = sorted(tmp_path.iterdir())
    outcomes = {entry.name: _outcome(entry) for entry in left}
    assert outcomes["capture_0"] == "complete"
    # a folder under its own name is always complete; only the hidden one of a save cut short is not
    refused = [name for name, outcome in outcomes.items() if outcome == "refused"]
    assert [name for name in refused if not name.startswith(".")] == []


def test_the_next_save_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    import torch

    import lens_core as lc

    history = lc.log_forward_pass(torch.nn.Linear(2, 2), torch.randn(1, 2))
    target = tmp_path / "micro_batch_0"
    old = tmp_path / ".micro_batch_0.tmp-0123456789ab"  # as a save killed an hour ago left it
    old.mkdir()
    (old / "tensors.safetensors").write_bytes(b"\0" * 64)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    recent = tmp_path / ".micro_batch_0.tmp-ba9876543210"  # may be a save still running
    recent.mkdir()
    other = tmp_path / ".micro_batch_1.tmp-0123456789ab"  # another target's: not ours to judge
    other.mkdir()
    os.utime(other, (an_hour_ago, an_hour_ago))
    lc.save(history, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, recent.name, other.name])
    assert lc.load(target).layer_labels == history.layer_labels
