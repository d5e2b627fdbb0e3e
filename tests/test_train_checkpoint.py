"""Checkpoints: atomic files, pruning, RNG round trip, load_checkpoint and the open_clip export."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from train_support import tiny_config, write_fake_dataset

from hlip.model.clip import load_openclip_checkpoint
from hlip.model.text import split_sentences
from hlip.shards.reader import ShardDataset
from hlip.train import checkpoint as ckpt
from hlip.train.config import TrainConfig
from hlip.train.data import Collate, StudyTransform
from hlip.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run of the nano model with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("ckpt")
    dataset = write_fake_dataset(root / "ds", 8)
    config = tiny_config(dataset, root / "run", "steps=4", "checkpoint_every=2", "keep_checkpoints=1")
    return train(config), config, dataset


def test_run_writes_step_files_last_and_prunes(run):
    result, config, _ = run
    files = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert files == ["last.pt", "openclip.pt", "step-00000004.pt"]  # keep_checkpoints = 1
    last = ckpt.read_checkpoint(result.checkpoint)
    assert last["step"] == 4 and last["world_size"] == 1
    assert last["config"] == config.to_dict()
    assert (result.run_dir / "config.json").is_file()


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    payload = {"step": 7, "format": ckpt.FORMAT, "version": ckpt.VERSION}
    for step in (1, 2, 3):
        ckpt.save_checkpoint({**payload, "step": step}, tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "step-00000002.pt", "step-00000003.pt"]
    assert ckpt.read_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_load_checkpoint_rebuilds_the_trained_model(run):
    result, config, dataset = run
    model, tokenizer, loaded_config = ckpt.load_checkpoint(result.checkpoint)
    assert not model.training and loaded_config == config
    saved = ckpt.read_checkpoint(result.checkpoint)["model"]
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    shards = ShardDataset(dataset)
    transform = StudyTransform(loaded_config, train=False)
    packed, tokens, keys = Collate(tokenizer, model.visual.trunk.patch_size)(
        [transform(shards.open(k)) for k in shards.keys()[:3]]
    )
    with torch.no_grad():
        out = model(packed, tokens)
    assert out["image_features"].shape == (3, model.embed_dim) and len(keys) == 3


@pytest.mark.parametrize(
    ("device", "amx", "avx512_bf16", "expected"),
    [
        ("cuda", False, False, "bf16"),
        ("cpu", True, False, "bf16"),
        ("cpu", False, True, "bf16"),
        ("cpu", False, False, "fp32"),
        ("mps", True, True, "fp32"),
    ],
)
def test_bf16_autocast_only_where_the_device_computes_bf16(monkeypatch, device, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert ckpt.model_kwargs(TrainConfig(precision="bf16"), device)["precision"] == expected
    assert ckpt.model_kwargs(TrainConfig(precision="fp32"), device)["precision"] == "fp32"


def test_a_bf16_run_on_cpu_trains_and_reloads_as_it_ran(tmp_path):
    dataset = write_fake_dataset(tmp_path / "ds", 8)
    result = train(tiny_config(dataset, tmp_path / "run", "steps=2", "precision=bf16"))
    assert result.step == 2 and np.isfinite(result.loss)
    model, _, _ = ckpt.load_checkpoint(result.checkpoint)
    native = ckpt.native_bf16("cpu")
    assert model.model_config["precision"] == ("bf16" if native else "fp32")
    assert model.autocast_dtype == (torch.bfloat16 if native else None)


def test_export_openclip_layout_loads_into_a_fresh_model(run, tmp_path):
    result, config, _ = run
    path = ckpt.export_openclip(result.checkpoint, tmp_path / "hlip.pt")
    exported = torch.load(path, weights_only=True)
    assert set(exported) == {"epoch", "step", "name", "state_dict"} and exported["name"] == config.model
    keys = set(exported["state_dict"])
    assert {"visual.head.proj.weight", "text.proj.weight", "logit_scale"} <= keys
    assert all(k.startswith(ckpt.OPENCLIP_PREFIXES) or k in ckpt.OPENCLIP_SCALARS for k in keys)
    assert any(k.startswith("visual.trunk.blocks.") for k in keys)
    assert any(k.startswith("text.transformer.encoder.") for k in keys)
    fresh, _ = ckpt.build_model(config, pretrained_text=False)
    load_openclip_checkpoint(fresh, path)
    trained = ckpt.read_checkpoint(result.checkpoint)["model"]
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


def test_a_model_the_open_clip_layout_cannot_describe_is_not_exported(run, tmp_path):
    """open_clip's HLIP encoder pools the cls token: weights of a token+max model would load
    there and silently give other embeddings, so the export refuses them."""
    result, _, _ = run
    payload = ckpt.read_checkpoint(result.checkpoint)
    payload["config"]["model_overrides"]["vision"]["pool"] = "token+max"
    with pytest.raises(ValueError, match="pools the cls token only"):
        ckpt.export_openclip(payload, tmp_path / "hlip.pt")
    assert not (tmp_path / "hlip.pt").exists()


def test_an_open_clip_file_is_not_mistaken_for_a_training_checkpoint(run):
    result, _, _ = run
    with pytest.raises(ValueError, match="load_openclip_checkpoint"):
        ckpt.read_checkpoint(result.run_dir / "checkpoints" / "openclip.pt")


def test_find_resume(tmp_path, run):
    result, _, _ = run
    assert ckpt.find_resume("", tmp_path) is None
    assert ckpt.find_resume("auto", tmp_path) is None
    assert ckpt.find_resume("auto", result.run_dir) == result.checkpoint
    assert ckpt.find_resume(str(result.run_dir), tmp_path) == result.checkpoint
    with pytest.raises(FileNotFoundError):
        ckpt.find_resume(str(tmp_path / "none.pt"), tmp_path)


def test_sentence_mean_run_reloads_with_its_tokenizer(tmp_path):
    """A model trained on sentence-mean reports is evaluated the same way after loading."""
    dataset = write_fake_dataset(tmp_path / "ds", 8)
    text = "model_overrides.text={context_length = 16, sentence_mean = true}"
    result = train(tiny_config(dataset, tmp_path / "run", "steps=2", text))
    model, tokenizer, config = ckpt.load_checkpoint(result.checkpoint)
    assert tokenizer.sentence_mean and model.model_config["text"]["sentence_mean"]
    shards = ShardDataset(dataset)
    transform = StudyTransform(config, train=False)
    studies = [transform(shards.open(k)) for k in shards.keys()[:3]]
    packed, tokens, _ = Collate(tokenizer, model.visual.trunk.patch_size)(studies)
    sentences = [len(split_sentences(study["text"]) or [""]) for study in studies]
    assert tokens["text_index"].tolist() == [i for i, n in enumerate(sentences) for _ in range(n)]
    with torch.no_grad():
        assert model(packed, tokens)["text_features"].shape == (3, model.embed_dim)
