"""Teardown in every order and thread, and models a capture cannot see into (TorchScript)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lens_core as lc


class Counting(TorchFunctionMode):
    """A user's own mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_user_mode_left_entered_above_ours_stays_and_ours_goes() -> None:
    model = nn.Linear(3, 3)
    user = Counting()
    cap = lc.capture(model).start()
    user.__enter__()  # entered inside the capture and still active when it stops
    model(torch.randn(2, 3))
    history = cap.stop()
    assert [layer.layer_type for layer in history] == ["randn", "linear", "output"]
    assert torch._C._len_torch_function_stack() == 1  # the user's, nothing of ours
    before = user.calls
    torch.randn(2).sum()
    assert user.calls == before + 2  # still active, no longer recording
    user.__exit__(None, None, None)
    assert torch._C._len_torch_function_stack() == 0
    with lc.capture(model) as again:  # a new capture works
        model(torch.randn(2, 3))
    assert [layer.layer_type for layer in again.history] == ["randn", "linear", "output"]


def test_stop_from_another_thread_is_refused_and_changes_nothing() -> None:
    gc_was = gc.isenabled()
    cap = lc.capture(nn.Linear(3, 3)).start()
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            cap.stop()
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=stop)
    worker.start()
    worker.join()
    assert len(errors) == 1
    assert isinstance(errors[0], lc.CaptureError)
    assert "thread" in str(errors[0])
    assert cap.active
    cap.stop()  # from the right thread
    assert gc.isenabled() == gc_was
    assert torch._C._len_torch_function_stack() == 0


def test_the_collector_runs_again_when_the_history_cannot_be_built() -> None:
    gc_was = gc.isenabled()
    model = nn.Linear(3, 3)
    with pytest.raises(lc.LayerNotFoundError), lc.capture(model, layers="conv9"):
        model(torch.randn(2, 3))
    assert gc.isenabled() == gc_was
    assert torch._C._len_torch_function_stack() == 0


def test_torchscript_models_are_refused_and_scripted_parts_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(TypeError, match=r"TorchScript module .*Capture the eager module"):
        lc.log_forward_pass(torch.jit.script(model), torch.randn(2, 3))
    with pytest.raises(TypeError, match="TorchScript"):
        lc.capture(torch.jit.trace(model, torch.randn(2, 3)))
    mixed = nn.Sequential(torch.jit.script(nn.Linear(3, 3)), nn.ReLU())
    with pytest.warns(RuntimeWarning, match="0 is a TorchScript module"):
        lc.log_forward_pass(mixed, torch.randn(2, 3))
