"""LensCallback inside real Lightning training runs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import lens_core as lc
from lens_callbacks import LensCallback
from tests.callbacks.helpers import ListWriter, SummariesOnly
from tests.callbacks.lightning_helpers import LitCNN, loader, trainer
from tests.callbacks.test_lens import nothing_installed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints on tiny runs


def fit(
    tmp_path: Path, callback: LensCallback | None, seed: int = 0, batch_size: int = 4, **kwargs: object
) -> LitCNN:
    torch.manual_seed(seed)
    model = LitCNN()
    run = trainer(tmp_path, [callback] if callback else [], **kwargs)
    run.fit(model, loader(8 * batch_size, batch_size=batch_size))
    return model


# Batches of 4 make outputs small enough to be kept until the step's end; of 16, large enough to
# be summarised as they are made when the writer reads summaries only.
@pytest.mark.parametrize(("writer", "batch_size"), [(ListWriter(), 4), (SummariesOnly(), 16)])
def test_observer_effect_is_nil(tmp_path: Path, writer: ListWriter, batch_size: int) -> None:
    plain = fit(tmp_path / "plain", None, batch_size=batch_size)
    callback = LensCallback(every_n_steps=1, writers=[writer])
    captured = fit(tmp_path / "lens", callback, batch_size=batch_size)
    assert callback.lens is not None
    assert callback.lens.summarize_as_made == isinstance(writer, SummariesOnly)
    assert writer.steps == [0, 1, 2, 3]
    assert plain.losses == captured.losses
    for a, b in zip(plain.parameters(), captured.parameters(), strict=True):
        assert torch.equal(a, b)
    assert nothing_installed()


def test_default_disk_writer_and_load(tmp_path: Path) -> None:
    fit(tmp_path, LensCallback(layers="conv", every_n_steps=2, save_tensors=True))
    root = tmp_path / "lens"
    assert sorted(p.name for p in root.iterdir()) == ["step_000000", "step_000002"]
    history = lc.load(root / "step_000002" / "micro_batch_0")
    assert history.layer_labels == ["conv2d_1_1", "conv2d_2_4"]
    assert history["net.conv2"].tensor_contents.shape == (4, 8, 4, 4)
    assert history["net.conv2"].gradient.shape == (4, 8, 4, 4)


def test_gradient_accumulation(tmp_path: Path) -> None:
    writer = ListWriter()
    fit(tmp_path, LensCallback(layers="net.fc", every_n_steps=2, writers=[writer]), accumulate_grad_batches=2)
    assert writer.steps == [0, 2]
    assert [seen.micro_batches for seen in writer.seen] == [2, 2]
    assert set(writer.seen[0].parameter_gradients) == {"net.fc.weight", "net.fc.bias"}


def test_validation_capture_is_opt_in(tmp_path: Path) -> None:
    writer = ListWriter()
    callback = LensCallback(every_n_steps=2, stages=["train", "validate"], writers=[writer])
    torch.manual_seed(0)
    run = trainer(tmp_path, [callback], val_check_interval=2, limit_val_batches=2)
    run.fit(LitCNN(), loader(), loader(8))
    stages = [(seen.stage, seen.step) for seen in writer.seen]
    assert ("validate", 2) in stages
    assert ("train", 0) in stages
    validate = next(seen for seen in writer.seen if seen.stage == "validate")
    assert validate.gradients == {}  # no backward in validation


def test_sanity_check_is_not_captured_unless_asked(tmp_path: Path) -> None:
    writer = ListWriter()
    callback = LensCallback(every_n_steps=1, stages=["validate"], writers=[writer])
    trainer(tmp_path, [callback], max_steps=1, num_sanity_val_steps=1, limit_val_batches=1).fit(
        LitCNN(), loader(), loader(8)
    )
    assert "sanity_check" not in {seen.stage for seen in writer.seen}


def test_exception_mid_step_propagates_and_leaves_nothing(tmp_path: Path) -> None:
    class Exploding(LitCNN):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.global_step == 1:
                raise RuntimeError("exploded at step 1")
            return super().training_step(batch, batch_idx)

    writer = ListWriter()
    with pytest.raises(RuntimeError, match="exploded at step 1"):
        trainer(tmp_path, [LensCallback(every_n_steps=1, writers=[writer])]).fit(Exploding(), loader())
    assert writer.steps == [0]
    assert nothing_installed()


def test_resume_from_checkpoint_neither_repeats_nor_skips(tmp_path: Path) -> None:
    first = ListWriter()
    torch.manual_seed(0)
    run = trainer(tmp_path, [LensCallback(every_n_steps=1, writers=[first])], max_steps=3,
                  enable_checkpointing=True)
    run.fit(LitCNN(), loader())
    checkpoint = run.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    second = ListWriter()
    resumed = trainer(tmp_path, [LensCallback(every_n_steps=1, writers=[second])], max_steps=6)
    resumed.fit(LitCNN(), loader(), ckpt_path=checkpoint)
    assert first.steps == [0, 1, 2]
    assert second.steps == [3, 4, 5]


def test_bf16_mixed_records_real_dtypes(tmp_path: Path) -> None:
    writer = ListWriter()
    fit(tmp_path, LensCallback(layers="conv", every_n_steps=2, writers=[writer]), precision="bf16-mixed")
    assert {writer.seen[0].dtypes[label] for label in writer.seen[0].labels} == {torch.bfloat16}


def test_dict_batches(tmp_path: Path) -> None:
    writer = ListWriter()
    torch.manual_seed(0)
    trainer(tmp_path, [LensCallback(layers="linear", every_n_steps=2, writers=[writer])]).fit(
        LitCNN(dict_batches=True), loader(dict_batches=True)
    )
    assert writer.steps == [0, 2]
    (label,) = writer.seen[0].labels
    assert label.startswith("linear_")


def test_no_writer_for_loggers_is_said_at_setup(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = LensCallback(every_n_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], max_steps=1, logger=CSVLogger(tmp_path)).fit(LitCNN(), loader())
    assert any("no writer for the trainer's loggers (CSVLogger)" in str(w.message) for w in caught)
    assert [type(w).__name__ for w in callback.writers] == ["DiskWriter"]


def test_loggers_get_their_writers(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    callback = LensCallback(every_n_steps=2)
    trainer(tmp_path, [callback], max_steps=3, logger=TensorBoardLogger(tmp_path)).fit(LitCNN(), loader())
    assert [type(w).__name__ for w in callback.writers] == ["DiskWriter", "TensorBoardWriter"]



def test_an_empty_writer_list_writes_nowhere(tmp_path: Path) -> None:
    callback = LensCallback(every_n_steps=1, writers=[])
    trainer(tmp_path, [callback], max_steps=2).fit(LitCNN(), loader())
    assert callback.writers == []
    assert callback.lens is not None
    assert callback.lens.last_step == 1
    assert not list(tmp_path.rglob("summaries.json"))

def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="ranks='one'"):
        LensCallback(ranks="one")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps=-2"):
        LensCallback(every_n_steps=-2)


def test_fit_then_test_reuses_the_writers(tmp_path: Path) -> None:
    writer = ListWriter()
    callback = LensCallback(every_n_steps=2, stages=["train", "test"], writers=[writer])
    run = trainer(tmp_path, [callback])
    model = LitCNN()
    run.fit(model, loader())
    run.test(model, loader(8))
    assert [(seen.stage, seen.step) for seen in writer.seen] == [("train", 0), ("train", 2), ("test", 4)]


class ManualCNN(LitCNN):
    """Manual optimization: the step may run several backward passes through the same outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss


