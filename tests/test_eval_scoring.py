"""Zero-shot scoring, retrieval and the linear probe on embeddings with known geometry."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

from hlip.evaluate.metrics import MetricWarning
from hlip.evaluate.probe import cross_validate, run_probe
from hlip.evaluate.prompts import parse_prompts
from hlip.evaluate.retrieval import run_retrieval
from hlip.evaluate.zeroshot import (
    SentenceBank,
    calibrate_thresholds,
    class_probabilities,
    l2_normalize,
    run_zeroshot,
)

DIM = 64


class FakeTextTower:
    """Each distinct sentence gets its own basis direction (orthogonal); calls are recorded."""

    def __init__(self) -> None:
        self.table: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []

    def __call__(self, sentences):
        self.calls.append(list(sentences))
        for s in sentences:
            self.table.setdefault(s, np.eye(DIM)[len(self.table)])
        return np.stack([self.table[s] for s in sentences])


PROMPTS = parse_prompts(
    {
        "template_sets": {"two": ["A: {}.", "B: {}."]},
        "templates": "two",
        "labels": {
            "nodule": {"positive": ["nodule", "mass"], "negative": "no nodule"},
            "effusion": {"positive": "effusion", "negative": "no effusion"},
            "bleed": {"positive": "bleed"},
        },
        "multiclass": {"dx": {"classes": {"normal": "normal", "glioma": "glioma", "stroke": "stroke"}}},
    }
)


def _planted(tower: FakeTextTower, n: int = 60, seed: int = 1):
    """Studies whose image embedding sits near the class embedding of their true labels."""
    bank = SentenceBank.for_prompts(tower, PROMPTS)
    rng = np.random.default_rng(seed)
    labels, images = [], []
    for _ in range(n):
        study = {name: int(rng.integers(0, 2)) for name in ("nodule", "effusion", "bleed")}
        study["dx"] = ["normal", "glioma", "stroke"][rng.integers(0, 3)]
        vec = np.zeros(DIM)
        for label in PROMPTS.binary:
            phrases = label.positive if study[label.name] else (label.negative or ("__absent__",))
            if phrases != ("__absent__",):
                vec += bank.class_embeddings([phrases], label.templates)[0].mean(axis=0)
        task = PROMPTS.multiclass[0]
        vec += 2 * bank.class_embeddings([task.phrases[task.classes.index(study["dx"])]], task.templates)[
            0
        ].mean(0)
        labels.append(study)
        images.append(vec + rng.normal(scale=0.05, size=DIM))
    return np.stack(images), labels


def test_sentences_are_embedded_once():
    tower = FakeTextTower()
    with pytest.warns(MetricWarning, match="no study is annotated"):
        run_zeroshot(np.ones((3, DIM)), [{}] * 3, PROMPTS, tower, 100.0, n_boot=5)
    assert len(tower.calls) == 1
    assert len(tower.calls[0]) == len(set(tower.calls[0])) == 2 * (3 + 1 + 1 + 1 + 3)


def test_embedding_ensemble_is_the_normalised_mean_then_one_softmax():
    rng = np.random.default_rng(0)
    image = l2_normalize(rng.normal(size=(4, DIM)))
    classes = l2_normalize(rng.normal(size=(2, 3, DIM)))
    mean = l2_normalize(classes.mean(axis=1))
    logits = 50 * image @ mean.T
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(class_probabilities(image, classes, 50, "embedding"), expected, rtol=1e-10)
    per_template = [class_probabilities(image, classes[:, t : t + 1], 50, "embedding") for t in range(3)]
    np.testing.assert_allclose(
        class_probabilities(image, classes, 50, "probability"), np.mean(per_template, 0)
    )


def test_zero_shot_recovers_planted_labels():
    tower = FakeTextTower()
    images, labels = _planted(tower)
    calibration = calibrate_thresholds(*_planted(tower, seed=2), PROMPTS, tower, logit_scale=100.0)
    assert set(calibration) == {"nodule", "effusion", "bleed"}  # similarity-scored labels too
    result = run_zeroshot(images, labels, PROMPTS, tower, 100.0, thresholds=calibration, n_boot=50)
    binary = result.metrics["binary"]
    assert result.metrics["thresholds"] == "calibrated"
    for name in ("nodule", "effusion", "bleed"):
        assert binary[name]["auc"]["value"] > 0.9
        assert binary[name]["threshold"] == calibration[name]
        assert binary[name]["balanced_accuracy"]["value"] > 0.9
    assert result.metrics["macro"]["auc"]["n_labels"] == 3
    assert result.metrics["macro"]["balanced_accuracy"]["n_labels"] == 3
    dx = result.metrics["multiclass"]["dx"]
    assert dx["balanced_accuracy"]["value"] == 1.0
    assert np.trace(dx["confusion_matrix"]) == len(labels)
    assert result.scores["dx"].shape == (len(labels), 3)


def test_without_calibration_only_a_stated_threshold_gives_thresholded_metrics():
    tower = FakeTextTower()
    images, labels = _planted(tower)
    bare = run_zeroshot(images, labels, PROMPTS, tower, 100.0, n_boot=0)
    assert bare.metrics["thresholds"] == "none"
    assert all("sensitivity" not in m and "threshold" not in m for m in bare.metrics["binary"].values())
    assert "balanced_accuracy" not in bare.metrics["macro"]
    fixed = run_zeroshot(images, labels, replace(PROMPTS, threshold=0.5), tower, 100.0, n_boot=0)
    assert fixed.metrics["thresholds"] == "fixed"
    assert fixed.metrics["binary"]["nodule"]["threshold"] == 0.5
    assert "threshold" not in fixed.metrics["binary"]["bleed"]  # a similarity is no probability


def test_calibration_skips_a_label_with_one_class():
    tower = FakeTextTower()
    images, labels = _planted(tower)
    only_negative = [{**study, "bleed": 0} for study in labels]
    with pytest.warns(MetricWarning, match="Youden threshold undefined"):
        cuts = calibrate_thresholds(images, only_negative, PROMPTS, tower, 100.0)
    assert set(cuts) == {"nodule", "effusion"}


def test_zero_shot_is_reproducible_and_skips_unannotated_studies():
    tower = FakeTextTower()
    images, labels = _planted(tower)
    labels[0]["nodule"] = None
    first = run_zeroshot(images, labels, PROMPTS, tower, 100.0, n_boot=100, seed=3).metrics
    assert first == run_zeroshot(images, labels, PROMPTS, tower, 100.0, n_boot=100, seed=3).metrics
    assert first["binary"]["nodule"]["n"] == len(labels) - 1


def test_retrieval_perfect_and_chance():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, DIM))
    results, ranks = run_retrieval(emb, emb * 3)
    assert results["image_to_report"]["recall@1"] == 1.0 and results["report_to_image"]["median_rank"] == 1
    shuffled, _ = run_retrieval(emb, emb[::-1])
    assert shuffled["image_to_report"]["recall@1"] == 0.0
    assert ranks["image_to_report"].shape == (20,)


def test_retrieval_leaves_out_studies_without_reports():
    emb = np.eye(4)
    text = emb.copy()
    text[3] = text[0]  # an empty report would collide with study 0
    results, _ = run_retrieval(emb, text, has_report=np.array([1, 1, 1, 0], bool))
    assert (results["n"], results["n_without_report"]) == (3, 1)
    assert results["image_to_report"]["recall@1"] == 1.0


def test_probe_separable_random_and_reproducible():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    separable = rng.normal(size=(60, 8)) + y[:, None] * 3
    out = cross_validate(separable, y, name="sep", seed=0)
    assert out["folds"] == 5 and out["auc"]["mean"] > 0.99 and len(out["auc"]["per_fold"]) == 5
    noise = cross_validate(rng.normal(size=(60, 8)), y, name="noise", seed=0)
    assert 0.2 < noise["auc"]["mean"] < 0.8
    assert out == cross_validate(separable, y, name="sep", seed=0)


def test_probe_reduces_folds_and_reports_too_small_labels():
    rng = np.random.default_rng(0)
    y = np.array([0] * 20 + [1] * 3)
    assert cross_validate(rng.normal(size=(23, 4)), y, name="rare")["folds"] == 3
    with pytest.warns(MetricWarning, match="probe of 'tiny' skipped"):
        out = cross_validate(rng.normal(size=(5, 4)), np.array([0, 0, 0, 0, 1]), name="tiny")
    assert np.isnan(out["auc"]["mean"])


def test_probe_runs_every_task_of_a_prompt_set():
    tower = FakeTextTower()
    images, labels = _planted(tower, n=90)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricWarning)
        out = run_probe(images, labels, PROMPTS, folds=3)
    assert set(out["binary"]) == {"nodule", "effusion", "bleed"}
    assert out["multiclass"]["dx"]["balanced_accuracy"]["mean"] > 0.9
    assert out["macro_auc"] > 0.9


def test_report_writes_json_markdown_and_plots(tmp_path):
    from hlip.evaluate.report import summary_rows, write_report

    tower = FakeTextTower()
    images, labels = _planted(tower)
    labels[0]["bleed"] = None
    for study in labels:  # a label with one class only: NaN metrics, no ROC plot
        study["effusion"] = 1
    cuts = calibrate_thresholds(*_planted(tower, seed=2), PROMPTS, tower, 100.0)
    with pytest.warns(MetricWarning, match="only positive"):
        zs = run_zeroshot(images, labels, PROMPTS, tower, 100.0, thresholds=cuts, n_boot=20)
    retrieval, ranks = run_retrieval(images, images)
    metrics = {"run": {"prompts_name": "planted"}, "zeroshot": zs.metrics, "retrieval": retrieval}
    files = write_report(tmp_path, metrics, zeroshot=zs, ranks=ranks)
    saved = json.loads(files.metrics.read_text())
    assert saved["zeroshot"]["binary"]["effusion"]["auc"]["value"] is None  # NaN -> null
    names = sorted(p.name for p in files.plots)
    assert names == [
        "confusion-binary.png",
        "confusion-dx.png",
        "retrieval-ranks.png",
        "roc-bleed.png",
        "roc-nodule.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in files.plots)
    text = files.report.read_text()
    assert (
        "| **macro** |" in text
        and "plots/roc-nodule.png" in text
        and f"| effusion | 60 (60) | {cuts['effusion']:.3f} | n/a |" in text
        and "chosen by Youden's J on the calibration studies" in text
    )
    rows = summary_rows(metrics)
    assert ("zero-shot", "dx: balanced accuracy", "1.000 [1.000, 1.000]") in rows
    assert ("retrieval", "image to report R@1/5/10", "1.000 / 1.000 / 1.000") in rows
