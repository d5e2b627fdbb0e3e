"""HLIPCLIP: published key layout, encoders, logit parameters, locking, checkpointing, autocast, loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from hlip.model.checkpoint import vision_kwargs
from hlip.model.clip import HLIPCLIP, CheckpointMismatchError, load_openclip_checkpoint
from hlip.model.packing import PackedStudies, pack_studies
from hlip.model.presets import create_vision
from hlip.model.text import TextTower, Tokenizer
from hlip.model.vision import HierarchicalViT

TINY_BERT = BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def make_trunk() -> HierarchicalViT:
    torch.manual_seed(0)
    return create_vision("vit_nano_multiscan_h3")


def make_packed(n_studies: int = 3) -> PackedStudies:
    """Studies of 1-2 scans with different depths and in-plane sizes."""
    gen = torch.Generator().manual_seed(5)
    studies = [
        [torch.randn(8 + 4 * i, 16, 16 + 8 * s, generator=gen) for i in range(1 + s % 2)]
        for s in range(n_studies)
    ]
    return pack_studies(studies, make_trunk().patch_size)


def make_model(siglip: bool = False, **kwargs) -> HLIPCLIP:
    torch.manual_seed(0)
    text = TextTower.from_config(TINY_BERT, embed_dim=16, pooling="cls")
    return HLIPCLIP(make_trunk(), text, siglip=siglip, **kwargs).eval()


@pytest.fixture(scope="module")
def tokens():
    return Tokenizer(None, context_length=16)(["left pleural effusion", "no acute findings", "cardiomegaly"])


def test_state_dict_follows_the_open_clip_layout():
    for siglip in (False, True):
        keys = set(make_model(siglip).state_dict())
        top = {k for k in keys if not k.startswith(("visual.trunk.", "text.transformer."))}
        expected = {"visual.head.proj.weight", "text.proj.weight", "logit_scale"} | (
            {"logit_bias"} if siglip else set()
        )
        assert top == expected
        assert {k.removeprefix("visual.trunk.") for k in keys if k.startswith("visual.trunk.")} == set(
            make_trunk().state_dict()
        )
        assert not any(k.startswith("text.transformer.pooler") for k in keys)
    model = make_model()
    assert model.visual.head.proj.weight.shape == (16, model.visual.trunk.embed_dim)
    assert model.state_dict()["logit_scale"].shape == ()


def test_logit_parameters_start_as_in_clip_and_siglip():
    clip, siglip = make_model(), make_model(siglip=True)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.logit_bias is None
    assert siglip.logit_scale.item() == pytest.approx(math.log(10))
    assert siglip.logit_bias.item() == pytest.approx(-10.0)


def test_encoders_project_the_towers(tokens):
    model = make_model()
    packed = make_packed()
    with torch.no_grad():
        image = model.encode_image(packed)
        torch.testing.assert_close(
            image, model.visual.trunk.forward_packed(packed) @ model.visual.head.proj.weight.T
        )
        text = model.encode_text(tokens)
        torch.testing.assert_close(text, model.text(**tokens))
        out = model(packed, tokens)
    assert image.shape == text.shape == (3, 16)
    torch.testing.assert_close(out["image_features"], torch.nn.functional.normalize(image, dim=-1))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    assert "logit_bias" not in out


def test_logit_scale_is_clamped_at_100(tokens):
    model = make_model(siglip=True)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
        out = model(make_packed(), tokens)
    torch.testing.assert_close(out["logit_scale"], torch.tensor(100.0))
    assert out["logit_bias"] is model.logit_bias


def test_lock_text_keeps_projection_and_vision_trainable():
    model = make_model()
    fixed = {n for n, p in model.named_parameters() if not p.requires_grad}  # position tables
    model.lock_text(unlocked_layers=0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} - fixed
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("text.transformer.")}
    model = make_model()
    model.lock_text(unlocked_layers=1)
    trainable_text = {n for n, p in model.text.transformer.named_parameters() if p.requires_grad}
    assert trainable_text and all(n.startswith("encoder.layer.1.") for n in trainable_text)


def test_grad_checkpointing_switches_both_towers():
    model = make_model()
    model.set_grad_checkpointing(True)
    assert model.visual.trunk.grad_checkpointing
    assert model.text.transformer.is_activation_checkpointing


def test_bf16_autocast_returns_float32_features_close_to_fp32(tokens):
    reference, autocast = make_model(), make_model(autocast_dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = reference(make_packed(), tokens), autocast(make_packed(), tokens)
    for key in ("image_features", "text_features"):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], atol=0.05, rtol=0.05)


def _training_file(model: HLIPCLIP, path, extra: dict | None = None):
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update(extra or {})
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path
    )


def test_load_training_file_with_module_prefix_and_position_ids(tmp_path, tokens):
    source = make_model()
    with torch.no_grad():
        source.logit_scale.fill_(3.0)
    position_ids = torch.arange(TINY_BERT.max_position_embeddings).unsqueeze(0)
    _training_file(
        source, tmp_path / "epoch_3.pt", {"module.text.transformer.embeddings.position_ids": position_ids}
    )
    torch.manual_seed(123)
    target = HLIPCLIP(make_trunk(), TextTower.from_config(TINY_BERT, 16)).eval()
    load_openclip_checkpoint(target, tmp_path / "epoch_3.pt")
    with torch.no_grad():
        for key, value in source(make_packed(), tokens).items():
            torch.testing.assert_close(target(make_packed(), tokens)[key], value, msg=key)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    state = {k: v for k, v in make_model().state_dict().items() if k != "text.proj.weight"}
    state["text.transformer.base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"] = (
        torch.zeros(8, 32)
    )
    state["visual.head.proj.weight"] = torch.zeros(512, 48)
    with pytest.raises(CheckpointMismatchError) as error:
        load_openclip_checkpoint(make_model(), state)
    message = str(error.value)
    assert "1 missing from checkpoint: text.proj.weight" in message
    assert "lora_A" in message and "LoRA" in message
    assert "visual.head.proj.weight (512, 48) vs model (16, 48)" in message


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"


def _reference_fixture():
    if not (REFERENCE / "fixture_a" / "weights.safetensors").is_file():
        raise FileNotFoundError(f"reference fixtures missing under {REFERENCE.resolve()}")
    config = json.loads((REFERENCE / "fixture_a" / "config.json").read_text())
    return (
        config["constructor_kwargs"],
        load_file(REFERENCE / "fixture_a" / "weights.safetensors"),
        load_file(REFERENCE / "fixture_a" / "expected.safetensors"),
        load_file(REFERENCE / "inputs.safetensors"),
    )


def test_published_layout_checkpoint_reproduces_reference_and_bert(tmp_path, tokens):
    """A training file assembled key by key in the released layout (reference trunk weights,
    pooler-free BertModel, position_ids as older transformers saved them, DDP prefixes) loads
    with no missing/unexpected keys, and the features equal the reference's pooled output and
    BERT's CLS state through the stored projections."""
    kwargs, trunk_weights, expected, inputs = _reference_fixture()
    gen = torch.Generator().manual_seed(7)
    bert = BertModel(TINY_BERT, add_pooling_layer=False).eval()
    visual_proj, text_proj = torch.randn(16, 96, generator=gen), torch.randn(16, 32, generator=gen)
    state = {f"visual.trunk.{k}": v for k, v in trunk_weights.items()}
    state |= {f"text.transformer.{k}": v for k, v in bert.state_dict().items()}
    state["text.transformer.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    state |= {
        "visual.head.proj.weight": visual_proj,
        "text.proj.weight": text_proj,
        "logit_scale": torch.tensor(4.6),
    }
    torch.save(
        {"epoch": 10, "name": "hlip", "state_dict": {f"module.{k}": v for k, v in state.items()}},
        tmp_path / "f.pt",
    )

    trunk = HierarchicalViT(**vision_kwargs(kwargs))  # fresh random weights: the file must supply all
    model = HLIPCLIP(trunk, TextTower.from_config(TINY_BERT, embed_dim=16)).eval()
    load_openclip_checkpoint(model, tmp_path / "f.pt")

    cases = ("n1", "n3", "n2_interp")
    studies = [[scan[0] for scan in inputs[case][0]] for case in cases]
    with torch.no_grad():
        image = model.encode_image(pack_studies(studies, trunk.patch_size))
        text = model.encode_text(tokens)
        cls = bert(**tokens).last_hidden_state[:, 0]
    pooled = torch.cat([expected[f"{case}.pooled"] for case in cases])
    torch.testing.assert_close(image, pooled @ visual_proj.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, cls @ text_proj.T)
    assert model.logit_scale.item() == pytest.approx(4.6)