def test_manual_optimization_keeps_gradients_whole_so_that_they_add_up(tmp_path: Path) -> None:
    writer = SummariesOnly()
    callback = LensCallback(every_n_steps=1, writers=[writer])
    trainer(tmp_path, [callback], max_steps=2).fit(ManualCNN(), loader(32, batch_size=16))
    assert callback.lens is not None
    assert not callback.lens.summarize_as_made
    assert writer.steps == [0, 1]
    assert {"conv2d_1_1", "linear_1_9"} <= set(writer.seen[0].gradients)  # large and small ones


class SkipsFirstBatch(LitCNN):
    """A training_step that returns None: no backward, and an optimizer step without gradients."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 0 else loss


@pytest.mark.parametrize("writer", [ListWriter(), SummariesOnly()])
def test_a_step_without_backward_is_captured_without_gradients(tmp_path: Path, writer: ListWriter) -> None:
    callback = LensCallback(every_n_steps=1, writers=[writer])
    trainer(tmp_path, [callback], max_steps=2).fit(SkipsFirstBatch(), loader(32, batch_size=16))
    assert writer.steps == [0, 1]  # Lightning counts the step that trained nothing too
    assert "conv2d_1_1" in writer.seen[0].activations
    assert writer.seen[0].gradients == {}
    assert "conv2d_1_1" in writer.seen[1].gradients
