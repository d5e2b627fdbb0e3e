"""Linear probe: logistic regression on frozen image embeddings, cross-validated.

The published HLIP evaluation has no linear-probe code; this is the usual protocol for
CLIP encoders. Per label, studies with an annotation are split by stratified k-fold
(shuffled with the run's seed); a standardising + L2 logistic-regression pipeline is fit
on k-1 folds and scored on the held-out fold. Reported: AUC (binary) or balanced
accuracy (multi-class) per fold, their mean and sample standard deviation. The number of
folds drops to the size of the smallest class when that is below ``folds``; a label with
fewer than two studies in some class is reported as NaN with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hlip.evaluate.labels import binary_targets, class_targets
from hlip.evaluate.metrics import MetricWarning, weighted_auc, weighted_balanced_accuracy
from hlip.evaluate.prompts import PromptSet

DEFAULT_FOLDS = 5
DEFAULT_C = 1.0


def cross_validate(
    features: np.ndarray,
    y: np.ndarray,
    *,
    name: str,
    multiclass: bool = False,
    folds: int = DEFAULT_FOLDS,
    c: float = DEFAULT_C,
    seed: int = 0,
) -> dict:
    """Per-fold held-out scores of a logistic regression of integer targets ``y`` (>= 0).

    Binary targets (0/1) are scored by AUC, ``multiclass`` ones by balanced accuracy.
    """
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min())) if classes.size >= 2 else 0
    class_counts = {int(value): int(n) for value, n in zip(classes, counts, strict=True)}
    summary: dict = {"n": int(y.size), "folds": k, "class_counts": class_counts}
    metric = "balanced_accuracy" if multiclass else "auc"
    if k < 2:
        warnings.warn(
            f"linear probe of {name!r} skipped (NaN): needs at least two studies of each of two classes, "
            f"got {summary['class_counts']}",
            MetricWarning,
            stacklevel=2,
        )
        return {**summary, metric: {"mean": float("nan"), "sd": float("nan"), "per_fold": []}}
    splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(features, y)
    scores = [_fold_score(features, y, train, test, multiclass, c) for train, test in splits]
    return {
        **summary,
        metric: {"mean": float(np.mean(scores)), "sd": float(np.std(scores, ddof=1)), "per_fold": scores},
    }


def _fold_score(
    features: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, multiclass: bool, c: float
) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    model.fit(features[train], y[train])
    if multiclass:
        return float(weighted_balanced_accuracy(y[test], model.predict(features[test]), int(y.max()) + 1)[0])
    ones = np.ones((1, test.size))
    return float(weighted_auc(y[test] == 1, model.predict_proba(features[test])[:, 1], ones)[0])


def run_probe(
    features: np.ndarray,
    labels: Sequence[dict],
    prompts: PromptSet,
    *,
    folds: int = DEFAULT_FOLDS,
    c: float = DEFAULT_C,
    seed: int = 0,
) -> dict:
    """Probe every binary label and multi-class task the prompt set defines."""
    features = np.asarray(features, dtype=np.float64)
    results: dict = {"folds": folds, "C": c, "binary": {}, "multiclass": {}}
    for label in prompts.binary:
        y = binary_targets(labels, label.column)
        keep = ~np.isnan(y)
        results["binary"][label.name] = cross_validate(
            features[keep], y[keep].astype(np.int64), name=label.name, folds=folds, c=c, seed=seed
        )
    for task in prompts.multiclass:
        y = class_targets(labels, task)
        results["multiclass"][task.name] = cross_validate(
            features[y >= 0], y[y >= 0], name=task.name, multiclass=True, folds=folds, c=c, seed=seed
        )
    aucs = [r["auc"]["mean"] for r in results["binary"].values() if not np.isnan(r["auc"]["mean"])]
    results["macro_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return results
