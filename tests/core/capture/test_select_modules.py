"""Selecting layers by module: substrings of module addresses, checked before anything runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_callbacks import Lens
from tests.conftest import require


class Adapted(nn.Module):
    """A linear layer with a low-rank adapter beside it, as LoRA builds it."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 6)
        self.lora_A = nn.Linear(6, 2, bias=False)
        self.lora_B = nn.Linear(2, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(torch.dropout(self.lora_A(x), 0.0, True)) * 0.5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Adapted(), nn.ReLU(), Adapted())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).sum(1)


def test_a_substring_selects_every_op_inside_modules_whose_address_holds_it() -> None:
    history = lc.log_forward_pass(Net(), torch.randn(3, 6), layers_to_save="lora")
    selected = [history[label] for label in history.layer_labels]
    assert [layer.module for layer in selected] == [
        "blocks.0.lora_A", "blocks.0.lora_B", "blocks.2.lora_A", "blocks.2.lora_B",
    ]
    # a substring of labels still works as before
    assert lc.log_forward_pass(Net(), torch.randn(3, 6), layers_to_save="relu").layer_labels == ["relu_1_7"]


def test_an_address_that_names_no_module_fails_before_anything_runs() -> None:
    with pytest.raises(lc.LayerNotFoundError, match=r"'blocks\.9\.lora_A'.*closest: .*blocks\.0\.lora_A"):
        Lens(Net(), layers="blocks.9.lora_A")
    with pytest.raises(lc.LayerNotFoundError, match="named_modules"):
        lc.Capture(Net(), layers=["relu", "blocks.0.lora_C"])


def test_lora_layers_of_a_peft_model() -> None:
    require(importlib.util.find_spec("peft") is not None, "peft is not installed")
    require(importlib.util.find_spec("transformers") is not None, "transformers is not installed")
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    tokens = torch.randint(0, 64, (2, 8))
    with lc.capture(model, layers="lora", gradients=True) as cap:
        model(input_ids=tokens, labels=tokens).loss.backward()
    history = cap.history
    # PEFT keeps each adapter's linear layers in ModuleDicts: q_proj.lora_A.default ...
    adapters = [name for name, m in model.named_modules() if "lora_" in name and isinstance(m, nn.Linear)]
    assert len(adapters) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    assert [history[label].module for label in history.layer_labels] == adapters
    assert all(history[label].gradient is not None for label in history.layer_labels)
