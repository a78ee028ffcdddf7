"""Validation on architectures that nobody here wrote and no other test builds (`make zoo`).

A sample of timm and Hugging Face transformers families, randomly initialised and small, is
validated in eval and in train mode (dropout, stochastic depth and random masking draw numbers
there), with the models that first broke validation (issue 19): RAFT and LeViT keep autograd
results as attributes after a pass, which ``copy.deepcopy`` refuses. Everything here is slow
(about ten minutes on two CPU cores), hence the ``zoo`` marker that ``make test`` leaves out.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import nn

import lens_core as lc
from tests.conftest import require

pytestmark = pytest.mark.zoo

TRAINING = pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])

# Families from across timm (convolutional, attention, MLP, hybrid, re-parameterised, recurrent).
TIMM_MODELS = [
    "bat_resnext26ts", "botnet26t_256", "cait_xxs24_224", "coat_lite_tiny", "coatnet_nano_rw_224",
    "convit_tiny", "convnextv2_atto", "crossvit_tiny_240", "cs3darknet_focus_s", "cspresnet50",
    "davit_tiny", "deit_tiny_distilled_patch16_224", "dla34", "dpn68", "ecaresnet26t", "edgenext_xx_small",
    "efficientformer_l1", "efficientvit_b0", "efficientvit_m0", "ese_vovnet19b_dw",
    "eva02_tiny_patch14_224", "fasternet_t0", "fastvit_t8", "fbnetc_100", "focalnet_tiny_srf",
    "gcresnet33ts", "gcvit_xxtiny", "gernet_s", "ghostnet_100", "gmlp_ti16_224", "halonet26t",
    "haloregnetz_b", "hgnet_tiny", "hgnetv2_b0", "hiera_tiny_224", "hrnet_w18_small",
    "inception_next_tiny", "lambda_resnet26t", "lcnet_050", "levit_128s", "mambaout_femto",
    "mixer_s16_224", "mixnet_s", "mobilenetv4_conv_small", "mobileone_s0", "mobilevit_xxs",
    "mobilevitv2_050", "mvitv2_tiny", "nest_tiny", "nf_resnet26", "pit_ti_224", "poolformer_s12",
    "pvt_v2_b0", "rdnet_tiny", "regnetz_005", "repghostnet_050", "repvgg_a0", "res2net50_14w_8s",
    "resmlp_12_224", "resnest14d", "rexnet_100", "selecsls42b", "semnasnet_075", "sequencer2d_s",
    "seresnext26d_32x4d", "shvit_s1", "skresnet18", "starnet_s050", "swinv2_cr_tiny_ns_224",
    "tiny_vit_5m_224", "tinynet_a", "tnt_s_patch16_224", "tresnet_m", "twins_svt_small", "visformer_tiny",
    "vit_tiny_patch16_224", "vitamin_small_224", "volo_d1_224", "xception41", "xcit_nano_12_p16_224",
]
# The input side is 64 except where the architecture fixes a larger one.
_TIMM_SIZE = {"efficientformer_l1": 224, "halonet26t": 256, "bat_resnext26ts": 256, "haloregnetz_b": 224}
# Models built for one input size (patch grids, position tables, attention windows): given it.
_TAKES_IMG_SIZE = frozenset({
    "bat_resnext26ts", "botnet26t_256", "cait_xxs24_224", "coat_lite_tiny", "coatnet_nano_rw_224",
    "convit_tiny", "deit_tiny_distilled_patch16_224", "efficientformer_l1", "efficientvit_m0",
    "eva02_tiny_patch14_224", "gcresnet33ts", "gcvit_xxtiny", "gernet_s", "gmlp_ti16_224", "halonet26t",
    "haloregnetz_b", "hiera_tiny_224", "lambda_resnet26t", "levit_128s", "mixer_s16_224", "mobileone_s0",
    "mobilevit_xxs", "mobilevitv2_050", "mvitv2_tiny", "nest_tiny", "pit_ti_224", "repvgg_a0",
    "resmlp_12_224", "sequencer2d_s", "swinv2_cr_tiny_ns_224", "tnt_s_patch16_224", "twins_svt_small",
    "visformer_tiny", "vit_tiny_patch16_224", "vitamin_small_224", "volo_d1_224", "xcit_nano_12_p16_224",
})
# Models whose constructor takes no drop_path_rate (no stochastic depth to train with).
_NO_DROP_PATH = frozenset({
    "ghostnet_100", "hrnet_w18_small", "dla34", "dpn68", "efficientvit_b0", "selecsls42b", "shvit_s1",
    "repghostnet_050", "efficientvit_m0",
})

_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "vocab_size": 100, "max_position_embeddings": 64}
_SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
            "max_position_embeddings": 64, "decoder_start_token_id": 0, "pad_token_id": 1}
_IMAGE = {**_SMALL, "image_size": 32, "patch_size": 8}
# model_type -> (small config, which inputs it takes)
HF_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "llama": ({**_SMALL, "num_key_value_heads": 1}, "text"),
    "mistral": ({**_SMALL, "num_key_value_heads": 1}, "text"),
    "qwen2": ({**_SMALL, "num_key_value_heads": 1}, "text"),
    "gemma": ({**_SMALL, "num_key_value_heads": 1, "head_dim": 16}, "text"),
    "phi": (_SMALL, "text"),
    "gpt_neox": (_SMALL, "text"),
    "opt": ({**_SMALL, "ffn_dim": 64, "word_embed_proj_dim": 32}, "text"),
    "bloom": ({"hidden_size": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100}, "text"),
    "falcon": ({**_SMALL, "new_decoder_architecture": False}, "text"),
    "mixtral": ({**_SMALL, "num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 2},
                "text"),
    "mamba": ({"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 100, "state_size": 8}, "ids"),
    "gpt_bigcode": ({"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64}, "text"),
    "roberta": (_SMALL, "text"),
    "distilbert": ({"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "vocab_size": 100,
                    "max_position_embeddings": 64}, "text"),
    "albert": ({**_SMALL, "embedding_size": 16}, "text"),
    "electra": ({**_SMALL, "embedding_size": 16}, "text"),
    "deberta-v2": (_SMALL, "text"),
    "mobilebert": ({**_SMALL, "embedding_size": 16, "intra_bottleneck_size": 32, "true_hidden_size": 32,
                    "num_feedforward_networks": 2}, "text"),
    "roformer": ({**_SMALL, "embedding_size": 32}, "text"),
    "xlnet": ({"d_model": 32, "n_layer": 2, "n_head": 2, "d_inner": 64, "vocab_size": 100}, "text"),
    "big_bird": ({**_SMALL, "attention_type": "original_full"}, "text"),
    "bart": (_SEQ2SEQ, "seq2seq"),
    "pegasus": (_SEQ2SEQ, "seq2seq"),
    "marian": (_SEQ2SEQ, "seq2seq"),
    "switch_transformers": ({"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                             "num_heads": 2, "num_experts": 4, "vocab_size": 100,
                             "decoder_start_token_id": 0}, "seq2seq"),
    "deit": (_IMAGE, "image"),
    "dinov2": (_IMAGE, "image"),
    "vit_mae": ({**_IMAGE, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
                 "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64}, "image"),
    "swin": ({"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
              "window_size": 4}, "image"),
    "convnext": ({"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}, "image"),
    "segformer": ({"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
                   "patch_sizes": [7, 3], "strides": [4, 2], "num_attention_heads": [1, 2],
                   "mlp_ratios": [2, 2], "decoder_hidden_size": 32}, "image"),
    "mobilevit": ({"image_size": 64, "hidden_sizes": [16, 16, 16],
                   "neck_hidden_sizes": [8, 8, 8, 16, 16, 16, 32]}, "image64"),
    "wav2vec2": ({**_SMALL, "conv_dim": [16, 16], "conv_stride": [5, 2], "conv_kernel": [10, 3],
                  "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}, "audio"),
    "whisper": ({**_SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 16, "max_target_positions": 16},
                "features"),
    "clip": ({"text_config": _SMALL, "vision_config": _IMAGE, "projection_dim": 16}, "text+image"),
}


def _assert_valid(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    report = lc.validation_report(model, *args, **kwargs)
    assert report.ok, str(report)
    assert report.checks


def _timm() -> Any:
    require(importlib.util.find_spec("timm") is not None, "timm is not installed")
    import timm

    return timm


@TRAINING
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model(name: str, training: bool) -> None:
    timm = _timm()
    size = _TIMM_SIZE.get(name, 64)
    options: dict[str, Any] = {"pretrained": False, "num_classes": 8}
    if training and name not in _NO_DROP_PATH:
        options["drop_path_rate"] = 0.1
    if name in _TAKES_IMG_SIZE:
        options["img_size"] = size
    torch.manual_seed(0)
    model = timm.create_model(name, **options)
    _assert_valid(model.train(training), torch.randn(2, 3, size, size))


def _hf_inputs(kind: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # a padded sequence
    text = {"input_ids": ids, "attention_mask": mask}
    return {
        "text": text,
        "ids": {"input_ids": ids},
        "seq2seq": {**text, "decoder_input_ids": ids[:, :4]},
        "image": {"pixel_values": torch.randn(2, 3, 32, 32)},
        "image64": {"pixel_values": torch.randn(2, 3, 64, 64)},
        "audio": {"input_values": torch.randn(2, 400)},
        "features": {"input_features": torch.randn(2, 16, 32), "decoder_input_ids": ids[:, :4]},
        "text+image": {**text, "pixel_values": torch.randn(2, 3, 32, 32)},
    }[kind]


@TRAINING
@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_transformers_model(model_type: str, training: bool) -> None:
    require(importlib.util.find_spec("transformers") is not None, "transformers is not installed")
    import transformers

    transformers.logging.set_verbosity_error()
    config, kind = HF_MODELS[model_type]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **config))
    _assert_valid(model.train(training), [], _hf_inputs(kind))


@TRAINING
def test_raft_after_a_pass(training: bool) -> None:
    # after a pass RAFT keeps its correlation pyramid (non-leaf tensors) as an attribute
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).train(training)
    images = [torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)]
    model(*images)
    _assert_valid(model, images)


def test_levit_after_an_eval_pass() -> None:
    # an eval pass fills LeViT's attention-bias cache with non-leaf tensors; validation empties it again
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    model(x)
    caches = [dict(module.attention_bias_cache) for module in model.modules()
              if hasattr(module, "attention_bias_cache")]
    _assert_valid(model, x)
    assert caches == [dict(module.attention_bias_cache) for module in model.modules()
                      if hasattr(module, "attention_bias_cache")]
