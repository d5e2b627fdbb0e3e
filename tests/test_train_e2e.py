"""End to end on CPU: `hlip-ingest synth` archives -> `hlip-ingest run` shards -> a short seeded
demo-cpu training run -> held-out studies matched to their reports, and zero-shot
classification of their planted findings; plus a corrupted shard member that training skips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from filelock import FileLock
from train_support import corrupt_chunks, read_jsonl

from hlip.evaluate.embed import embed_dataset, load_model
from hlip.evaluate.retrieval import run_retrieval
from hlip.evaluate.run import EvalOptions, run_evaluation
from hlip.shards.reader import ShardDataset
from hlip.synth import FINDINGS
from hlip.train.checkpoint import load_checkpoint
from hlip.train.config import load_config
from hlip.train.distributed import DistInfo
from hlip.train.loop import eval_grounding, train, zero_shot_metrics

# Coarse grids keep the test fast: a whole chest (about 380 x 380 x 160 mm) or head fits the
# 16x48x48 crop below (the demo uses 5x4x4 mm and the preset's 32x96x96 crop).
SPACING = ["--spacing", "CT=10,8,8", "--spacing", "MR=10,5.2,5.2"]
# Lesions twice the default size: at these grids the default 12-24 mm nodules and 15-30 mm
# hematomas are a few voxels of a 16-voxel patch, which the trunk does not learn even from labels
# (bench/demo_signal.py; docs/evaluation.md, "What limits the demo").
LESIONS = ["--lesion-scale", "2"]
TRAIN_STUDIES, HELDOUT_STUDIES = 64, 48
DEID_SECRET = "e2e-a"
"""A fixed pseudonym key: study keys order the shards, hence the studies the training stream
sees, so a random key per ingest (the default) made every run of this test a different short
training run (docs/evaluation.md gives the spread over six keys)."""
STEPS = 150
RECIPE = ["img_size=[16, 48, 48]", f"steps={STEPS}"]
"""The demo-cpu recipe on 16x48x48 crops (18 tokens per scan instead of 144): about two
minutes of training on two cores."""


def ingest_cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "hlip.ingest.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory, request):
    """Training and held-out shards from two synthetic archives (different seeds), built once
    per test session (pytest-xdist workers share the session's base directory, with a lock)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if hasattr(request.config, "workerinput") else base) / "hlip-train-synth"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / ".lock")):
        for name, studies, seed in (("train", TRAIN_STUDIES, 0), ("heldout", HELDOUT_STUDIES, 1)):
            shards = root / f"shards-{name}"
            if not (shards / "manifest.parquet").exists():
                archive = root / f"archive-{name}"
                if not (archive / "reports.csv").exists():
                    ingest_cli(
                        "synth",
                        "--out",
                        str(archive),
                        "--studies",
                        str(studies),
                        "--seed",
                        str(seed),
                        *LESIONS,
                    )
                ingest_cli(
                    "run",
                    str(archive),
                    "--reports",
                    str(archive / "reports.csv"),
                    "--out",
                    str(shards),
                    *SPACING,
                    "--workers",
                    "0",
                    "--secret",
                    DEID_SECRET,
                )
    return root / "shards-train", root / "shards-heldout"


def test_demo_training_lowers_the_loss_and_finds_planted_findings_zero_shot(synth_shards, tmp_path):
    """A short seeded demo-cpu run lowers the contrastive loss, pairs unseen studies with their
    own reports better than chance, and classifies planted findings of unseen studies zero-shot
    above chance: its best finding clearly, the six on average.

    "Clearly": with 6-12 positives among 16-28 studies of a modality, one finding's AUC under
    chance has a standard deviation of about 0.12, so the best of six reaching 0.9 has a chance
    probability of a few in a thousand. A run this short finds the large findings; whether the
    others score above or below 0.5 still depends on the order it saw the studies in (measured
    over six pseudonym keys in docs/evaluation.md: best 0.82-1.00, macro 0.57-0.69).
    """
    train_dir, heldout = synth_shards
    config = load_config(
        "demo-cpu",
        [
            f'data=["{train_dir}"]',
            f'out="{tmp_path / "run"}"',
            *RECIPE,
            "progress=false",
            "tensorboard=false",
            f"checkpoint_every={STEPS}",
            "num_workers=0",
        ],
    )
    result = train(config)
    losses = [r["loss"] for r in read_jsonl(result.run_dir / "metrics.jsonl")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3

    loaded = load_model(result.checkpoint)
    embeddings = embed_dataset(loaded, heldout)
    retrieval, ranks = run_retrieval(embeddings.image, embeddings.report, embeddings.has_report)
    chance = (retrieval["n"] + 1) / 2  # expected rank of the true report among n, at random
    print(f"held-out image->report retrieval after {STEPS} steps: {retrieval['image_to_report']}")
    assert retrieval["n"] >= 20 and ranks["image_to_report"].mean() < 0.75 * chance

    model, tokenizer, _ = load_checkpoint(result.checkpoint)
    evaluation = load_config(
        str(result.run_dir / "config.json"), [f'val_data=["{heldout}"]', 'prompts="synth"']
    )
    metrics = zero_shot_metrics(model, tokenizer, evaluation, "cpu")
    (result.run_dir / "zeroshot.json").write_text(json.dumps(metrics, indent=2))
    aucs = {
        k.split("/")[1]: v for k, v in metrics.items() if k.startswith("binary/") and k.endswith("/auc/value")
    }
    print(f"held-out zero-shot AUC after {STEPS} steps: macro {metrics['macro/auc/value']:.3f}, {aucs}")
    assert sorted(aucs) == sorted(f for f, finding in FINDINGS.items() if finding.kind in ("CT", "MR"))
    assert max(aucs.values()) >= 0.9 and metrics["macro/auc/value"] > 0.55, aucs

    # Grounded in the training reports, training's zero-shot gives what hlip-eval gives.
    evaluation.eval_every = 1
    grounding = eval_grounding(evaluation, tokenizer, DistInfo())
    grounded = zero_shot_metrics(model, tokenizer, evaluation, "cpu", grounding)
    assert (
        "grounding/sentences" not in metrics
        and grounded["grounding/sentences"] == len(grounding.sentences) > 0
    )
    options = EvalOptions(
        str(result.checkpoint),
        str(heldout),
        str(tmp_path / "eval"),
        prompts="synth",
        tasks=["zeroshot"],
        bootstrap=0,
    )
    expected = run_evaluation(options).metrics["zeroshot"]
    assert expected["grounding"]["data"] == [str(train_dir)]
    for label, value in expected["binary"].items():
        assert grounded[f"binary/{label}/auc/value"] == pytest.approx(value["auc"]["value"], abs=1e-3), label


def test_a_corrupted_member_is_skipped_and_training_goes_on(synth_shards, tmp_path):
    train_dir, _ = synth_shards
    copy = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(train_dir), str(copy)], check=True)
    bad = sorted(ShardDataset(copy).keys())[3]
    corrupt_chunks(copy, bad)
    config = load_config(
        "demo-cpu",
        [
            f'data=["{copy}"]',
            f'out="{tmp_path / "run"}"',
            "steps=3",
            "batch_size=12",
            "max_scans=1",
            "progress=false",
            "tensorboard=false",
            "checkpoint_every=100",
            "log_keys=true",
            "num_workers=0",
            "shuffle_buffer=0",
        ],
    )
    train(config)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in records][-1] >= 1
    seen = [row["key"] for row in read_jsonl(tmp_path / "run" / "keys-rank0.jsonl")]
    assert bad not in seen and len(seen) == 36
