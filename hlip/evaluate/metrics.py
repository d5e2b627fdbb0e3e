"""Classification and retrieval metrics with seeded bootstrap confidence intervals.

Everything here is plain numpy on already-computed scores, so it can be checked against
scikit-learn and by hand without a model. The AUC is computed from ranks (the
Mann-Whitney statistic, ties counted as one half), vectorised over bootstrap resamples:
1000 resamples of a few thousand studies take milliseconds, where calling
``sklearn.metrics.roc_auc_score`` per resample takes seconds per label.

Conventions:

* binary labels are float arrays of 0/1 with NaN for "not annotated"; studies without an
  annotation are dropped per label before any metric is computed;
* a metric that is undefined on the data (AUC with one class present, sensitivity with no
  positives, anything on an empty label) is NaN and a :class:`MetricWarning` says why;
* confidence intervals are percentile bootstrap intervals (2.5th and 97.5th percentiles of
  the statistic over resamples of studies with replacement); resamples where the statistic
  is undefined are left out. The generator is seeded from ``(seed, label name)`` so a
  label's interval does not depend on which other labels are evaluated or in what order.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95
BINARY_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")


class MetricWarning(UserWarning):
    """A metric is undefined on the given data (reported as NaN)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval (NaN when undefined)."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def label_rng(seed: int, name: str) -> np.random.Generator:
    """A generator that depends only on the seed and the label's name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` resample indices (rows drawn with replacement)."""
    return rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), dtype=np.int64)


# --- binary ---------------------------------------------------------------------------------


def auc_rows(y_true: np.ndarray, y_score: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC of each row of ``[B, n]`` 0/1 labels and scores; NaN where a row has one class.

    AUC = (sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0) with average ranks, i.e. the
    probability that a random positive outscores a random negative, ties counting 1/2.
    Entries where ``valid`` is False (not annotated) take no part: their scores are moved
    above every real score, where they cannot change the ranks of the others.
    """
    y_true, valid = _rows(y_true, valid)
    scores = np.atleast_2d(np.asarray(y_score, dtype=np.float64))
    ranks = rankdata(np.where(valid, scores, np.inf), axis=1)
    positive = y_true & valid
    n_pos = positive.sum(axis=1).astype(np.float64)
    n_neg = valid.sum(axis=1) - n_pos
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def threshold_rows(
    y_true: np.ndarray, y_pred: np.ndarray, valid: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Sensitivity, specificity and balanced accuracy of each row of 0/1 labels and predictions."""
    y_true, valid = _rows(y_true, valid)
    y_pred = np.atleast_2d(np.asarray(y_pred, dtype=bool))
    positive, negative = y_true & valid, ~y_true & valid
    n_pos, n_neg = positive.sum(axis=1), negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_pos > 0, (positive & y_pred).sum(axis=1) / n_pos, np.nan)
        specificity = np.where(n_neg > 0, (negative & ~y_pred).sum(axis=1) / n_neg, np.nan)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
    }


