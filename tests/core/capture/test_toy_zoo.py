"""Every toy model of ``toy_models.py`` captured and checked against plain, uncaptured runs.

The reference values come from ordinary ``register_forward_hook`` hooks in a separate run of a
deep copy of the model, from the same seed, so they do not depend on lens_core at all.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

import lens_core
from lens_core import LayerNotFoundError, ModelHistory
from tests.core.capture.toy_models import (
    CASES,
    CASES_BY_NAME,
    PARAM_FREE_STEPS,
    RNN_STEPS,
    RaisesInForward,
    ToyCase,
    data_dependent_steps,
    randn,
)

SEED = 0


# -- helpers ------------------------------------------------------------------------------------


def _flatten(obj: Any) -> Iterator[Tensor]:
    """Tensors of a nested output (lists, tuples, dicts, dataclasses), in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif is_dataclass(obj) and not isinstance(obj, type):
        for field in fields(obj):
            yield from _flatten(getattr(obj, field.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flatten(item)


def _build(case: ToyCase) -> nn.Module:
    torch.manual_seed(SEED)
    return case.make_model()


def _log(model: nn.Module, case: ToyCase) -> tuple[ModelHistory, tuple[Any, ...], dict[str, Any]]:
    args, kwargs = case.make_inputs()
    torch.manual_seed(SEED)
    # lens_core warns when a saved tensor changed behind its back; no toy model should do that
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        history = lens_core.log_forward_pass(model, list(args), kwargs)
    return history, args, kwargs


def _assert_same(actual: Any, expected: Any, where: str = "output") -> None:
    """Bitwise equality of nested outputs (tensors with torch.equal, the rest with ==)."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{where}: values differ"
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{where}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys differ"
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        for field in fields(expected):
            _assert_same(getattr(actual, field.name), getattr(expected, field.name), f"{where}.{field.name}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@dataclass
class _HookedRun:
    """Module outputs of a plain run, seen by ordinary forward hooks."""

    module_outputs: dict[str, list[Tensor]]
    """``"address:call"`` -> the distinct tensors that call returned (parameters left out)."""
    calls: Counter[str]
    outputs: list[Tensor]
    """The model's output tensors, flattened, as they were when forward returned."""


def _hooked_run(model: nn.Module, case: ToyCase) -> _HookedRun:
    run = _HookedRun({}, Counter(), [])
    open_calls: dict[str, list[int]] = defaultdict(list)
    not_activations = {id(t) for t in (*model.parameters(), *model.buffers())}

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            run.calls[name] += 1
            open_calls[name].append(run.calls[name])

        return hook

    def leave(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:  # output is None if it raised
            distinct = {id(t): t.detach().clone() for t in _flatten(output) if id(t) not in not_activations}
            run.module_outputs[f"{name}:{open_calls[name].pop()}"] = list(distinct.values())

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name), always_call=True))
    try:
        args, kwargs = case.make_inputs()
        torch.manual_seed(SEED)
        output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    run.outputs = [t.detach().clone() for t in _flatten(output)]
    return run


@dataclass
class _RunState:
    """Everything a forward + backward leaves behind that a capture must not change."""

    output: Any
    inputs_after: Any
    rng: Tensor
    training: list[bool]
    state: dict[str, Tensor]
    grads: dict[str, Tensor | None]


def _state_after(model: nn.Module, output: Any, inputs: Any) -> _RunState:
    rng = torch.get_rng_state()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = [m.training for m in model.modules()]
    losses = [t.float().sum() for t in _flatten(output) if t.requires_grad]
    if losses:
        torch.stack(losses).sum().backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return _RunState(output, inputs, rng, training, state, grads)


