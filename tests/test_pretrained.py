"""Portable model folders: hlip-train export, hlip.load, and embedding one study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from train_support import tiny_config, write_fake_dataset
from typer.testing import CliRunner

import hlip
from hlip.evaluate.cli import app as eval_app
from hlip.evaluate.embed import Embeddings, embed_dataset, load_model
from hlip.ingest.config import IngestConfig
from hlip.ingest.pipeline import run_ingest
from hlip.shards.reader import ShardDataset
from hlip.train.checkpoint import read_checkpoint
from hlip.train.cli import app as train_app
from hlip.train.loop import train

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DICOM_STUDY = SHARED / "dicom2nifti" / "tests" / "data" / "hyperfine" / "anatomical" / "001"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step nano run and its exported model folder."""
    root = tmp_path_factory.mktemp("pretrained")
    dataset = write_fake_dataset(root / "shards", 6)
    result = train(tiny_config(dataset, root / "run", "steps=2"))
    folder = root / "model"
    exported = runner.invoke(train_app, ["export", str(result.run_dir), "--out", str(folder)])
    assert exported.exit_code == 0, exported.output
    return dataset, result.run_dir, folder


def test_export_writes_weights_configs_and_tokenizer_only(trained):
    _, run_dir, folder = trained
    assert (folder / "model.safetensors").is_file() and not (folder / "text" / "model.safetensors").exists()
    assert {"vocab.txt", "tokenizer.json", "config.json"} <= {p.name for p in (folder / "text").iterdir()}
    described = json.loads((folder / "config.json").read_text())
    trained_config = json.loads((run_dir / "config.json").read_text())
    assert described["preset"] == trained_config["model"] == "hlip-demo-cpu"
    assert described["train_config"]["ct_windows"] == trained_config["ct_windows"]
    assert described["model_config"]["vision"]["name"] == "vit_nano_multiscan_h3"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == set(read_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])


def test_loaded_folder_embeds_as_the_checkpoint_and_through_hlip_eval(trained, tmp_path):
    dataset, run_dir, folder = trained
    reference = embed_dataset(load_model(run_dir, device="cpu"), dataset)
    model = hlip.load(str(folder), device="cpu")
    np.testing.assert_allclose(embed_dataset(model, dataset).image, reference.image, atol=1e-5)
    result = runner.invoke(
        eval_app, ["embed", str(dataset), "-m", str(folder), "-o", str(tmp_path / "e.parquet")]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(Embeddings.load(tmp_path / "e.parquet").report, reference.report, atol=1e-5)
    key = reference.keys[3]
    vector = model.embed_study(hlip.open_study(str(dataset), key))
    np.testing.assert_allclose(vector, reference.image[3], atol=1e-5)
    texts = model.embed_text(["A bright cube is present.", "No cube is seen."])
    assert texts.shape == (2, model.model.embed_dim)


@pytest.mark.skipif(not DICOM_STUDY.is_dir(), reason="needs ../shared/data")
def test_a_dicom_folder_embeds_as_its_ingested_study(trained, tmp_path):
    model = hlip.load(str(trained[2]), device="cpu")
    vector = model.embed_study(DICOM_STUDY)
    assert vector.shape == (model.model.embed_dim,) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
    config = IngestConfig(allow_missing_report=True)
    run_ingest([DICOM_STUDY], tmp_path / "ds", config, workers=0)
    (key,) = ShardDataset(tmp_path / "ds").keys()
    np.testing.assert_allclose(
        model.embed_study(hlip.open_study(str(tmp_path / "ds"), key)), vector, atol=1e-6
    )


def test_a_folder_of_several_studies_is_refused(trained, tmp_path):
    model = hlip.load(str(trained[2]), device="cpu")
    with pytest.raises(ValueError, match="expected the files of one study, found 0"):
        model.embed_study(tmp_path)
