"""Parameter gradients as the update used them: after clipping, at each optimizer's own step.

The oracles are the test's own: step post-hooks it registers on the optimizers (the ``.grad``
an update read), SGD's parameter change divided by the learning rate, and the norm
``clip_grad_norm_`` returns. A GAN (two optimizers, manual optimization in Lightning) checks
that every phase is recorded and each optimizer's gradients are those it used.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lens_callbacks import CaptureRecord, Lens, LensCallback
from lens_core import TensorSummary
from tests.callbacks.helpers import SmallCNN, batches
from tests.callbacks.lightning_helpers import LitCNN, loader, trainer
from tests.callbacks.test_lens import nothing_installed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints on tiny runs


@dataclass
class Records:
    """Keeps every record whole (its histories too)."""

    records: dict[int, CaptureRecord] = field(default_factory=dict)

    def write(self, record: CaptureRecord) -> None:
        self.records[record.step] = record

    def close(self) -> None:
        pass


@dataclass
class UpdateOracle:
    """The ``.grad`` each update read, per parameter name, by step post-hooks of the test's own
    (the last update of a parameter wins); ``steps`` counts the updates."""

    names: dict[int, str]
    used: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def on(cls, model: nn.Module, *optimizers: torch.optim.Optimizer) -> UpdateOracle:
        oracle = cls({id(p): name for name, p in model.named_parameters()})
        for optimizer in optimizers:
            oracle.handles.append(optimizer.register_step_post_hook(oracle._read))
        return oracle

    def _read(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        with torch._C.DisableTorchFunction():  # the oracle's copies are not the model's ops
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.used[self.names[id(p)]] = p.grad.detach().clone()

    def total_norm(self) -> float:
        return math.sqrt(sum(float(g.double().square().sum()) for g in self.used.values()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def assert_summaries_match(recorded: dict[str, TensorSummary], used: dict[str, torch.Tensor]) -> None:
    """Recorded summaries against the gradients the updates used, computed here with torch."""
    assert recorded, "no parameter gradient recorded"
    for name, summary in recorded.items():
        grad = used[name].double()
        assert summary.l2_norm == pytest.approx(float(grad.norm()), rel=1e-5), name
        assert summary.mean == pytest.approx(float(grad.mean()), rel=1e-5, abs=1e-9), name
        assert summary.max == pytest.approx(float(grad.max()), rel=1e-5, abs=1e-9), name


def no_optimizer_hooks(*optimizers: torch.optim.Optimizer) -> bool:
    return not any(o._optimizer_step_pre_hooks or o._optimizer_step_post_hooks for o in optimizers)


# -- clipping, plain loop ------------------------------------------------------------------------

MAX_NORM = 0.05  # small enough that every step is clipped


def _clipped_loop(model: SmallCNN, lens: Lens | None, oracle_steps: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches(3)):
        oracle = UpdateOracle.on(model, optimizer)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        context = lens.step(step) if lens is not None else torch.enable_grad()
        with context:
            F.cross_entropy(model(x), y).backward()
            total = float(nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
            optimizer.step()
        optimizer.zero_grad()
        oracle.remove()
        oracle_steps.append({
            "used": oracle.used, "total": total, "after": oracle.total_norm(),
            "sgd": {name: (before[name] - p.detach()) / 0.1 for name, p in model.named_parameters()},
        })
    assert no_optimizer_hooks(optimizer)


def test_plain_loop_records_the_clipped_gradients_the_update_used() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    twin = copy.deepcopy(model)
    writer = Records()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    expected: list[dict[str, Any]] = []
    _clipped_loop(model, lens, expected)
    lens.close()
    _clipped_loop(twin, None, [])
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)  # training is bitwise unchanged
    assert nothing_installed(model)
    assert sorted(writer.records) == [0, 1, 2]
    for step, record in writer.records.items():
        oracle = expected[step]
        assert_summaries_match(record.parameter_gradients, oracle["used"])
        for name, summary in record.parameter_gradients.items():  # SGD's update: lr * grad
            assert summary.l2_norm == pytest.approx(float(oracle["sgd"][name].norm()), rel=1e-3)
        assert record.grad_norm_before_clip == pytest.approx(oracle["total"], rel=1e-6)
        assert oracle["total"] > MAX_NORM  # clipped
        assert record.grad_norm == pytest.approx(oracle["after"], rel=1e-6)
        assert record.grad_norm == pytest.approx(MAX_NORM, rel=1e-4)
        assert record.clip_coefficient == pytest.approx(MAX_NORM / (oracle["total"] + 1e-6), rel=1e-5)


def test_a_block_without_optimizer_step_records_the_gradients_it_ends_with() -> None:
    # the loop steps the optimizer after the block: the record has .grad as the block left it
    model = SmallCNN()
    writer = Records()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    ((x, y),) = batches(1)
    with lens.step(0):
        F.cross_entropy(model(x), y).backward()
    record = writer.records[0]
    used = {p.name for layer in record.history for p in layer.params}
    expected = {name: p.grad for name, p in model.named_parameters() if name in used}
    assert set(record.parameter_gradients) == set(expected)
    for name, grad in expected.items():
        summary = record.parameter_gradients[name]
        assert summary.l2_norm == pytest.approx(grad.double().norm().item(), rel=1e-6)
    assert record.grad_norm is None  # no update was seen: no norm of one
    assert nothing_installed(model)


def test_an_optimizer_of_another_model_is_not_recorded() -> None:
    model, other = SmallCNN(), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    writer = Records()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    with warnings.catch_warnings(), lens.step(0):
        warnings.simplefilter("ignore", RuntimeWarning)
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        other(torch.randn(1, 2)).sum().backward()
        optimizer.step()
    # no update of this model: its .grad as the block left it, the other model's step unseen
    assert set(writer.records[0].parameter_gradients) == {n for n, _ in model.named_parameters()}
    assert writer.records[0].grad_norm is None


# -- a GAN, plain loop -----------------------------------------------------------------------------


class Generator(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))


class Discriminator(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = Generator()
        self.discriminator = Discriminator()

    def generator_loss(self, z: torch.Tensor) -> torch.Tensor:
        score = self.discriminator(self.generator(z))
        return F.binary_cross_entropy_with_logits(score, torch.ones_like(score))

    def discriminator_loss(self, z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        fake = self.generator(z).detach()
        on_real, on_fake = self.discriminator(real), self.discriminator(fake)
        return (F.binary_cross_entropy_with_logits(on_real, torch.ones_like(on_real))
                + F.binary_cross_entropy_with_logits(on_fake, torch.zeros_like(on_fake)))


# Both phases of a GAN's step: the generator runs in both, the discriminator on fake (generator
# phase), then on real and fake (discriminator phase).
PHASES = {"generator.0:1", "generator.0:2", "discriminator.0:1", "discriminator.0:2", "discriminator.0:3"}


def _modules_run(record: CaptureRecord) -> set[str]:
    return {call.removeprefix("gan.") for history in record.histories for layer in history
            for call in layer.module_stack}


def _check_gan_record(record: CaptureRecord, oracle: UpdateOracle) -> None:
    assert _modules_run(record) >= PHASES
    labels = [layer.label for layer in record.history]
    assert sum(label.startswith("binarycrossentropywithlogits") for label in labels) == 3
    assert set(record.parameter_gradients) == set(oracle.used)  # both optimizers' parameters
    assert_summaries_match(record.parameter_gradients, oracle.used)
    assert record.grad_norm == pytest.approx(oracle.total_norm(), rel=1e-6)


def _gan_loop(gan: GAN, lens: Lens | None, steps: int = 3) -> list[UpdateOracle]:
    torch.manual_seed(0)
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-2)
    oracles = []
    for step in range(steps):
        real = torch.randn(5, 6) + 2
        z = torch.randn(5, 4)
        oracle = UpdateOracle.on(gan, opt_g, opt_d)
        with lens.step(step) if lens is not None else torch.enable_grad():
            opt_g.zero_grad()
            gan.generator_loss(z).backward()  # also fills the discriminator's .grad
            opt_g.step()
            opt_d.zero_grad()
            gan.discriminator_loss(z, real).backward()
            opt_d.step()
        oracle.remove()
        oracles.append(oracle)
    return oracles


def test_plain_loop_gan_records_both_phases_and_each_optimizer_s_gradients() -> None:
    torch.manual_seed(0)
    gan = GAN()
    twin = copy.deepcopy(gan)
    writer = Records()
    lens = Lens(gan, every_n_steps=1, writers=[writer])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning
        oracles = _gan_loop(gan, lens)
    lens.close()
    _gan_loop(twin, None)
    for a, b in zip(gan.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert nothing_installed(gan)
    for step, oracle in enumerate(oracles):
        assert oracle.steps == 2
        _check_gan_record(writer.records[step], oracle)


def test_two_optimizers_sharing_a_parameter_record_its_last_update() -> None:
    model = nn.Linear(3, 1)
    first = torch.optim.SGD([model.weight, model.bias], lr=0.1)
    second = torch.optim.SGD([model.weight], lr=0.1)
    writer = Records()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    oracle = UpdateOracle.on(model, first, second)
    with lens.step(0):
        model(torch.randn(4, 3)).sum().backward()
        first.step()
        model.weight.grad.mul_(3)  # what the second optimizer uses differs
        second.step()
    oracle.remove()
    assert_summaries_match(writer.records[0].parameter_gradients, oracle.used)


# -- Lightning: clipping under automatic optimization ----------------------------------------------


class LightningOracle(pl.Callback):
    """Registers the test's own step post-hook on the trainer's optimizer, and measures the norm
    Lightning is about to clip (``on_before_optimizer_step`` runs before its clipping)."""

    def __init__(self) -> None:
        self.updates: dict[int, UpdateOracle] = {}
        self.before_clip: dict[int, float] = {}
        self.oracle: UpdateOracle | None = None
        self.optimizers: list[torch.optim.Optimizer] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.optimizers = list(trainer.optimizers)
        self.oracle = UpdateOracle.on(pl_module, *self.optimizers)
        self.updates[trainer.global_step] = self.oracle

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.before_clip[trainer.global_step] = float(torch.stack([g.norm() for g in grads]).norm())

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.oracle is not None
        self.oracle.remove()


def test_lightning_records_the_clipped_gradients_the_update_used(tmp_path: Path) -> None:
    def fit(callbacks: list[pl.Callback]) -> LitCNN:
        torch.manual_seed(0)
        model = LitCNN()
        trainer(tmp_path, callbacks, gradient_clip_val=0.5).fit(model, loader(32, batch_size=4))
        return model

    writer = Records()
    oracle = LightningOracle()
    captured = fit([LensCallback(every_n_steps=1, writers=[writer]), oracle])
    plain = fit([])
    assert plain.losses == captured.losses
    for a, b in zip(plain.parameters(), captured.parameters(), strict=True):
        assert torch.equal(a, b)
    assert nothing_installed(captured)
    assert no_optimizer_hooks(*oracle.optimizers)  # the oracle's removed: nothing of ours is left
    assert sorted(writer.records) == [0, 1, 2, 3]
    clipped = 0
    for step, record in writer.records.items():
        used = oracle.updates[step]
        assert used.steps == 1
        assert_summaries_match(record.parameter_gradients, used.used)
        assert record.grad_norm == pytest.approx(used.total_norm(), rel=1e-6)
        assert record.grad_norm_before_clip == pytest.approx(oracle.before_clip[step], rel=1e-6)
        assert record.clip_coefficient == pytest.approx(
            min(1.0, 0.5 / (oracle.before_clip[step] + 1e-6)), rel=1e-5
        )
        clipped += record.grad_norm_before_clip > 0.5
    assert clipped >= 1  # the run clips


# -- Lightning: a GAN under manual optimization ----------------------------------------------------


class LitGAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gan = GAN()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        z = torch.randn(real.shape[0], 4)
        opt_g.zero_grad()
        self.manual_backward(self.gan.generator_loss(z))
        opt_g.step()
        opt_d.zero_grad()
        self.manual_backward(self.gan.discriminator_loss(z, real))
        opt_d.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.gan.generator.parameters(), lr=1e-2),
                torch.optim.Adam(self.gan.discriminator.parameters(), lr=1e-2)]


def test_lightning_manual_optimization_gan(tmp_path: Path) -> None:
    def fit(callbacks: list[pl.Callback]) -> LitGAN:
        torch.manual_seed(0)
        model = LitGAN()
        data = DataLoader(TensorDataset(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)) + 2),
                          batch_size=4)
        trainer(tmp_path, callbacks, max_steps=6).fit(model, data)
        return model

    writer = Records()
    oracle = LightningOracle()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing to warn about
        captured = fit([LensCallback(every_n_steps=1, writers=[writer]), oracle])
    plain = fit([])
    for a, b in zip(plain.parameters(), captured.parameters(), strict=True):
        assert torch.equal(a, b)
    assert nothing_installed(captured)
    assert no_optimizer_hooks(*oracle.optimizers)
    assert sorted(writer.records) == [0, 2, 4]  # Lightning counts both optimizers' steps
    for step, record in writer.records.items():
        assert oracle.updates[step].steps == 2
        _check_gan_record(record, oracle.updates[step])
        assert record.grad_norm_before_clip == pytest.approx(record.grad_norm, rel=1e-6)  # not clipped
        assert record.clip_coefficient == pytest.approx(1.0, rel=1e-6)
