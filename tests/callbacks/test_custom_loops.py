"""``Lens`` drives loops written with Lightning Fabric and Hugging Face ``accelerate``.

The README's recipe: the whole step (forward, the framework's backward, its clipping, the
optimizer step) inside ``with lens.step(step):``. Oracles: a capture of the model and the loss
alone (the layers), a step post-hook of the test's own on the torch optimizer (the gradients the
update used), the norm the framework's clipping returns, and a run without ``Lens`` (bitwise).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lens_core as lc
from lens_callbacks import Lens
from tests.callbacks.helpers import SmallCNN, batches
from tests.callbacks.test_lens import nothing_installed
from tests.callbacks.test_updates import Records, UpdateOracle, assert_summaries_match, no_optimizer_hooks
from tests.conftest import require

MAX_NORM = 0.05
# backward(loss), clip(max_norm) -> the norm before clipping
Loop = tuple[torch.nn.Module, Any, Callable[[torch.Tensor], None], Callable[[], torch.Tensor]]


@contextmanager
def _fabric(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[Loop]:
    require(importlib.util.find_spec("lightning") is not None, "lightning is not installed")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped, wrapped_optimizer = fabric.setup(model, optimizer)
    yield (wrapped, wrapped_optimizer, fabric.backward,
           lambda: fabric.clip_gradients(wrapped, wrapped_optimizer, max_norm=MAX_NORM))


@contextmanager
def _accelerate(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[Loop]:
    require(importlib.util.find_spec("accelerate") is not None, "accelerate is not installed")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    try:
        wrapped, wrapped_optimizer = accelerator.prepare(model, optimizer)
        yield (wrapped, wrapped_optimizer, accelerator.backward,
               lambda: accelerator.clip_grad_norm_(wrapped.parameters(), MAX_NORM))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the Trainer tests make their own


def _train(framework: Any, model: SmallCNN, lens: Lens | None) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    with framework(model, optimizer) as (wrapped, wrapped_optimizer, backward, clip):
        for step, (x, y) in enumerate(batches(3)):
            oracle = UpdateOracle.on(model, optimizer)
            with lens.step(step) if lens is not None else torch.enable_grad():
                loss = F.cross_entropy(wrapped(x), y)
                backward(loss)
                total = float(clip())
                wrapped_optimizer.step()
            wrapped_optimizer.zero_grad()
            oracle.remove()
            seen.append({"used": oracle.used, "total": total, "after": oracle.total_norm()})
    assert no_optimizer_hooks(optimizer)
    return seen


@pytest.mark.parametrize("framework", [_fabric, _accelerate], ids=["fabric", "accelerate"])
def test_a_custom_loop_records_the_model_and_the_gradients_its_update_used(framework: Any) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    twin = copy.deepcopy(model)
    x, y = batches(1)[0]
    with lc.capture(copy.deepcopy(model)) as cap:  # the model and the loss alone
        F.cross_entropy(cap.model(x), y)
    writer = Records()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    expected = _train(framework, model, lens)
    lens.close()
    _train(framework, twin, None)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)  # training is bitwise unchanged
    assert nothing_installed(model)
    assert sorted(writer.records) == [0, 1, 2]
    for step, record in writer.records.items():
        assert record.history.layer_labels == cap.history.layer_labels  # no framework op
        assert_summaries_match(record.parameter_gradients, expected[step]["used"])
        assert set(record.parameter_gradients) == {name for name, _ in model.named_parameters()}
        assert record.grad_norm_before_clip == pytest.approx(expected[step]["total"], rel=1e-6)
        assert record.grad_norm == pytest.approx(expected[step]["after"], rel=1e-6)
        assert record.grad_norm == pytest.approx(MAX_NORM, rel=1e-4)  # clipped
        assert record.clip_coefficient == pytest.approx(MAX_NORM / (expected[step]["total"] + 1e-6), rel=1e-5)
