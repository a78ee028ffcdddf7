"""Gradients of every saved op, compared with torch.autograd.grad computed independently."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        left, right = self.b(h), self.c(h)
        return self.head(torch.relu(left) * right + h)


def _module_outputs_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: module outputs caught with ordinary hooks, then torch.autograd.grad."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, module in model.named_modules() if name
    ]
    try:
        loss = F.cross_entropy(model(x), y)
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(loss, list(outputs.values()))
    return dict(zip(outputs, grads, strict=True))


def test_gradients_equal_autograd_grad_of_the_same_loss() -> None:
    torch.manual_seed(0)
    model = Branchy()
    reference_model = copy.deepcopy(model)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    expected = _module_outputs_and_grads(reference_model, x, y)
    with lc.capture(model, gradients=True) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    history = cap.history
    for name, grad in expected.items():
        assert torch.equal(history[name].gradient, grad), name
    # every saved op on the path to the loss got one, with its output's shape and dtype
    for layer in history:
        if layer.tensor_contents is not None and layer.tensor_contents.requires_grad:
            assert layer.gradient is not None, layer.label
            assert layer.gradient.shape == layer.shape
            assert layer.gradient.dtype == layer.dtype


def test_parameter_grads_are_bitwise_those_of_a_plain_run() -> None:
    torch.manual_seed(0)
    model = Branchy()
    plain = copy.deepcopy(model)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    F.cross_entropy(plain(x), y).backward()
    with lc.capture(model, gradients=True):
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_backward_from_an_intermediate_layer() -> None:
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(2, 4)
    history = lc.log_forward_pass(model, x, save_gradients=True)
    history.backward("relu_1_5")
    relu_input = history["b"]
    expected = (relu_input.tensor_contents > 0).to(relu_input.dtype)
    assert torch.equal(relu_input.gradient, expected)
    assert history["c"].gradient is None  # not upstream of relu_1_5
    with pytest.raises(ValueError, match="was not saved"):
        lc.log_forward_pass(model, x, layers_to_save=["b"], save_gradients=True).backward("relu_1_5")


def test_backward_on_saved_tensor_contents_and_accumulation() -> None:
    torch.manual_seed(0)
    model = Branchy()
    history = lc.log_forward_pass(model, torch.randn(2, 4), save_gradients=True)
    out = history[-1].tensor_contents
    out.sum().backward(retain_graph=True)
    first = history["a"].gradient.clone()
    out.sum().backward()
    assert torch.equal(history["a"].gradient, 2 * first)
    assert history["a"].gradient_slot.count == 2


class InplaceAfterLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.relu_()
        return h * 3


def test_gradient_of_an_output_later_changed_in_place() -> None:
    torch.manual_seed(0)
    model = InplaceAfterLinear()
    history = lc.log_forward_pass(model, torch.randn(4, 3), save_gradients=True)
    history[-1].tensor_contents.sum().backward()
    pre = history["fc"].tensor_contents
    assert (pre < 0).any()
    assert torch.equal(history["fc"].gradient, 3 * (pre > 0).float())
    assert torch.equal(history["relu_1_2"].gradient, torch.full_like(pre, 3.0))


class SplitLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, 2, dim=1)
        out, (h, _) = self.lstm(first * second)
        return out.sum() + h.argmax().float()


def test_multi_output_ops_and_outputs_without_grad() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, requires_grad=True)
    history = lc.log_forward_pass(SplitLSTM(), x, save_gradients=True)
    history[-1].tensor_contents.backward()
    first, second = history["split_1_1"], history["split_2_2"]
    assert (first.output_index, second.output_index) == (0, 1)
    assert torch.equal(first.gradient, x.grad[:, :2])
    assert torch.equal(second.gradient, x.grad[:, 2:])
    assert torch.equal(history["input_1_0"].gradient, x.grad)
    argmax = next(layer for layer in history if layer.layer_type == "argmax")
    assert argmax.gradient is None


def test_recurrent_layer_gets_one_gradient_per_pass() -> None:
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(3):
                x = torch.tanh(self.fc(x))
            return x

    torch.manual_seed(0)
    model = Loop()
    history = lc.log_forward_pass(model, torch.randn(2, 3), save_gradients=True)
    passes = [history[f"linear_1_1:{n}"] for n in (1, 2, 3)]
    outputs = [layer.tensor_contents for layer in passes]
    # autograd.grad is a backward pass too: it fills the gradients as it runs
    expected = torch.autograd.grad(history[-1].tensor_contents.sum(), outputs)
    for layer, grad in zip(passes, expected, strict=True):
        assert torch.allclose(layer.gradient, grad)
    assert not torch.equal(passes[0].gradient, passes[2].gradient)


def test_autocast_bf16_records_the_real_dtypes() -> None:
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), lc.capture(model, gradients=True) as cap:
        out = model(x)
    out.float().sum().backward()
    history = cap.history
    assert history["a"].dtype == torch.bfloat16
    assert history["a"].tensor_contents.dtype == torch.bfloat16
    assert history["a"].gradient.dtype == torch.bfloat16
    assert history["input_1_0"].dtype == torch.float32


def test_grad_scaler_gradients_are_unscaled() -> None:
    torch.manual_seed(0)
    model = Branchy()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    with lc.capture(model, gradients=True) as plain:
        F.cross_entropy(model(x), y).backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with lc.capture(model, gradients=True, grad_scaler=scaler) as scaled:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert torch.allclose(scaled.history["b"].gradient, plain.history["b"].gradient)
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        lc.capture(model, grad_scaler=1024.0)


def test_history_with_gradients_is_freed_by_reference_counting() -> None:
    torch.manual_seed(0)
    model = Branchy()
    gc.disable()
    try:
        history = lc.log_forward_pass(model, torch.randn(2, 4), save_gradients=True)
        history[-1].tensor_contents.sum().backward()
        ref = weakref.ref(history)
        grad_ref = weakref.ref(history["a"].gradient)
        del history
        assert ref() is None
        assert grad_ref() is None
    finally:
        gc.enable()


def test_param_gradients_per_op_and_per_pass_add_up_to_grad() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.head = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(3):
                x = torch.tanh(self.fc(x))
            return self.head(x)

    torch.manual_seed(0)
    model = Shared()
    history = lc.log_forward_pass(model, torch.randn(4, 3), save_gradients=True, save_function_args=True)
    history[-1].tensor_contents.sum().backward()
    head = history.param_gradients("head")
    assert set(head) == {"head.weight", "head.bias"}
    assert torch.allclose(head["head.weight"], model.head.weight.grad)
    passes = [history.param_gradients(f"fc:{n}") for n in (1, 2, 3)]
    assert not torch.allclose(passes[0]["fc.weight"], passes[2]["fc.weight"])
    total = sum(p["fc.weight"] for p in passes)
    assert torch.allclose(total, model.fc.weight.grad, atol=1e-6)
    with pytest.raises(ValueError, match="save_function_args=True"):
        lc.log_forward_pass(model, torch.randn(4, 3), save_gradients=True).param_gradients("head")