def _assert_same_state(actual: _RunState, expected: _RunState, with_output: bool = True) -> None:
    """Compares two runs; ``with_output=False`` leaves out the output and its gradients."""
    if with_output:
        _assert_same(actual.output, expected.output)
    _assert_same(actual.inputs_after, expected.inputs_after, "inputs after the call")
    assert torch.equal(actual.rng, expected.rng), "the capture changed the global RNG state"
    assert actual.training == expected.training, "the capture changed a module's training flag"
    assert list(actual.state) == list(expected.state)
    for key, value in expected.state.items():
        assert torch.equal(actual.state[key], value), f"state_dict[{key!r}] differs after the call"
    if not with_output:
        return
    for name, grad in expected.grads.items():
        got = actual.grads[name]
        assert (got is None) == (grad is None), f"{name}.grad: {got} vs {grad}"
        assert grad is None or torch.equal(got, grad), f"{name}.grad differs"


def _assert_nothing_installed() -> None:
    assert torch._C._len_torch_function_stack() == 0, "a torch function mode is still pushed"
    assert not torch.overrides._get_current_function_mode_stack()
    assert not module_globals._global_forward_hooks, "a global forward hook is still registered"
    assert not module_globals._global_forward_pre_hooks, "a global forward pre-hook is still registered"


def _weak_saved_tensors(history: ModelHistory, alive: set[int]) -> list[weakref.ref[Tensor]]:
    """Weak references to the saved tensors that only the history should keep alive."""
    return [
        weakref.ref(layer.tensor_contents)
        for layer in history.layer_list
        if layer.tensor_contents is not None and id(layer.tensor_contents) not in alive
    ]


def _by_func(history: ModelHistory, func_name: str) -> list[lens_core.Layer]:
    return [layer for layer in history.layer_list if layer.func_name == func_name]


def _only_layer(history: ModelHistory, func_name: str) -> lens_core.Layer:
    layers = _by_func(history, func_name)
    assert len(layers) == 1, f"expected one {func_name} layer, got {[la.label for la in layers]}"
    return layers[0]


_ids = [case.name for case in CASES]


# -- every model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_saved_module_outputs_match_forward_hooks(case: ToyCase) -> None:
    model = _build(case)
    reference = _hooked_run(copy.deepcopy(model), case)
    history, _, _ = _log(model, case)

    assert history.module_calls == dict(reference.calls)
    tagged: dict[str, list[lens_core.Layer]] = defaultdict(list)
    for layer in history.layer_list:
        assert len(set(layer.output_of_modules)) == len(layer.output_of_modules), (
            f"{layer.label}: output_of_modules repeats a module call: {layer.output_of_modules}"
        )
        for tag in layer.output_of_modules:
            tagged[tag].append(layer)
    expected_tags = {tag for tag, outputs in reference.module_outputs.items() if outputs}
    assert set(tagged) == expected_tags, "the module calls with a recorded output differ from the hooks'"
    for tag, layers in tagged.items():
        unmatched = list(reference.module_outputs[tag])
        assert len(layers) == len(unmatched), f"{tag}: {len(layers)} layers for {len(unmatched)} outputs"
        for layer in layers:
            saved = layer.tensor_contents
            assert saved is not None, f"{layer.label} ({tag}) was not saved"
            match = next(
                (i for i, t in enumerate(unmatched) if t.dtype == saved.dtype and torch.equal(t, saved)),
                None,
            )
            assert match is not None, (
                f"{layer.label}: tensor_contents differs from the output of {tag} seen by a forward hook"
            )
            unmatched.pop(match)

    outputs = [layer for layer in history.layer_list if layer.is_output]
    assert len(outputs) == len(reference.outputs), "one output layer per tensor of the model output"
    for layer, expected in zip(outputs, reference.outputs, strict=True):
        assert layer.tensor_contents is not None
        _assert_same(layer.tensor_contents.detach(), expected, layer.label)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_capturing_changes_nothing(case: ToyCase) -> None:
    model = _build(case)
    captured_model = copy.deepcopy(model)
    logged_model = copy.deepcopy(model)

    args, kwargs = case.make_inputs()
    torch.manual_seed(SEED)
    output = model(*args, **kwargs)
    plain = _state_after(model, output, (args, kwargs))

    args, kwargs = case.make_inputs()
    torch.manual_seed(SEED)
    with lens_core.capture(captured_model):
        output = captured_model(*args, **kwargs)
    _assert_same_state(_state_after(captured_model, output, (args, kwargs)), plain)

    history, args, kwargs = _log(logged_model, case)
    assert history.layer_list
    # log_forward_pass returns no output to compare or backpropagate; the hooks test checks it
    _assert_same_state(_state_after(logged_model, None, (args, kwargs)), plain, with_output=False)


