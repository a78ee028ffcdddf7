"""Writers' faults cost no other writer its data; background writing never holds training up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lens_callbacks import CaptureRecord, DiskWriter, Lens
from tests.callbacks.helpers import ListWriter, SmallCNN, batches
from tests.callbacks.test_lens import train


class RaisingWriter:
    def write(self, record: CaptureRecord) -> None:
        raise OSError(f"disk full at step {record.step}")

    def close(self) -> None:
        pass


@dataclass
class BlockedWriter(ListWriter):
    """Waits for ``release`` before writing anything; says when a write has started."""

    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def write(self, record: CaptureRecord) -> None:
        self.started.set()
        self.release.wait()
        super().write(record)


def written_steps(root: Path) -> list[str]:
    return sorted(path.parent.name for path in root.glob("*/summaries.json"))


@pytest.mark.parametrize("background", [False, True])
def test_strict_raises_only_after_every_writer_has_the_record(tmp_path: Path, background: bool) -> None:
    model = SmallCNN()
    lens = Lens(model, every_n_steps=1, writers=[RaisingWriter(), DiskWriter(tmp_path)], strict=True,
                background=background)
    with pytest.raises(OSError, match="disk full at step 0"):
        train(model, lens, steps=3)  # in the background, raised at the next call: step 1 or close
    lens.flush(raise_errors=False)
    assert written_steps(tmp_path)[0] == "step_000000"


def test_a_failing_writer_costs_the_others_nothing(tmp_path: Path) -> None:
    model = SmallCNN()
    # A queue as long as the run: on a busy machine the disk writer falls behind, and a full
    # queue dropping a capture is another test's subject.
    lens = Lens(model, every_n_steps=1, writers=[RaisingWriter(), DiskWriter(tmp_path)], background=True,
                max_queued=6)
    with pytest.warns(RuntimeWarning, match="RaisingWriter failed to write step 0"):
        train(model, lens, steps=6)
    assert written_steps(tmp_path) == [f"step_{i:06d}" for i in range(6)]


def test_training_does_not_wait_for_a_background_writer() -> None:
    model = SmallCNN()
    writer = BlockedWriter()
    lens = Lens(model, every_n_steps=1, writers=[writer], background=True, max_queued=5)
    for step, (x, y) in enumerate(batches(5)):
        with lens.step(step):
            F.cross_entropy(model(x), y).backward()
    assert writer.steps == []  # every step has run; the writer has not finished one
    writer.release.set()
    lens.close()
    assert writer.steps == [0, 1, 2, 3, 4]
    assert writer.closed


def test_a_hung_writer_is_named_while_training_goes_on() -> None:
    model = SmallCNN()
    writer = BlockedWriter()
    lens = Lens(model, every_n_steps=1, writers=[writer], background=True, write_timeout=0.2)
    x = torch.randn(2, 1, 8, 8)
    with lens.step(0):
        model(x).sum().backward()
    assert writer.started.wait(10)
    time.sleep(0.3)  # past write_timeout
    hung = "BlockedWriter has been writing step 0 for more than write_timeout=0.2"
    with pytest.warns(RuntimeWarning, match=hung), lens.step(1):
        model(x).sum().backward()
    writer.release.set()
    lens.close()
    assert writer.steps == [0, 1]


def test_a_full_queue_drops_its_oldest_capture_with_a_warning() -> None:
    model = SmallCNN()
    writer = BlockedWriter()
    lens = Lens(model, every_n_steps=1, writers=[writer], background=True, max_queued=1)
    x = torch.randn(2, 1, 8, 8)
    with lens.step(0):
        model(x).sum().backward()
    assert writer.started.wait(10)  # step 0 is being written, nothing waits
    with lens.step(1):
        model(x).sum().backward()
    dropped = "the capture of step 1 is dropped unwritten: 1 captures are waiting"
    with pytest.warns(RuntimeWarning, match=dropped), lens.step(2):
        model(x).sum().backward()
    writer.release.set()
    lens.close()
    assert writer.steps == [0, 2]


@dataclass
class TensorWriter:
    """Keeps a copy of every saved output, read when written (no ``save_tensors`` attribute:
    the capture keeps the tensors)."""

    release: threading.Event | None = None
    tensors: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def write(self, record: CaptureRecord) -> None:
        if self.release is not None:
            self.release.wait()
        self.tensors.append({
            layer.label: layer.tensor_contents.clone()
            for layer in record.history if layer.tensor_contents is not None
        })

    def close(self) -> None:
        pass


class ViewOfWeights(torch.nn.Module):
    """An output that shares memory with a parameter, which the next updates change in place."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def test_background_writers_read_the_step_as_it_was() -> None:
    def run(writer: TensorWriter, background: bool) -> None:
        torch.manual_seed(0)
        model = ViewOfWeights()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        lens = Lens(model, every_n_steps=1, writers=[writer], background=background, max_queued=5)
        for step in range(3):
            with lens.step(step):
                model(torch.randn(2, 3)).square().sum().backward()
            optimizer.step()  # after the block: out of the capture's sight
            optimizer.zero_grad()
        if writer.release is not None:
            writer.release.set()
        lens.close()

    at_once, later = TensorWriter(), TensorWriter(threading.Event())
    run(at_once, background=False)
    run(later, background=True)
    assert any(t.data_ptr() for t in at_once.tensors[0].values())
    assert len(later.tensors) == 3
    for expected, got in zip(at_once.tensors, later.tensors, strict=True):
        assert expected.keys() == got.keys()
        for label in expected:
            torch.testing.assert_close(got[label], expected[label], rtol=0, atol=0)


def test_a_writer_s_torch_ops_are_not_captured() -> None:
    go, done = threading.Event(), threading.Event()

    class Busy(ListWriter):
        def write(self, record: CaptureRecord) -> None:
            if record.step == 0:
                go.wait()
                torch.relu(torch.randn(8, 8) @ torch.randn(8, 8)).sum()  # while step 1 is captured
                done.set()
            super().write(record)

    model = SmallCNN().eval()
    writer = Busy()
    lens = Lens(model, every_n_steps=1, writers=[writer], background=True)
    x = torch.randn(2, 1, 8, 8)
    with lens.step(0):
        model(x).sum().backward()
    with lens.step(1):
        go.set()
        assert done.wait(10)
        model(x).sum().backward()
    lens.close()
    first, second = writer.seen
    assert first.labels == second.labels


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints on tiny runs
def test_lightning_teardown_flushes_the_background_writes(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from lens_callbacks import LensCallback
    from tests.callbacks.lightning_helpers import LitCNN, loader, trainer

    writer = ListWriter()
    callback = LensCallback(every_n_steps=1, writers=[writer], background=True, max_queued=4)
    trainer(tmp_path, [callback]).fit(LitCNN(), loader())
    assert writer.steps == [0, 1, 2, 3]
