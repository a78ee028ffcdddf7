"""LensTrainerCallback inside real ``transformers.Trainer`` runs (tiny GPT-2 and BERT from configs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import lens_core as lc
from lens_callbacks import DiskWriter
from tests.callbacks.helpers import RecordWriter
from tests.callbacks.test_lens import nothing_installed
from tests.conftest import require

transformers = pytest.importorskip("transformers") if importlib.util.find_spec("transformers") else None
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _require() -> Any:
    require(transformers is not None, "transformers is not installed")
    from lens_callbacks import LensTrainerCallback

    return LensTrainerCallback



class GradientOracle:
    """An independent Trainer callback: the parameters' gradients as the optimizer gets them."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.model: torch.nn.Module | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.model = model

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.model is not None
        self.grads[state.global_step] = {
            name: p.grad.detach().clone() for name, p in self.model.named_parameters() if p.grad is not None
        }


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, length: int, vocab: int, mask_token: int | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, length), generator=generator)
        self.mask_token = mask_token

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens[index]
        if self.mask_token is None:
            return {"input_ids": tokens, "labels": tokens}
        masked = tokens.clone()
        masked[::3] = self.mask_token
        return {"input_ids": masked, "labels": tokens}


def _issued_by_trainer(history: lc.ModelHistory) -> list[str]:
    """Layers whose op was called from the Trainer's or accelerate's code (innermost frame)."""
    return [
        layer.label for layer in history
        if layer.func_call_stack and any(
            part in layer.func_call_stack[-1].call_fname for part in ("transformers/trainer", "/accelerate/")
        )
    ]


def _gpt2() -> torch.nn.Module:
    assert transformers is not None
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def _bert() -> torch.nn.Module:
    assert transformers is not None
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertForMaskedLM(config)


def _train(
    tmp_path: Path, make_model: Any, callbacks: list[Any], mask_token: int | None = None, **options: Any
) -> torch.nn.Module:
    assert transformers is not None
    torch.manual_seed(0)
    model = make_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=options.pop("max_grad_norm", 1.0),
        **options,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenData(12, 8, 40, mask_token), callbacks=callbacks,
    )
    trainer.train()
    return model


@pytest.mark.parametrize(("make_model", "mask_token"), [(_gpt2, None), (_bert, 3)], ids=["gpt2", "bert"])
def test_captured_steps_hold_the_model_s_ops_and_the_gradients_the_optimizer_used(
    tmp_path: Path, make_model: Any, mask_token: int | None
) -> None:
    callback_class = _require()
    writer, oracle = RecordWriter(), GradientOracle()
    disk = DiskWriter(tmp_path / "lens")
    callback = callback_class(every_n_steps=1, writers=[writer, disk])
    _train(tmp_path / "run", make_model, [callback, oracle], mask_token, max_grad_norm=1e-3)
    assert [record.step for record in writer.records] == [0, 1, 2]
    assert all(len(record.histories) == 2 for record in writer.records)  # accumulation 2

    # the layers are the model's forward (its loss included), none issued by the Trainer
    labels = writer.records[0].histories[0].layer_labels
    for record in writer.records:
        for history in record.histories:
            assert history.layer_labels == labels  # one layer, one series
            assert not _issued_by_trainer(history)

    # parameter gradients as the optimizer used them: accumulated and clipped (max_grad_norm)
    for record in writer.records:
        expected = oracle.grads[record.step]
        assert set(record.parameter_gradients) == set(expected)
        for name, grad in expected.items():
            summary = record.parameter_gradients[name]
            assert summary.l2_norm == pytest.approx(grad.double().norm().item(), rel=1e-5, abs=1e-12)
        total = torch.cat([g.flatten() for g in expected.values()]).norm().item()
        assert total == pytest.approx(1e-3, rel=1e-3)  # clipped: the oracle saw post-clip gradients

    # what was written loads back
    step = lc.load(tmp_path / "lens" / "step_000002", micro_batch=1)
    assert step.layer_labels == labels
    assert nothing_installed()


def test_the_trainer_s_own_ops_are_there_to_be_left_out(tmp_path: Path) -> None:
    # the check above can fail: recording every op shows the Trainer's
    callback_class = _require()
    writer = RecordWriter()
    _train(tmp_path, _gpt2, [callback_class(steps=[0], writers=[writer], framework=())])
    assert _issued_by_trainer(writer.records[0].history)


def test_training_is_bitwise_unchanged(tmp_path: Path) -> None:
    callback_class = _require()
    plain = _train(tmp_path / "plain", _gpt2, [])
    captured = _train(tmp_path / "lens", _gpt2, [callback_class(every_n_steps=1, writers=[])])
    for (name, a), b in zip(plain.named_parameters(), captured.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_default_writers_and_bad_arguments(tmp_path: Path) -> None:
    callback_class = _require()
    _train(tmp_path, _gpt2, [callback_class(steps=[1])])
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["step_000001"]
    with pytest.raises(ValueError, match="ranks='some'"):
        callback_class(ranks="some")
    with pytest.raises(ValueError, match="every_n_steps=0"):
        callback_class(every_n_steps=0)
    with pytest.raises(TypeError, match="framework"):
        callback_class(framework=3)
