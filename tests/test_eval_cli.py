"""hlip-eval end to end on fixture-sized models and shards, and its messages for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hlip.evaluate.cli import app
from hlip.evaluate.embed import Embeddings, EvalInputError, embed_dataset, load_model
from hlip.model.factory import create_model
from hlip.model.text import default_text_model_dir
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import write_dataset

PRESET = "hlip-demo-cpu"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY_BERT = dict(
    architectures=["BertModel"],
    model_type="bert",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
    vocab_size=30522,
    type_vocab_size=2,
    pad_token_id=0,
)
PROMPTS = """
templates = ["This study shows: {}."]
[labels.finding]
positive = "a finding"
negative = "no finding"
[multiclass.diagnosis]
column = "dx"
classes = { normal = "normal anatomy", tumour = "a tumour", stroke = "a stroke" }
"""

SMALL = "img_size=[16,48,48]"  # crop grid 2x3x3 patches: fast on CPU, position tables resampled
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT config with MiniLM's tokenizer files (no weights)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    for name in TOKENIZER_FILES:
        shutil.copy(default_text_model_dir() / name, path / name)
    (path / "config.json").write_text(json.dumps(TINY_BERT))
    return path


def _studies(n: int, labelled: bool = True):
    for i in range(n):
        study = synthetic_study(f"study{i:02d}", n_scans=1 + i % 2, shape=(10 + i % 3, 40, 44), seed=i)
        study.report = f"Study {i}: {'a finding' if i % 2 else 'no finding'} and {['normal', 'tumour', 'stroke'][i % 3]}."
        study.labels = {"finding": i % 2, "dx": ["normal", "tumour", "stroke"][i % 3]} if labelled else {}
        yield study


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards")
    write_dataset(path, _studies(12))
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.toml"
    path.write_text(PROMPTS)
    return path


def _openclip_file(path: Path, tiny_text: Path, **overrides) -> Path:
    """A published-HLIP-style training file: {epoch, name, state_dict} with DDP 'module.' keys."""
    torch.manual_seed(0)
    model, _ = create_model(PRESET, text_path=tiny_text, pretrained_text=False, **overrides)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": PRESET, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_text) -> Path:
    return _openclip_file(tmp_path_factory.mktemp("ckpt") / "hlip.pt", tiny_text)


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_on_a_published_layout_checkpoint_end_to_end(tmp_path, shards, prompts, published, tiny_text):
    out = tmp_path / "eval"
    calibration = tmp_path / "calibration"  # other labelled studies choose the thresholds
    write_dataset(calibration, _studies(6))
    result = _run(
        "run", shards, "--model", published, "--preset", PRESET, "--text-model", tiny_text,
        "--prompts", prompts, "--out", out, "--tasks", "zeroshot,retrieval,probe", "--folds", "2",
        "--bootstrap", "50", "--batch-size", "5", "--set", SMALL, "--calibrate", calibration,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "macro AUC" in result.output and str(out / "report.md") in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["studies"] == 12 and metrics["run"]["preset"] == PRESET
    assert metrics["zeroshot"]["binary"]["finding"]["n"] == 12
    assert (
        metrics["run"]["calibrate"] == str(calibration) and metrics["zeroshot"]["thresholds"] == "calibrated"
    )
    assert 0 < metrics["zeroshot"]["binary"]["finding"]["threshold"] < 1
    assert len(metrics["zeroshot"]["multiclass"]["diagnosis"]["confusion_matrix"]) == 3
    assert (
        metrics["retrieval"]["n"] == 12 and 1 <= metrics["retrieval"]["image_to_report"]["median_rank"] <= 12
    )
    assert metrics["probe"]["binary"]["finding"]["folds"] == 2
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == [
        "confusion-binary.png",
        "confusion-diagnosis.png",
        "retrieval-ranks.png",
        "roc-finding.png",
    ]
    table = Embeddings.load(out / "embeddings.parquet")
    assert table.keys == sorted(table.keys) and table.image.shape == (12, 128)
    np.testing.assert_allclose(np.linalg.norm(table.image, axis=1), 1.0, atol=1e-5)
    assert table.labels[1] == {"dx": "tumour", "finding": 1}
    scores = (out / "zeroshot_scores.csv").read_text().splitlines()
    assert scores[0] == "key,finding,diagnosis:normal,diagnosis:tumour,diagnosis:stroke" and len(scores) == 13


def test_embeddings_do_not_depend_on_batch_size(shards, published, tiny_text):
    loaded = load_model(published, preset=PRESET, text_path=tiny_text, overrides=[SMALL])
    one = embed_dataset(loaded, shards, batch_size=1)
    five = embed_dataset(loaded, shards, batch_size=5)
    assert one.keys == five.keys
    np.testing.assert_allclose(one.image, five.image, atol=2e-5)
    np.testing.assert_allclose(one.report, five.report, atol=2e-5)
    assert one.meta["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_checkpoint_preset_mismatch_is_reported(tmp_path, shards, tiny_text):
    wrong = _openclip_file(tmp_path / "wide.pt", tiny_text, embed_dim=64)
    result = _run("embed", shards, "--model", wrong, "--preset", PRESET, "--text-model", tiny_text,
                   "--out", tmp_path / "e.parquet")  # fmt: skip
    assert result.exit_code == 2
    assert "does not fit preset 'hlip-demo-cpu'" in result.output and "shape mismatch" in result.output


def test_published_file_without_preset_asks_for_one(tmp_path, shards, published):
    with pytest.raises(EvalInputError, match="--preset"):
        load_model(published)
    with pytest.raises(EvalInputError, match="unknown preset 'nope'"):
        load_model(published, preset="nope")


def test_prompts_naming_an_unknown_label_fail_before_embedding(
    tmp_path, shards, prompts, published, tiny_text
):
    bad = tmp_path / "bad.toml"
    bad.write_text(PROMPTS.replace("[labels.finding]", "[labels.findings]"))
    result = _run("run", shards, "--model", published, "--preset", PRESET, "--text-model", tiny_text,
                   "--prompts", bad, "--out", tmp_path / "o", "--set", SMALL)  # fmt: skip
    assert result.exit_code == 2
    assert "'findings'" in result.output and "did you mean 'finding'" in result.output
    assert not (tmp_path / "o" / "embeddings.parquet").exists()


def test_shards_without_labels_need_a_label_table(tmp_path, prompts, published, tiny_text):
    bare = tmp_path / "bare"
    write_dataset(bare, _studies(6, labelled=False))
    args = ["run", bare, "--model", published, "--preset", PRESET, "--text-model", tiny_text,
            "--prompts", prompts, "--bootstrap", "10", "--set", SMALL]  # fmt: skip
    result = _run(*args, "--out", tmp_path / "o1")
    assert result.exit_code == 2 and "carries no labels" in result.output and "--labels" in result.output
    table = tmp_path / "labels.csv"
    table.write_text(
        "key,finding,dx\n"
        + "".join(f"study{i:02d},{i % 2},{['normal', 'stroke'][i % 2]}\n" for i in range(6))
    )
    result = _run(*args, "--out", tmp_path / "o2", "--labels", table)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert metrics["zeroshot"]["binary"]["finding"]["n_positive"] == 3
    assert metrics["zeroshot"]["multiclass"]["diagnosis"]["per_class"]["tumour"]["n"] == 0


def _train_checkpoint(run: Path, tiny_text: Path, **config) -> Path:
    """An hlip-train checkpoint (step 1, untrained weights) of a run with ``config``."""
    from hlip.train.checkpoint import build_model, checkpoint_payload, rng_state, save_checkpoint
    from hlip.train.config import TrainConfig

    config = TrainConfig(model=PRESET, text_model=str(tiny_text), max_scans=2, **config).resolve()
    model, _ = build_model(config, pretrained_text=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    payload = checkpoint_payload(model=model, optimizer=optimizer, scheduler=scheduler, step=1, config=config,
                                 data_states=[{}], rng_states=[rng_state()])  # fmt: skip
    return save_checkpoint(payload, run, keep=1)


def test_hlip_train_checkpoint_loads_without_preset(tmp_path, shards, tiny_text):
    path = _train_checkpoint(tmp_path / "run", tiny_text)
    result = _run("embed", shards, "--model", path, "--out", tmp_path / "e.parquet", "--set", SMALL)
    assert result.exit_code == 0, result.output
    table = Embeddings.load(tmp_path / "e.parquet")
    assert len(table) == 12 and table.meta["kind"] == "hlip-train"


def test_prompts_are_grounded_in_the_runs_training_reports_unless_told_otherwise(
    tmp_path, shards, prompts, tiny_text
):
    path = _train_checkpoint(tmp_path / "run", tiny_text, data=[str(shards)])
    common = ("--prompts", prompts, "--tasks", "zeroshot", "--bootstrap", "20", "--set", SMALL)
    grounded = _run("run", shards, "--model", path, "--out", tmp_path / "auto", *common)
    assert grounded.exit_code == 0, grounded.output
    zeroshot = json.loads((tmp_path / "auto" / "metrics.json").read_text())["zeroshot"]
    # 12 reports: "Study i: a finding / no finding and <dx>."
    assert zeroshot["grounding"] == {
        "data": [str(shards)],
        "reports": 12,
        "unreadable_reports": 0,
        "sentences": 12,
    }
    for label in zeroshot["binary"].values():  # fewer than MIN_REPORTS per class: sentences
        assert label["grounding"]["classes"] == "sentences" and sum(label["grounding"]["reports"]) <= 12
    plain = _run("run", shards, "--model", path, "--out", tmp_path / "none", "--ground", "none", *common)
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "none" / "metrics.json").read_text())["zeroshot"]["grounding"] == "none"
    assert (
        "nearest sentences among 12 distinct sentences of 12 training reports"
        in (tmp_path / "auto" / "report.md").read_text()
    )
    missing = _run(
        "run", shards, "--model", path, "--out", tmp_path / "x", "--ground", tmp_path / "nowhere", *common
    )
    assert missing.exit_code != 0 and "cannot read shards" in missing.output
    assert not (tmp_path / "x" / "embeddings.parquet").exists()


def test_version_pins_the_studies_that_train_and_eval_read(tmp_path, published, tiny_text):
    """A dataset that grew (study03 rebuilt with an amended report, two added) reads as it
    was at version 1 through the training stream, hlip-eval and embed_dataset."""
    from train_support import tiny_config

    from hlip.train.data import StudyFilter, TrainStream, count_studies

    data = tmp_path / "ds"
    write_dataset(data, _studies(4))
    grown = list(_studies(6))[3:]
    grown[0].report += " Addendum."
    write_dataset(data, grown)
    v1 = [f"study{i:02d}" for i in range(4)]
    for version, keys in ((1, v1), (0, [*v1, "study04", "study05"])):
        config = tiny_config(data, tmp_path / "run", f"data_version={version}")
        assert count_studies(config.data, StudyFilter.from_config(config), version) == len(keys)
        studies = {study.key: study for study in TrainStream(config, 0, 1).studies(0, 1, 0)}
        assert sorted(studies) == keys and studies["study03"].report.endswith("Addendum.") == (version == 0)
    loaded = load_model(published, preset=PRESET, text_path=tiny_text, overrides=[SMALL])
    pinned = embed_dataset(loaded, data, version=1)
    assert pinned.keys == v1 and pinned.meta["data_version"] == 1
    out = tmp_path / "e.parquet"
    args = ("embed", data, "--model", published, "--out", out, "--preset", PRESET)
    assert _run(*args, "--text-model", tiny_text, "--set", SMALL, "--version", "1").exit_code == 0
    assert Embeddings.load(out).keys == v1
