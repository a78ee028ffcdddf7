"""The TorchLens README examples (shared/seed/000_6edc9e94a7800cc2.txt), reproduced exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lens_core as lc

torchvision = pytest.importorskip("torchvision")

ALEXNET_LABELS = [
    "input_1_0", "conv2d_1_1", "relu_1_2", "maxpool2d_1_3", "conv2d_2_4", "relu_2_5",
    "maxpool2d_2_6", "conv2d_3_7", "relu_3_8", "conv2d_4_9", "relu_4_10", "conv2d_5_11",
    "relu_5_12", "maxpool2d_3_13", "adaptiveavgpool2d_1_14", "flatten_1_15", "dropout_1_16",
    "linear_1_17", "relu_6_18", "dropout_2_19", "linear_2_20", "relu_7_21", "linear_3_22",
    "output_1_23",
]


class SimpleRecurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features=5, out_features=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = self.fc(x)
            x = x + 1
            x = x * 2
        return x


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_alexnet_layer_listing(alexnet: nn.Module, image: torch.Tensor) -> None:
    history = lc.log_forward_pass(alexnet, image, layers_to_save="all")
    assert history.layer_labels == ALEXNET_LABELS
    assert len(history) == 24
    assert len(history.module_addresses) == 23
    text = str(history)
    assert "Log of AlexNet forward pass:" in text
    assert "purely feedforward, without branching; 23 total modules." in text
    assert "24 tensors" in text
    assert "61100840 params total" in text
    for i, label in enumerate(ALEXNET_LABELS):
        assert f"\t\t{i}: {label}\n" in text + "\n"


def test_alexnet_equivalent_keys(alexnet: nn.Module, image: torch.Tensor) -> None:
    history = lc.log_forward_pass(alexnet, image, layers_to_save="all")
    layer = history["conv2d_3_7"]
    for key in ("conv2d_3", "conv2d_3_7:1", "features.6", "features.6:1", 7, -17):
        assert history[key] is layer, key
    assert layer.lookup_keys == (-17, 7, "conv2d_3_7", "conv2d_3_7:1", "features.6", "features.6:1")
    assert layer.shape == (1, 384, 13, 13)
    assert layer.parents == ("maxpool2d_2_6",)
    assert layer.children == ("relu_3_8",)
    assert layer.module == "features.6"
    assert layer.grad_fn_name == "ConvolutionBackward0"
    assert sorted(layer.param_shapes) == [(384,), (384, 192, 3, 3)]
    assert layer.num_params == 663936
    text = str(layer)
    assert text.startswith("Layer conv2d_3_7, operation 8/24:")
    assert "Lookup keys: -17, 7, conv2d_3_7, conv2d_3_7:1, features.6, features.6:1" in text
    reference = alexnet.features[:7](image)
    assert torch.equal(layer.tensor_contents, reference)


def test_alexnet_layers_to_save(alexnet: nn.Module, image: torch.Tensor) -> None:
    history = lc.log_forward_pass(
        alexnet, image, vis_opt="none", layers_to_save=["conv2d_3_7", "features", -5, "linear"]
    )
    expected = ["conv2d_3_7", "maxpool2d_3_13", "linear_1_17", "dropout_2_19", "linear_2_20", "linear_3_22"]
    assert history.layer_labels == expected
    assert [layer.label for layer in history.saved_layers] == expected
    assert history.all_layer_labels == ALEXNET_LABELS
    assert history["relu_1_2"].tensor_contents is None


def test_simple_recurrent_passes() -> None:
    torch.manual_seed(0)
    model = SimpleRecurrent()
    x = torch.rand(6, 5)
    history = lc.log_forward_pass(model, x, layers_to_save="all", vis_opt="none")
    assert history.layer_labels == [
        "input_1_0",
        *[f"{name}:{n}" for n in range(1, 5) for name in ("linear_1_1", "add_1_2", "mul_1_3")],
        "output_1_4",
    ]
    layer = history["linear_1_1:2"]
    assert (layer.pass_num, layer.num_passes) == (2, 4)
    assert history["fc:2"] is layer
    expected = model.fc((model.fc(x) + 1) * 2)
    assert torch.equal(layer.tensor_contents, expected)
    assert history.is_recurrent
    assert history.max_passes == 4
    with pytest.raises(lc.LayerNotFoundError, match=r"ambiguous.*linear_1_1:1"):
        history["linear_1_1"]
