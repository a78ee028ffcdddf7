"""on_anomaly: a NaN loss is traced to its op, in a plain loop and in Lightning, without side effects."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lens_core as lc
from lens_callbacks import DiskWriter, Lens, LensCallback
from tests.callbacks.lightning_helpers import LitCNN, trainer
from tests.callbacks.test_lens import nothing_installed


class Fragile(nn.Module):
    """Finite until a batch sums below -10; dropout and BatchNorm make the RNG and buffers matter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.log(x.sum(1, keepdim=True) + 10)  # NaN when a row sums below -10
        return self.drop(self.bn(self.fc(x))) + shift


def data(steps: int = 4, bad_step: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for step in range(steps):
        x = torch.rand(6, 4, generator=generator)
        if step == bad_step:
            x[0] = -5.0
        batches.append((x, torch.randint(0, 3, (6,), generator=generator)))
    return batches


def run(model: nn.Module, lens: Lens | None) -> list[Any]:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reports = []
    for step, (x, y) in enumerate(data()):
        if lens is None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            with lens.step(step):
                loss = F.cross_entropy(model(x), y)
                reports.append(lens.check(loss, lambda x=x, y=y: F.cross_entropy(model(x), y)))
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return reports


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_plain_loop_reports_the_op_and_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Fragile()
    twin = copy.deepcopy(model)
    lens = Lens(twin, every_n_steps=1, on_anomaly="continue", writers=[DiskWriter(tmp_path)])
    run(model, None)
    with pytest.warns(RuntimeWarning, match=r"step 2: log_1_\d+ \(log\) gave"):
        reports = run(twin, lens)
    # "continue": the NaN gradients of step 2 poison the weights, so step 3 fails too
    assert [r is not None for r in reports] == [False, False, True, True]
    report = reports[2]
    assert report.step == 2
    assert report.func_name == "log"
    assert "NaN when a row sums below -10" in report.code
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert same(a, b), name
    saved = json.loads((tmp_path / "step_000002" / "anomaly.json").read_text())
    assert saved["label"] == report.label
    assert nothing_installed()


def test_raise_stops_with_the_report() -> None:
    model = Fragile()
    lens = Lens(model, steps=[], on_anomaly="raise", writers=[])
    with pytest.raises(lc.AnomalyError, match="log") as caught, pytest.warns(RuntimeWarning):
        run(model, lens)
    assert caught.value.report is not None
    assert caught.value.report.step == 2
    assert nothing_installed()


def test_bad_on_anomaly_value() -> None:
    with pytest.raises(ValueError, match="on_anomaly='stop'"):
        Lens(Fragile(), on_anomaly="stop")  # type: ignore[arg-type]


class LitFragile(LitCNN):
    def __init__(self) -> None:
        super().__init__()
        self.net = Fragile()  # type: ignore[assignment]


def loader() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    batches = data()
    return DataLoader(TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])),
                      batch_size=6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_skip_leaves_the_parameters_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LitFragile()
    before: dict[str, torch.Tensor] = {}

    class Snapshot(LensCallback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 2:
                before.update({k: v.clone() for k, v in pl_module.named_parameters()})
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
            if trainer.global_step == 3:  # the NaN step was skipped
                for name, param in pl_module.named_parameters():
                    assert torch.equal(param, before[name]), name

    callback = Snapshot(steps=[2], on_anomaly="skip", log_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="log"):
        trainer(tmp_path, [callback], max_steps=4).fit(model, loader())
    assert (tmp_path / "lens" / "step_000002" / "anomaly.json").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_raise(tmp_path: Path) -> None:
    with pytest.raises(lc.AnomalyError), pytest.warns(RuntimeWarning):
        trainer(tmp_path, [LensCallback(steps=[], on_anomaly="raise")]).fit(LitFragile(), loader())
    assert nothing_installed()


def test_plain_loop_gradient_check() -> None:
    from tests.core.checks.test_forensics import NormOfZeroRow

    torch.manual_seed(0)
    model = NormOfZeroRow()
    lens = Lens(model, steps=[], on_anomaly="skip", check_gradients=True, writers=[])
    reports = []
    for step in range(3):
        x = torch.randn(4, 4)
        if step == 1:
            x[2] = 0.0
        with lens.step(step):
            loss = model(x)
            assert lens.check(loss, replay=lambda x=x: model(x)) is None  # the loss is finite
            loss.backward()
            with pytest.warns(RuntimeWarning, match="backward of sqrt") if step == 1 else nullcontext():
                reports.append(lens.check_gradients(replay=lambda x=x: model(x)))
        model.zero_grad()
    assert [r is not None for r in reports] == [False, True, False]
    with pytest.raises(ValueError, match="check_gradients=True"):
        Lens(model, check_gradients=True)
    with pytest.raises(ValueError, match="check_gradients=True needs on_anomaly"):
        LensCallback(check_gradients=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_gradient_check_skips_the_step(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from tests.core.checks.test_forensics import NormOfZeroRow

    class LitNorm(LitCNN):
        def __init__(self) -> None:
            super().__init__()
            self.net = NormOfZeroRow()  # type: ignore[assignment]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0])

    torch.manual_seed(0)
    x = torch.randn(16, 4)
    x[9] = 0.0  # in the third batch of 4
    model = LitNorm()
    callback = LensCallback(steps=[], on_anomaly="skip", check_gradients=True, log_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="backward of sqrt"):
        trainer(tmp_path, [callback], max_steps=4).fit(model, DataLoader(TensorDataset(x), batch_size=4))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the broken step was skipped
    assert (tmp_path / "lens" / "step_000002" / "anomaly.json").exists()
