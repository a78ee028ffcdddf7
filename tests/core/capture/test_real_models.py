"""Capture + validation on real architectures nobody here wrote, with random weights.

The default set runs in `make test`; every torchvision classification model runs under the
`zoo` marker (`make zoo`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import nn

import lens_core as lc
from tests.conftest import require

torchvision = pytest.importorskip("torchvision")

DEFAULT_MODELS = [
    "alexnet", "resnet18", "googlenet", "inception_v3", "mobilenet_v3_small", "efficientnet_b0",
    "densenet121", "convnext_tiny", "swin_t", "vit_b_16", "regnet_x_400mf", "squeezenet1_0",
]


def _classifier(name: str, training: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A randomly initialised model and the smallest input it accepts (2 images)."""
    options: dict[str, Any] = {}
    size = 64
    if name in ("googlenet", "inception_v3"):
        options["init_weights"] = False  # scipy's truncated normal is slow and irrelevant here
    if name == "inception_v3":
        size = 299 if training else 75  # the auxiliary head, used in training, needs 299
    if name.startswith("vit"):  # vit_b_16: patch 16; two patches a side keep it small
        size = options["image_size"] = 2 * int(name.rsplit("_", 1)[1])
    if name.startswith("maxvit"):
        size = 224
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **options)
    return model.train(training), torch.randn(2, 3, size, size)


def _assert_valid(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    report = lc.validation_report(model, *args, **kwargs)
    assert report.ok, str(report)
    assert report.checks


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_torchvision_classifier(name: str, training: bool) -> None:
    model, x = _classifier(name, training)
    _assert_valid(model, x)


def _all_classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.zoo
@pytest.mark.parametrize("name", _all_classifiers())
def test_torchvision_zoo(name: str) -> None:
    _assert_valid(*_classifier(name))


def test_detection_model_with_list_inputs_and_dict_outputs() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None
    ).eval()
    _assert_valid(model, [[torch.rand(3, 96, 128)]])
    history = lc.get_model_metadata(model, [[torch.rand(3, 96, 128)]])
    assert len(history.output_layers) == 3  # boxes, labels, scores of the one image
    assert any(layer.layer_type == "roialign" for layer in history)


def test_segmentation_model_with_dict_output() -> None:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None
    ).eval()
    _assert_valid(model, torch.rand(1, 3, 64, 64))


def _transformers() -> Any:
    require(importlib.util.find_spec("transformers") is not None, "transformers is not installed")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _hf_case(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    tf = _transformers()
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    text = {"input_ids": ids, "attention_mask": mask}
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(config), text
    if name == "bert":
        config = tf.BertConfig(vocab_size=100, max_position_embeddings=16, **small)
        return tf.BertModel(config), text
    if name == "t5":
        config = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                             decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(config), {**text, "decoder_input_ids": ids[:, :4]}
    config = tf.ViTConfig(image_size=32, patch_size=8, **small)
    return tf.ViTModel(config), {"pixel_values": torch.randn(2, 3, 32, 32)}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "vit"])
def test_transformers_model_with_keyword_inputs(name: str, training: bool) -> None:
    model, kwargs = _hf_case(name)
    model.train(training)
    _assert_valid(model, [], kwargs)
    history = lc.log_forward_pass(model, [], kwargs, layers_to_save="linear")
    assert history.layer_labels
    assert all(label.startswith("linear_") for label in history.layer_labels)