def _rows(y_true: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.atleast_2d(np.asarray(y_true, dtype=bool))
    valid = np.ones_like(y_true) if valid is None else np.atleast_2d(np.asarray(valid, dtype=bool))
    return y_true, valid


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of one label (NaN and a :class:`MetricWarning` when only one class is present)."""
    y_true, y_score = _annotated(y_true, y_score)
    value = float(auc_rows(y_true, y_score)[0]) if y_true.size else float("nan")
    if np.isnan(value):
        _warn_classes("AUC", y_true)
    return value


def binary_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    threshold: float | None,
    name: str = "",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """AUC (and, with a threshold, sensitivity, specificity, balanced accuracy) with 95% CIs.

    ``y_score >= threshold`` is a positive prediction. Without a threshold (scores that are
    not probabilities) only the AUC is reported.
    """
    y_true, y_score = _annotated(y_true, y_score)
    n_pos = int(y_true.sum())
    out: dict = {"n": int(y_true.size), "n_positive": n_pos}
    if y_true.size == 0 or n_pos in (0, y_true.size):
        _warn_classes(f"metrics of label {name!r}", y_true)
    if threshold is not None:
        out["threshold"] = float(threshold)
        predicted = y_score >= threshold
        out["counts"] = {
            "tp": int((predicted & (y_true == 1)).sum()),
            "fn": int((~predicted & (y_true == 1)).sum()),
            "fp": int((predicted & (y_true == 0)).sum()),
            "tn": int((~predicted & (y_true == 0)).sum()),
        }
    idx = bootstrap_indices(y_true.size, n_boot, label_rng(seed, name))
    for metric in BINARY_METRICS if threshold is not None else ("auc",):
        out[metric] = _bootstrap(_binary_stat(metric, threshold), y_true, y_score, idx).as_dict()
    return out


def macro_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: list[float | None],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """Unweighted means over labels of each binary metric, with a joint bootstrap CI.

    ``y_true`` and ``y_score`` are ``[n_studies, n_labels]`` (NaN = not annotated). Labels
    where a metric is undefined are left out of its mean (``n_labels`` says how many
    counted). The interval resamples *studies*, shared by all labels, so it reflects the
    correlation between labels of one study.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    valid = ~np.isnan(y_true)
    hits = np.nan_to_num(y_true).astype(bool)
    idx = bootstrap_indices(y_true.shape[0], n_boot, label_rng(seed, "macro"))
    out: dict = {}
    for metric in BINARY_METRICS:
        labels = [i for i, t in enumerate(thresholds) if metric == "auc" or t is not None]
        if not labels:
            continue

        def per_label(
            rows: np.ndarray | slice, metric: str = metric, labels: list[int] = labels
        ) -> np.ndarray:
            return np.stack(
                [
                    _binary_stat(metric, thresholds[i])(hits[rows, i], y_score[rows, i], valid[rows, i])
                    for i in labels
                ],
                axis=-1,
            )

        point = per_label(np.arange(y_true.shape[0])[None])[0]
        counted = ~np.isnan(point)
        value = float(point[counted].mean()) if counted.any() else float("nan")
        if y_true.shape[0] and counted.any():
            resampled = per_label(idx)[:, counted].mean(axis=1)
            low, high = _percentile_interval(resampled)
        else:
            low = high = float("nan")
        out[metric] = {**Estimate(value, low, high).as_dict(), "n_labels": int(counted.sum())}
    return out


def _binary_stat(metric: str, threshold: float | None) -> Callable[..., np.ndarray]:
    if metric == "auc":
        return auc_rows
    return lambda y, s, valid=None: threshold_rows(y, np.asarray(s) >= threshold, valid)[metric]


def _bootstrap(
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
    y_true: np.ndarray,
    y_score: np.ndarray,
    idx: np.ndarray,
) -> Estimate:
    """Point estimate on all studies plus the percentile interval over the resamples ``idx``."""
    value = float(stat(y_true[None], y_score[None])[0]) if y_true.size else float("nan")
    if not y_true.size or np.isnan(value):
        return Estimate(value, float("nan"), float("nan"))
    values = stat(y_true[idx], y_score[idx])
    return Estimate(value, *_percentile_interval(values))


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if not values.size:
        return float("nan"), float("nan")
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _annotated(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop studies whose label is missing (NaN); labels become 0/1 ints."""
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"labels and scores differ in length: {y_true.size} != {y_score.size}")
    keep = ~np.isnan(y_true)
    values = y_true[keep]
    if np.any((values != 0) & (values != 1)):
        raise ValueError(f"binary labels must be 0, 1 or missing; got {sorted(set(values.tolist()))[:5]}")
    return values.astype(np.int64), y_score[keep]


def _warn_classes(what: str, y_true: np.ndarray) -> None:
    if y_true.size == 0:
        reason = "no study is annotated"
    else:
        present = "positive" if y_true.all() else "negative"
        reason = f"only {present} studies are present ({y_true.size})"
    warnings.warn(f"{what} undefined (NaN): {reason}", MetricWarning, stacklevel=3)


# --- multi-class ----------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` counts, rows = true class, columns = predicted class."""
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy_rows(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean per-class recall of each row, over the classes present in that row's labels.

    This is scikit-learn's ``balanced_accuracy_score`` (classes predicted but absent from
    the labels do not count), vectorised over bootstrap rows.
    """
    y_true = np.atleast_2d(np.asarray(y_true, dtype=np.int64))
    hits = y_true == np.atleast_2d(np.asarray(y_pred, dtype=np.int64))
    support = np.stack([(y_true == c).sum(axis=1) for c in range(n_classes)], axis=1)
    correct = np.stack([((y_true == c) & hits).sum(axis=1) for c in range(n_classes)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = correct / support  # NaN for classes absent from the row's labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without labels: NaN
        return np.nanmean(recall, axis=1)


def multiclass_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    *,
    name: str = "",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """Balanced accuracy (with CI), accuracy, confusion matrix and one-vs-rest AUC per class.

    ``y_true`` holds class indices (studies without a class are already removed);
    the prediction is the arg-max of ``probabilities`` ``[n, K]``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(class_names)
    if not y_true.size:
        warnings.warn(
            f"metrics of task {name!r} undefined (NaN): no study is annotated", MetricWarning, stacklevel=2
        )
    y_pred = probabilities.argmax(axis=1) if y_true.size else y_true
    idx = bootstrap_indices(y_true.size, n_boot, label_rng(seed, name))

    def stat(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        return balanced_accuracy_rows(y, p, n_classes)

    per_class = {}
    for c, class_name in enumerate(class_names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            auc = _bootstrap(auc_rows, (y_true == c).astype(np.int64), probabilities[:, c], idx)
        per_class[class_name] = {"n": int((y_true == c).sum()), "auc": auc.as_dict()}
    return {
        "n": int(y_true.size),
        "classes": list(class_names),
        "balanced_accuracy": _bootstrap(stat, y_true, y_pred, idx).as_dict(),
        "accuracy": float((y_true == y_pred).mean()) if y_true.size else float("nan"),
        "confusion_matrix": confusion_matrix(y_true, y_pred, n_classes).tolist(),
        "per_class": per_class,
    }


# --- retrieval -------------------------------------------------------------------------------


def retrieval_ranks(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of the matching item (the diagonal) in each row of a square similarity.

    Ties are counted against the query: rank = 1 + the number of *other* items scoring at
    least as high as the match. A model that maps everything to one point therefore gets
    the worst rank, never a perfect one.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square, got shape {similarity.shape}")
    match = np.diag(similarity)[:, None]
    return (similarity >= match).sum(axis=1)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose match is within the top ``k``."""
    ranks = np.asarray(ranks)
    return float((ranks <= k).mean()) if ranks.size else float("nan")