def _check_indexing(history: ModelHistory) -> None:
    """Labels are unique and every key a layer lists finds that layer."""
    layers = history.layer_list
    count = len(layers)
    labels = [layer.label for layer in layers]
    assert len(set(labels)) == count, f"labels repeat: {[k for k, n in Counter(labels).items() if n > 1]}"
    assert history.all_layer_labels == labels
    assert history.layer_labels == labels
    assert len(history) == count
    for i, layer in enumerate(layers):
        assert layer.index == i
        assert history[i] is layer
        assert history[i - count] is layer
        assert history[layer.label] is layer
        assert {i, i - count, layer.label} <= set(layer.lookup_keys)
        for key in layer.lookup_keys:
            assert history[key] is layer, f"history[{key!r}] is not {layer.label}"


def _check_graph(history: ModelHistory) -> None:
    """Parents run first, parents and children agree, inputs start and outputs end the graph."""
    layers = history.layer_list
    position = {layer.label: i for i, layer in enumerate(layers)}
    for i, layer in enumerate(layers):
        assert len(set(layer.parents)) == len(layer.parents), f"{layer.label}: repeated parents"
        assert len(set(layer.children)) == len(layer.children), f"{layer.label}: repeated children"
        for parent in layer.parents:
            assert position[parent] < i, f"{layer.label}: parent {parent} does not run before it"
            assert layer.label in history[parent].children
        for child in layer.children:
            assert position[child] > i, f"{layer.label}: child {child} does not run after it"
            assert layer.label in history[child].parents
        if layer.is_input:
            assert not layer.parents
        if layer.is_output:
            assert len(layer.parents) == 1, f"{layer.label}: an output has one parent"
            assert not layer.children, f"{layer.label}: an output feeds nothing"
    num_outputs = sum(layer.is_output for layer in layers)
    assert all(layer.is_output for layer in layers[len(layers) - num_outputs :]), "outputs come last"


def _check_layer_fields(history: ModelHistory) -> None:
    """Saved tensors match the recorded shape and dtype; module tags name real module calls."""
    for layer in history.layer_list:
        saved = layer.tensor_contents
        assert saved is not None, f"{layer.label} not saved with layers='all'"
        assert tuple(saved.shape) == layer.shape
        assert saved.dtype == layer.dtype
        for tag in (*layer.output_of_modules, *layer.module_stack):
            address, _, call = tag.rpartition(":")
            assert address in history.module_addresses, f"{layer.label}: unknown module {tag}"
            assert 1 <= int(call) <= history.module_calls[address], f"{layer.label}: no call {tag}"


def _check_labels(history: ModelHistory) -> None:
    """Passes count from 1; layers and types are numbered in order of first appearance."""
    passes: dict[str, list[lens_core.Layer]] = defaultdict(list)
    for layer in history.layer_list:
        assert layer.layer_label == f"{layer.layer_type}_{layer.type_index}_{layer.layer_index}"
        passes[layer.layer_label].append(layer)
    for layer_label, group in passes.items():
        assert [la.pass_num for la in group] == list(range(1, len(group) + 1)), layer_label
        for layer in group:
            assert layer.num_passes == len(group)
            assert layer.label == (layer_label if len(group) == 1 else f"{layer_label}:{layer.pass_num}")
    first_passes = [group[0] for group in passes.values()]
    assert [layer.layer_index for layer in first_passes] == list(range(len(first_passes)))
    type_indices: dict[str, list[int]] = defaultdict(list)
    for layer in first_passes:
        type_indices[layer.layer_type].append(layer.type_index)
    for layer_type, indices in type_indices.items():
        assert indices == list(range(1, len(indices) + 1)), layer_type


