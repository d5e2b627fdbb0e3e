"""Model factory: presets, the built-in MiniLM default, user text-model directories, overrides."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel

from hlip.model.clip import HLIPCLIP
from hlip.model.factory import MODEL_PRESETS, PUBLISHED, create_model, resolve_model_config
from hlip.model.losses import create_loss
from hlip.model.packing import pack_studies
from hlip.model.presets import VISION_PRESETS
from hlip.model.text import default_text_model_dir

# Shrinks the ViT-B presets for tests while keeping their depth, block levels and position tables.
SMALL_VISION = {"embed_dim": 96, "num_heads": 2}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local BiomedBERT-like directory: tiny BERT weights + a BERT WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("biomedbert")
    torch.manual_seed(3)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_text_model_dir() / name, path / name)
    return path


@pytest.fixture(scope="module")
def demo():
    return create_model("hlip-demo-cpu")


def test_presets_cover_the_published_models():
    assert {"hlip-demo-cpu", "hlip-ct-rate", "hlip-brain-mri", *PUBLISHED} <= MODEL_PRESETS.keys()
    for name, config in MODEL_PRESETS.items():
        assert config["vision"]["name"] in VISION_PRESETS, name
        assert config["loss"] == "clip"
    ct, brain = MODEL_PRESETS["hlip-ct-rate"], MODEL_PRESETS["hlip-brain-mri"]
    assert ct["vision"]["name"] == "vit_base_singlescan_h2_token2744" and ct["embed_dim"] == 512
    assert ct["text"]["context_length"] == 512 and "CXR-BERT" in ct["text"]["requires"]
    assert brain["vision"]["name"] == "vit_base_multiscan_h2_token1176" and brain["embed_dim"] == 512
    assert brain["text"]["context_length"] == 256 and "BiomedBERT" in brain["text"]["requires"]


def test_demo_preset_needs_nothing_and_trains_a_step(demo):
    model, tokenizer = demo
    assert isinstance(model, HLIPCLIP) and model.embed_dim == 128 and model.logit_bias is None
    assert model.text.pooling == "mean" and tokenizer.context_length == 128
    assert tokenizer.path == default_text_model_dir()
    gen = torch.Generator().manual_seed(0)
    studies = [[torch.randn(16, 32, 32, generator=gen)], [torch.randn(24, 32, 48, generator=gen)] * 2]
    out = model.train()(pack_studies(studies, model.visual.trunk.patch_size), tokenizer(["a", "b"]))
    loss = create_loss(model.model_config["loss"])(**out)
    loss.backward()
    assert torch.isfinite(loss) and model.visual.head.proj.weight.grad.abs().sum() > 0
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)


@pytest.mark.parametrize("name", ["hlip-ct-rate", "hlip-brain-mri", *PUBLISHED])
def test_presets_trained_with_a_biomedical_text_model_ask_for_its_directory(name):
    with pytest.raises(FileNotFoundError, match="--text-model DIR") as error:
        create_model(name)
    assert MODEL_PRESETS[name]["text"]["requires"] in str(error.value)


def test_user_text_model_dir_builds_the_published_layout(bert_dir):
    model, tokenizer = create_model("hlip-brain-mri", text_path=bert_dir, vision=SMALL_VISION)
    assert tokenizer.context_length == 256 and model.text.pooling == "cls" and model.embed_dim == 512
    keys = model.state_dict().keys()
    assert "visual.trunk.sequential_posemb" in keys and "visual.trunk.blocks.11.mlp.fc2.weight" in keys
    assert model.visual.trunk.patch_size == (8, 16, 16)
    saved = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).state_dict()
    for key, value in model.text.transformer.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_config_only_text_tower_skips_the_weights(bert_dir):
    model, _ = create_model("hlip-ct-rate", text_path=bert_dir, pretrained_text=False, vision=SMALL_VISION)
    assert "visual.trunk.sequential_posemb" not in model.state_dict()  # single-scan model
    saved = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).state_dict()
    word = "embeddings.word_embeddings.weight"
    assert not torch.equal(model.text.transformer.state_dict()[word], saved[word])


def test_overrides_reach_the_model():
    model, tokenizer = create_model(
        "hlip-demo-cpu",
        loss="siglip",
        precision="bf16",
        grad_checkpointing=True,
        embed_dim=64,
        text={"context_length": 32, "sentence_mean": True, "drop_measurements": True},
        vision={"name": "vit_nano_multiscan_h3"},
    )
    assert tokenizer.sentence_mean and model.model_config["text"]["sentence_mean"]
    assert tokenizer.drop_measurements and model.model_config["text"]["drop_measurements"]
    assert model.logit_bias is not None and model.autocast_dtype == torch.bfloat16
    assert model.visual.trunk.grad_checkpointing and model.text.transformer.is_activation_checkpointing
    assert model.embed_dim == 64 and tokenizer.context_length == 32 and model.visual.trunk.embed_dim == 48


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="unknown model option"):
        create_model("hlip-demo-cpu", embed=64)
    with pytest.raises(ValueError, match="loss"):
        resolve_model_config("hlip-demo-cpu", loss="triplet")
    with pytest.raises(KeyError, match="unknown model"):
        resolve_model_config("vit_large")
    with pytest.raises(ValueError, match="exceeds"):
        create_model("hlip-demo-cpu", text={"context_length": 1024})


def test_stored_config_rebuilds_the_same_model(demo):
    model, _ = demo
    stored = json.loads(json.dumps(model.model_config))
    rebuilt, tokenizer = create_model(stored, pretrained_text=False)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert tokenizer.context_length == 128 and not tokenizer.sentence_mean


@pytest.mark.parametrize("option", ["sentence_mean", "drop_measurements"])
def test_config_stored_before_a_text_option_reads_texts_as_before(demo, option):
    stored = json.loads(json.dumps(demo[0].model_config))
    del stored["text"][option]
    assert not getattr(create_model(stored, pretrained_text=False)[1], option)
    stored["text"][option] = True
    assert getattr(create_model(stored, pretrained_text=False)[1], option)


def test_sentence_mean_model_gives_one_feature_per_report():
    model, tokenizer = create_model("hlip-demo-cpu", text={"sentence_mean": True})
    gen = torch.Generator().manual_seed(0)
    studies = [[torch.randn(16, 32, 32, generator=gen)], [torch.randn(24, 32, 48, generator=gen)]]
    tokens = tokenizer(["No nodule. Large effusion. Normal heart.", "Mild hydrocephalus."])
    out = model.train()(pack_studies(studies, model.visual.trunk.patch_size), tokens)
    create_loss("clip")(**out).backward()
    assert tokens["input_ids"].shape[0] == 4
    assert out["text_features"].shape == (2, 128) and model.text.proj.weight.grad.abs().sum() > 0
