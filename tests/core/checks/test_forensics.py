"""Anomaly forensics: models built to blow up at known places, and replays that change nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc


class ZeroVariance(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return (h - h.mean(0)) / h.std(0)  # BLOWS UP: zero variance


class LogOfNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.log(self.fc(x)))  # BLOWS UP: log of negatives


def line_of(marker: str) -> int:
    with open(__file__) as source:
        return next(n for n, line in enumerate(source, 1) if marker in line and "def line_of" not in line)


def test_division_by_a_zero_variance_tensor() -> None:
    torch.manual_seed(0)
    model = ZeroVariance()
    x = torch.ones(5, 4)  # identical rows: every column of h has zero variance
    report = lc.investigate(model, lambda: model(x).sum())
    assert report is not None
    assert report.func_name == "div"  # a / b reaches torch as Tensor.div
    assert report.label.startswith("div_")
    assert (report.file, report.line) == (__file__, line_of("BLOWS UP: zero variance"))
    assert report.nan_count + report.inf_count == 15  # 0/0 or residual/0: nothing finite
    assert [stats.name.split("_")[0] for stats in report.inputs] == ["sub", "std"]
    assert report.inputs[1].max == 0.0
    assert "BLOWS UP: zero variance" in report.code
    assert f"at {__file__}:{report.line}" in report.headline


def test_log_of_a_negative_names_the_op_its_input_and_parameters() -> None:
    torch.manual_seed(0)
    model = LogOfNegative()
    report = lc.investigate(model, lambda: model(torch.randn(8, 4)).sum())
    assert report is not None
    assert (report.func_name, report.line) == ("log", line_of("BLOWS UP: log of negatives"))
    assert report.module is None
    assert report.inputs[0].name == "linear_1_1"
    assert report.inputs[0].min < 0
    assert "log_1_2 (log) gave" in report.headline
    assert "from linear_1_1" in report.headline


def test_exploding_learning_rate_is_traced_to_the_first_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e38)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.isfinite(loss)
    # the oracle: the first module, in execution order, whose output is not finite
    bad: list[str] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: bad.append(name) if not torch.isfinite(out).all() else None
        )
        for name, module in model.named_children()
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    report = lc.investigate(model, lambda: F.cross_entropy(model(x), y))
    assert report is not None
    assert report.module == bad[0]
    assert report.func_name == "linear"
    assert {p.name for p in report.params} == {f"{bad[0]}.weight", f"{bad[0]}.bias"}
    assert all(stats.nan_count + stats.inf_count == 0 for stats in report.inputs)


def test_finite_steps_have_nothing_to_report() -> None:
    model = nn.Linear(3, 3)
    assert lc.investigate(model, lambda: model(torch.randn(2, 3)).sum()) is None


def test_the_replay_changes_nothing_and_reproduces_random_ops() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(self.drop(self.bn(x)))

    torch.manual_seed(0)
    model = Noisy()
    x = torch.randn(8, 4)
    start = lc.get_rng_states()
    first = model(x)  # the failed step, as it ran
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng_after = torch.get_rng_state()
    report = lc.investigate(model, lambda: model(x), rng_states=start)
    assert report is not None
    assert torch.equal(torch.get_rng_state(), rng_after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    # same dropout mask: the replayed log saw exactly the NaNs the real step produced
    assert report.nan_count == int(first.isnan().sum())


class NormOfZeroRow(nn.Module):
    """Finite forward, finite loss; the backward of sqrt at 0 is infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = self.fc(x).pow(2).sum(1)
        return torch.sqrt(squares).sum()  # BACKWARD BLOWS UP: sqrt at 0


def test_the_op_whose_backward_broke_the_gradients() -> None:
    torch.manual_seed(0)
    model = NormOfZeroRow()
    x = torch.randn(4, 4)
    x[1] = 0.0  # a row of zeros: its norm is 0
    loss = model(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(model.fc.weight.grad).all()
    grad_before = model.fc.weight.grad.clone()
    assert lc.investigate(model, lambda: model(x)) is None  # nothing non-finite going forward
    report = lc.investigate(model, lambda: model(x), gradients=True)
    assert report is not None
    assert report.func_name == "sqrt"
    assert report.gradient_of is not None
    assert report.gradient_of.startswith("sum_")
    assert report.line == line_of("BACKWARD BLOWS UP")
    assert report.inf_count == 1
    assert "the backward of sqrt_1_" in report.headline
    assert str(report).startswith("Non-finite gradients first appeared")
    assert torch.equal(model.fc.weight.grad.nan_to_num(), grad_before.nan_to_num())  # .grad untouched
