"""The capture mechanism: context manager, teardown, errors, in-place safety, observer effect."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

import lens_core as lc


def assert_nothing_installed() -> None:
    assert torch._C._len_torch_function_stack() == 0
    assert not module_globals._global_forward_hooks
    assert not module_globals._global_forward_pre_hooks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        raise ValueError("boom inside the model")


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_context_manager_records_loss_and_model(net: Net) -> None:
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with lc.capture(net) as cap:
        loss = F.cross_entropy(net(x), y)
    history = cap.history
    labels = history.all_layer_labels
    assert labels[0] == "input_1_0"
    assert labels[-1].startswith("crossentropy_1_")
    # the loss reads the model's real last op; the output layer is a leaf, as in TorchLens
    assert history[-1].parents[0] == history["fc2"].label
    assert history.output_layers == [labels[-3]]
    target = history[history.input_layers[1]]
    assert target.layer_type == "input"
    assert target.children == (labels[-1],)
    assert torch.equal(target.tensor_contents, y)
    assert torch.equal(history[-1].tensor_contents, loss)
    assert history[-1].tensor_contents is loss  # not mutated, so not copied
    assert_nothing_installed()


def test_history_before_the_end_is_an_error(net: Net) -> None:
    cap = lc.capture(net)
    with pytest.raises(lc.CaptureError, match="has not run"):
        cap.history
    with cap:
        with pytest.raises(lc.CaptureError, match="still running"):
            cap.history
        net(torch.randn(2, 4))


def test_nested_capture_is_refused_and_outer_survives(net: Net) -> None:
    with lc.capture(net) as outer:
        with pytest.raises(lc.CaptureError, match="cannot nest"), lc.capture(net):
            pass
        net(torch.randn(2, 4))
    assert len(outer.history) > 0
    assert_nothing_installed()


def test_concurrent_capture_in_another_thread_is_refused(net: Net) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with lc.capture(net):
                pass
        except lc.CaptureError as error:
            errors.append(error)

    with lc.capture(net) as cap:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        net(torch.randn(2, 4))
    assert len(errors) == 1
    assert all(layer.layer_type != "mul" for layer in cap.history)


def test_ops_of_other_threads_are_not_recorded(net: Net) -> None:
    def other() -> None:
        net(torch.randn(2, 4)) * 3

    with lc.capture(net) as cap:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(cap.history) == 0


def test_model_error_propagates_unchanged_and_nothing_leaks() -> None:
    model = Boom()
    with pytest.raises(ValueError, match="boom inside the model") as caught:
        lc.log_forward_pass(model, torch.randn(2))
    assert caught.value.__traceback__ is not None
    assert type(caught.value) is ValueError
    assert_nothing_installed()
    with pytest.raises(ValueError, match="boom inside the model"), lc.capture(model):
        model(torch.randn(2))
    assert_nothing_installed()
    lc.log_forward_pass(nn.Linear(2, 2), torch.randn(1, 2))  # a new capture starts fine


def test_inputs_the_model_rejects_raise_the_models_own_error(net: Net) -> None:
    bad = torch.randn(2, 5)
    with pytest.raises(RuntimeError) as plain:
        net(bad)
    with pytest.raises(RuntimeError) as captured:
        lc.log_forward_pass(net, bad)
    assert str(captured.value) == str(plain.value)
    assert_nothing_installed()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "resnet"}, TypeError, "model must be a torch.nn.Module, got str"),
        ({"layers_to_save": 3.5}, TypeError, "layers_to_save=3.5 is not a layer selection"),
        ({"layers_to_save": [True]}, TypeError, "layers_to_save holds True"),
        ({"layers_to_save": [""]}, ValueError, "empty string"),
        ({"input_kwargs": [1]}, TypeError, "input_kwargs must be a dict or None, got list"),
        ({"vis_opt": "pretty"}, ValueError, "vis_opt='pretty': use 'none', 'unrolled' or 'rolled'"),
        ({"vis_nesting_depth": 0}, ValueError, "vis_nesting_depth=0: use an int >= 1"),
        ({"random_seed": "7"}, TypeError, "random_seed must be an int or None, got '7'"),
        ({"layers_to_save": ["conv2d_1_1"]}, lc.LayerNotFoundError, "matches no layer"),
        ({"layers_to_save": [99]}, lc.LayerNotFoundError, "layers_to_save=99 matches no layer"),
        ({"layers_to_save": ["lineer_1_1"]}, lc.LayerNotFoundError, r"closest: linear_1_1"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(
    net: Net, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    call: dict[str, object] = {"model": net, "input_args": torch.randn(2, 4), **kwargs}
    with pytest.raises(error, match=match):
        lc.log_forward_pass(**call)  # type: ignore[arg-type]
    assert_nothing_installed()


def test_unknown_keys_list_the_closest_names(net: Net) -> None:
    history = lc.get_model_metadata(net, torch.randn(2, 4))
    with pytest.raises(lc.LayerNotFoundError, match=r"Closest: .*linear_1_1.*history.all_layer_labels"):
        history["linaer_1_1"]
    with pytest.raises(IndexError, match=r"valid: -\d+ to \d+"):
        history[100]
    with pytest.raises(TypeError, match="not float"):
        history[1.0]  # type: ignore[index]
    assert "fc1" in history
    assert "nope" not in history


def test_metadata_saves_nothing_but_lists_every_layer(net: Net) -> None:
    history = lc.get_model_metadata(net, torch.randn(2, 4))
    assert history.num_tensors_saved == 0
    assert history.layer_labels == history.all_layer_labels
    assert history["fc2"].shape == (2, 3)


def test_selection_forms(net: Net) -> None:
    x = torch.randn(2, 4)
    history = lc.log_forward_pass(net, x, layers_to_save=["fc1", 2, "drop", lambda layer: layer.is_output])
    saved = [layer.label for layer in history.saved_layers]
    assert saved == ["linear_1_1", "relu_1_2", "dropout_1_3", "output_1_5"]
    assert lc.log_forward_pass(net, x, layers_to_save="linear").layer_labels == ["linear_1_1", "linear_2_4"]


def test_inplace_relu_keeps_the_value_before_the_op(net: Net) -> None:
    x = torch.randn(16, 4)
    history = lc.log_forward_pass(net, x)
    linear = history["fc1"].tensor_contents
    assert torch.equal(linear, net.fc1(x))
    assert (linear < 0).any()
    assert torch.equal(history["act"].tensor_contents, net.fc1(x).relu())
    assert history["act"].is_inplace


class ViewMutation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1
        row = y[0]
        row.mul_(10)  # writes into y through a view
        y += 1
        return y


def test_inplace_through_a_view_and_augmented_assignment() -> None:
    x = torch.ones(2, 3)
    history = lc.log_forward_pass(ViewMutation(), x)
    assert torch.equal(history["mul_1_1"].tensor_contents, torch.ones(2, 3))
    assert torch.equal(history["getitem_1_2"].tensor_contents, torch.ones(3))
    assert torch.equal(history["mul_2_3"].tensor_contents, torch.full((3,), 10.0))
    # y changed through its view: a layer stands for its new value, and y's readers read it
    written = history["viewwrite_1_4"]
    assert written.parents == ("mul_1_1", "mul_2_3")
    assert torch.equal(written.tensor_contents, torch.tensor([[10.0] * 3, [1.0] * 3]))
    assert history["add_1_5"].parents == ("viewwrite_1_4",)
    assert torch.equal(history["add_1_5"].tensor_contents, torch.tensor([[11.0] * 3, [2.0] * 3]))
    assert torch.equal(history["input_1_0"].tensor_contents, torch.ones(2, 3))


def test_capture_changes_nothing(net: Net) -> None:
    x = torch.randn(8, 4)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def run(captured: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        net.load_state_dict(state)
        net.zero_grad()
        torch.manual_seed(1)
        if captured:
            with lc.capture(net):
                out = net(x)
        else:
            out = net(x)
        out.square().sum().backward()
        return out, torch.get_rng_state(), [p.grad.clone() for p in net.parameters()]

    plain, captured = run(False), run(True)
    assert torch.equal(plain[0], captured[0])
    assert torch.equal(plain[1], captured[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], captured[2], strict=True))
    assert net.training


def test_random_seed_makes_the_pass_repeatable(net: Net) -> None:
    x = torch.randn(8, 4)
    first = lc.log_forward_pass(net, x, random_seed=3)
    second = lc.log_forward_pass(net, x, random_seed=3)
    assert first.random_seed == 3
    assert torch.equal(first["drop"].tensor_contents, second["drop"].tensor_contents)
    assert "Random seed: 3" in str(first)


def test_history_is_freed_by_reference_counting(net: Net) -> None:
    gc.disable()
    try:
        history = lc.log_forward_pass(net, torch.randn(2, 4))
        ref = weakref.ref(history)
        tensor_ref = weakref.ref(history[1].tensor_contents)  # held by a layer, so freed with it
        del history
        assert ref() is None
        assert tensor_ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("collector", ["on", "off"])
def test_a_layer_that_outlives_its_history_keeps_its_lookup_keys(net: Net, collector: str) -> None:
    # The lookup table is built lazily; a layer taken by ordinal never made the history build it.
    expected = lc.get_model_metadata(net, torch.randn(2, 4))[1].lookup_keys
    if collector == "off":
        gc.disable()
    try:
        layer = lc.get_model_metadata(net, torch.randn(2, 4))[1]  # the history is gone at once
    finally:
        gc.enable()
    assert layer.lookup_keys == expected
    assert {1, "linear_1_1", "fc1"} <= set(expected)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was(net: Net, enabled: bool) -> None:
    # A capture pauses the collector while it records, and must hand it back as it found it.
    (gc.enable if enabled else gc.disable)()
    try:
        lc.get_model_metadata(net, torch.randn(2, 4))
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), lc.capture(net):
            net(torch.randn(2, 5))  # the model rejects the input
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_func_call_stack_points_at_the_calling_line() -> None:
    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x)  # the recorded call site

    history = lc.log_forward_pass(Functional(), torch.randn(2))
    frame = history["tanh_1_1"].func_call_stack[-1]
    assert frame.call_fname == __file__
    assert frame.function == "forward"
    assert "the recorded call site" in "".join(frame.code_context)


def test_reading_grad_or_data_is_not_an_operation(net: Net) -> None:
    net(torch.randn(2, 4)).sum().backward()
    with lc.capture(net) as cap:
        for param in net.parameters():  # what an optimizer's zero_grad does
            if param.grad is not None:
                param.grad.data.zero_()
        net(torch.randn(2, 4))
    types = {layer.layer_type for layer in cap.history}
    assert "grad" not in types
    assert "data" not in types
    assert "zero" in types  # the in-place zeroing itself is an op


def test_inference_mode(net: Net) -> None:
    x = torch.randn(3, 4)
    with torch.inference_mode():
        history = lc.log_forward_pass(net.eval(), x)
        expected = net(x)
    assert torch.equal(history[-1].tensor_contents, expected)
    assert (history["fc1"].tensor_contents < 0).any()  # copied before the in-place ReLU


def test_model_index_names_parameters_and_buffers_as_torch_does() -> None:
    from lens_core.capture.records import ModelIndex

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: torch names it once, where first met
            self.again = self.body  # a module registered twice keeps its first address

    model = Tied()
    index = ModelIndex.of(model)
    assert list(index.modules.values()) == [n for n, _ in model.named_modules()]  # same order too
    assert {i: p.name for i, p in index.params.items()} == {id(p): n for n, p in model.named_parameters()}
    assert index.buffers == {id(b): n for n, b in model.named_buffers()}
    assert index.module_types == {n: type(m).__name__ for n, m in model.named_modules() if n}


def test_an_output_that_feeds_the_loss_is_not_a_branch(net: Net) -> None:
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with lc.capture(net) as cap:
        F.cross_entropy(net(x), y)
    assert not cap.history.is_branching

    class Fork(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t.sin() + t.cos()

    assert lc.get_model_metadata(Fork(), torch.randn(3)).is_branching