@pytest.mark.parametrize("api", ["log_forward_pass", "capture"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_history_structure(case: ToyCase, api: str) -> None:
    model = _build(case)
    if api == "log_forward_pass":
        history, args, kwargs = _log(model, case)
        num_inputs = len(list(_flatten((args, kwargs))))
        assert len(history.input_layers) == num_inputs, "one input layer per input tensor"
    else:
        args, kwargs = case.make_inputs()
        with lens_core.capture(model) as cap:
            model(*args, **kwargs)
        history = cap.history
    _check_indexing(history)
    _check_graph(history)
    _check_layer_fields(history)
    _check_labels(history)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_nothing_leaks(case: ToyCase) -> None:
    model = _build(case)
    alive = {id(t) for t in (*model.parameters(), *model.buffers())}
    gc.disable()
    try:
        history, args, kwargs = _log(model, case)
        _assert_nothing_installed()
        history_ref = weakref.ref(history)
        tensor_refs = _weak_saved_tensors(history, alive | {id(t) for t in _flatten((args, kwargs))})
        del history
        assert history_ref() is None, "the history outlived its last reference (a reference cycle?)"
        assert all(ref() is None for ref in tensor_refs), "saved tensors outlived the history"

        with lens_core.capture(model) as cap:
            output = model(*args, **kwargs)
        _assert_nothing_installed()
        history_ref = weakref.ref(cap.history)
        del cap, output
        assert history_ref() is None, "the capture's history outlived the capture"
    finally:
        gc.enable()


# -- clean-up after a failing forward ----------------------------------------------------------


def test_failed_forward_leaves_nothing_installed() -> None:
    model = RaisesInForward()
    with pytest.raises(ValueError, match="toy failure"):
        lens_core.log_forward_pass(model, randn(2, 4))
    _assert_nothing_installed()
    with pytest.raises(ValueError, match="toy failure"), lens_core.capture(model):
        model(randn(2, 4))
    _assert_nothing_installed()
    history = lens_core.log_forward_pass(CASES_BY_NAME["sequential_mlp"].make_model(), randn(2, 4))
    assert history.layer_list, "a new capture works after a failed one"


# -- exact expectations for particular models ------------------------------------------------------


def _logged(name: str) -> tuple[nn.Module, ModelHistory, tuple[Any, ...]]:
    case = CASES_BY_NAME[name]
    model = _build(case)
    history, args, _ = _log(model, case)
    return model, history, args


def test_param_free_loop_is_one_layer_with_a_pass_per_iteration() -> None:
    _, history, (x,) = _logged("param_free_loop")
    muls = _by_func(history, "mul")
    assert len(muls) == PARAM_FREE_STEPS
    assert {layer.layer_label for layer in muls} == {muls[0].layer_label}
    assert [layer.pass_num for layer in muls] == list(range(1, PARAM_FREE_STEPS + 1))
    assert all(layer.num_passes == PARAM_FREE_STEPS for layer in muls)
    assert [layer.label for layer in muls] == [f"{muls[0].layer_label}:{n}" for n in range(1, 5)]
    for n, layer in enumerate(muls, start=1):
        assert torch.equal(layer.tensor_contents, x * 2**n)
    assert history.is_recurrent


def test_nested_param_free_loops_count_every_inner_iteration() -> None:
    _, history, _ = _logged("nested_param_free_loops")
    adds = _by_func(history, "add")
    assert len(adds) == 6
    assert {layer.num_passes for layer in adds} == {6}
    assert {layer.num_passes for layer in _by_func(history, "sin")} == {2}


def test_data_dependent_loop_counts_the_iterations_that_ran() -> None:
    _, history, (x,) = _logged("data_dependent_while")
    steps = data_dependent_steps(x)
    assert steps > 1
    muls = _by_func(history, "mul")
    assert len(muls) == steps
    assert {layer.num_passes for layer in muls} == {steps}


def test_rnn_cell_is_one_layer_with_a_pass_per_step() -> None:
    model, history, (x,) = _logged("rnn_cell_loop")
    cells = [layer for layer in history.layer_list if layer.layer_type == "linear"]
    assert len(cells) == RNN_STEPS
    assert {layer.layer_label for layer in cells} == {cells[0].layer_label}
    assert history.module_calls == {"cell": RNN_STEPS}
    h = torch.zeros(2, 5)
    for step in range(1, RNN_STEPS + 1):
        layer = history[f"cell:{step}"]
        assert layer is cells[step - 1]
        assert layer.pass_num == step
        assert layer.num_passes == RNN_STEPS
        assert [p.name for p in layer.params] == ["cell.weight", "cell.bias"]
        pre = model.cell(torch.cat([x[:, step - 1], h], dim=1))
        assert torch.equal(layer.tensor_contents, pre)
        h = torch.tanh(pre)
    with pytest.raises(LayerNotFoundError, match="ambiguous"):
        history["cell"]


def test_module_called_twice_has_one_key_per_call() -> None:
    model, history, (x,) = _logged("module_called_twice")
    first, second = history["fc:1"], history["fc:2"]
    assert first is not second
    assert (first.layer_type, second.layer_type) == ("linear", "linear")
    assert (first.pass_num, second.pass_num) == (1, 2)
    assert first.layer_label == second.layer_label
    assert second.parents == (first.label,)
    assert history.module_calls == {"fc": 2}
    assert torch.equal(first.tensor_contents, model.fc(x))
    assert torch.equal(second.tensor_contents, model.fc(model.fc(x)))
    assert second.module_stack == ("fc:2",)


def test_param_free_module_called_at_two_places() -> None:
    _, history, _ = _logged("param_free_module_reused")
    assert history.module_calls == {"fc1": 1, "fc2": 1, "act": 2}
    assert history["act:1"].func_name == history["act:2"].func_name == "relu"
    assert history["act:2"].parents == (history["fc2"].label,)


def test_shared_submodule_is_one_module_called_twice() -> None:
    _, history, _ = _logged("shared_submodule")
    assert history.module_calls == {"a": 2}
    assert history["a:2"].parents == (history["a:1"].label,)


def test_nested_modules_stack_and_addresses() -> None:
    model, history, (x,) = _logged("nested_modules")
    fc = history["outer.mid.inner.fc"]
    assert fc.module_stack == ("outer:1", "outer.mid:1", "outer.mid.inner:1", "outer.mid.inner.fc:1")
    assert fc.module == "outer.mid.inner.fc"
    assert fc.output_of_modules == (
        "outer.mid.inner.fc:1", "outer.mid.inner:1", "outer.mid:1", "outer:1",
    )
    for address in ("outer", "outer.mid", "outer.mid.inner"):
        assert history[address] is fc
    relu = _only_layer(history, "relu")
    assert relu.module_stack == ("outer:1", "outer.mid:1")
    assert torch.equal(fc.tensor_contents, model.outer(x))
    assert history["head"].module_stack == ("head:1",)


def test_tree_nests_three_levels() -> None:
    _, history, _ = _logged("tree")
    deepest = history["child.child.fc"]
    assert deepest.module_stack == ("child:1", "child.child:1", "child.child.fc:1")
    assert history.module_calls == {
        "fc": 1, "child": 1, "child.fc": 1, "child.child": 1, "child.child.fc": 1
    }


def test_inplace_relu_method_keeps_the_negative_linear_output() -> None:
    model, history, (x,) = _logged("inplace_relu_method")
    expected = F.linear(x, model.lin.weight, model.lin.bias)
    assert (expected < 0).any(), "the toy input must give negative pre-activations"
    lin = history["lin"]
    assert lin.layer_type == "linear"
    assert torch.equal(lin.tensor_contents, expected), "the linear output was saved after relu_"
    relu = _only_layer(history, "relu_")
    assert relu.is_inplace
    assert relu.parents == (lin.label,)
    assert torch.equal(relu.tensor_contents, expected.clamp(min=0))


def test_inplace_relu_module_keeps_the_linear_output() -> None:
    model, history, (x,) = _logged("inplace_relu_module")
    expected = F.linear(x, model.fc.weight, model.fc.bias)
    assert (expected < 0).any()
    assert torch.equal(history["fc"].tensor_contents, expected)
    act = history["act"]
    assert act.is_inplace
    assert torch.equal(act.tensor_contents, expected.relu())


def test_inplace_iadd_keeps_the_value_before_the_add() -> None:
    model, history, (x,) = _logged("inplace_iadd")
    expected = F.linear(x, model.lin.weight, model.lin.bias)
    assert torch.equal(history["lin"].tensor_contents, expected)
    iadd = _only_layer(history, "add_")  # torch hands ``y += 1`` to the mode as add_
    assert iadd.is_inplace
    assert iadd.parents == (history["lin"].label,)
    assert torch.equal(iadd.tensor_contents, expected + 1)


def test_inplace_method_chain_keeps_every_step() -> None:
    model, history, (x,) = _logged("inplace_add_method")
    expected = F.linear(x, model.lin.weight, model.lin.bias)
    assert torch.equal(history["lin"].tensor_contents, expected)
    add = _only_layer(history, "add_")
    mul = _only_layer(history, "mul_")
    assert add.is_inplace
    assert mul.is_inplace
    assert torch.equal(add.tensor_contents, expected + x)
    assert torch.equal(mul.tensor_contents, (expected + x) * 2)
    assert mul.parents == (add.label,)


def test_inplace_setitem_keeps_the_value_before_the_write() -> None:
    model, history, (x,) = _logged("inplace_setitem")
    expected = F.linear(x, model.lin.weight, model.lin.bias)
    assert (expected[:, 0] != 0).all()
    assert torch.equal(history["lin"].tensor_contents, expected)
    setitem = _only_layer(history, "__setitem__")
    assert setitem.is_inplace
    after = expected.clone()
    after[:, 0] = 0
    assert torch.equal(setitem.tensor_contents, after)


def test_inplace_on_a_view_keeps_the_base_before_the_write() -> None:
    model, history, (x,) = _logged("inplace_on_view")
    expected = F.linear(x, model.scale.lin.weight, model.scale.lin.bias)
    lin = history["scale.lin"]
    assert torch.equal(lin.tensor_contents, expected), "the base was saved after the write into its view"
    mul = _only_layer(history, "mul_")
    assert mul.is_inplace
    assert torch.equal(mul.tensor_contents, expected[0] * 2)


def test_inplace_on_input_keeps_the_input_as_passed() -> None:
    _, history, (x,) = _logged("inplace_on_input")
    original = CASES_BY_NAME["inplace_on_input"].make_inputs()[0][0]
    assert torch.equal(x, original * 2), "the toy model doubles its input in place"
    assert torch.equal(history[0].tensor_contents, original)


def test_split_gives_one_layer_per_piece() -> None:
    model, history, (x,) = _logged("split_outputs")
    pieces = _by_func(history, "split")
    assert len(pieces) == 3
    assert [p.output_index for p in pieces] == [0, 1, 2]
    assert len({p.label for p in pieces}) == 3
    fc = history["fc"]
    for piece, expected in zip(pieces, torch.split(model.fc(x), 2, dim=1), strict=True):
        assert piece.parents == (fc.label,)
        assert piece.shape == (2, 2)
        assert torch.equal(piece.tensor_contents, expected)
    assert sorted(fc.children) == sorted(p.label for p in pieces)


def test_max_with_indices_gives_a_float_and_an_int_layer() -> None:
    _, history, (x,) = _logged("max_with_indices")
    values, indices = _by_func(history, "max")
    assert (values.dtype, indices.dtype) == (torch.float32, torch.int64)
    assert torch.equal(values.tensor_contents, x.max(dim=1).values)
    assert torch.equal(indices.tensor_contents, x.max(dim=1).indices)


def test_returns_input_is_an_input_and_an_output() -> None:
    _, history, (x,) = _logged("returns_input")
    assert [layer.layer_type for layer in history.layer_list] == ["input", "output"]
    inp, out = history.layer_list
    assert out.parents == (inp.label,)
    assert torch.equal(out.tensor_contents, x)


def test_identity_module_output_is_the_input_layer() -> None:
    _, history, (x,) = _logged("identity_module")
    inp = history[0]
    assert inp.is_input
    assert inp.output_of_modules == ("ident:1",)
    assert history["ident"] is inp
    assert torch.equal(inp.tensor_contents, x)
    assert history["fc"].parents == (inp.label,)


def test_tensors_created_in_forward_are_not_inputs() -> None:
    _, history, _ = _logged("created_tensors")
    assert len(history.input_layers) == 1
    for func_name in ("zeros", "arange", "full", "eye"):
        layer = _only_layer(history, func_name)
        assert not layer.parents
        assert not layer.is_input
    assert torch.equal(_only_layer(history, "arange").tensor_contents, torch.arange(4))
    assert _only_layer(history, "ones_like").parents == (history[0].label,)


def test_weight_tying_names_one_parameter() -> None:
    model, history, _ = _logged("weight_tying")
    emb = _only_layer(history, "embedding")
    head = history["head"]
    assert [p.name for p in emb.params] == [p.name for p in head.params] == ["emb.weight"]
    assert history.total_params == model.emb.weight.numel()


def test_parameter_used_directly_is_named() -> None:
    _, history, _ = _logged("param_direct")
    matmul = _only_layer(history, "matmul")
    assert [(p.name, p.shape) for p in matmul.params] == [("W", (4, 3))]
    add = _only_layer(history, "add")
    assert [p.name for p in add.params] == ["b"]


def test_buffers_are_named_on_the_ops_that_use_them() -> None:
    _, history, _ = _logged("buffer_used")
    assert _only_layer(history, "sub").buffers == ("mean",)
    assert _only_layer(history, "mul").buffers == ("scale",)


def test_conditional_records_the_branch_that_ran() -> None:
    _, taken, _ = _logged("conditional_true")
    _, not_taken, _ = _logged("conditional_false")
    assert taken.module_calls == {"pos": 1}
    assert not_taken.module_calls == {"neg": 1}


def test_dropout_train_saves_the_dropped_values() -> None:
    model, history, (x,) = _logged("dropout_train")
    dropped = history["drop"].tensor_contents
    assert (dropped == 0).any()
    fc = model.fc(x)
    kept = dropped != 0
    assert torch.equal(dropped[kept], fc[kept] * 2)


def test_lstm_outputs_are_three_layers_of_one_call() -> None:
    _, history, _ = _logged("lstm")
    lstm_outputs = [layer for layer in history.layer_list if "lstm:1" in layer.output_of_modules]
    assert sorted(layer.shape for layer in lstm_outputs) == [(1, 2, 5), (1, 2, 5), (2, 3, 5)]


def test_caught_exception_in_a_submodule_unwinds_its_module_stack() -> None:
    _, history, _ = _logged("exception_caught_inside")
    assert history.module_calls == {"fails": 1, "fc": 1}
    assert _only_layer(history, "exp").module_stack == ("fails:1",)
    assert _only_layer(history, "mul").module_stack == ()
    assert history["fc"].module_stack == ("fc:1",)


def test_recursive_submodule_nests_its_calls() -> None:
    _, history, _ = _logged("recursive_submodule")
    assert history.module_calls == {"rec": 3, "rec.fc": 3}
    deepest = history["rec.fc:3"]
    assert deepest.module_stack == ("rec:1", "rec:2", "rec:3", "rec.fc:3")
    assert deepest.output_of_modules == ("rec.fc:3",)
    tanh = history["rec:3"]
    assert tanh.func_name == "tanh"
    assert tanh.output_of_modules == ("rec:3", "rec:2", "rec:1",)


def test_out_kwarg_is_an_inplace_write() -> None:
    _, history, (x,) = _logged("out_kwarg")
    mul = _only_layer(history, "mul")
    assert mul.is_inplace
    assert torch.equal(mul.tensor_contents, x * 2)
    assert _only_layer(history, "empty").label in mul.parents


def test_parametrized_weight_is_computed_by_a_layer() -> None:
    model, history, _ = _logged("weight_norm_parametrization")
    linear = _only_layer(history, "linear")
    assert [p.name for p in linear.params] == ["bias"]
    weight = history["parametrizations.weight.0"]
    assert weight.label in linear.parents
    assert torch.equal(weight.tensor_contents, model.weight)
