"""Classification and retrieval metrics with seeded bootstrap confidence intervals.

Everything here is plain numpy on already-computed scores, so it can be checked against
scikit-learn and by hand without a model.

A bootstrap resample is represented by *weights*: how many times each study was drawn.
Every statistic is a function of fixed labels and scores and a ``[B, n]`` weight matrix,
so B resamples cost a few weighted sums instead of B re-sorts, the point estimate is the
all-ones row, and a study that is not annotated for a label simply has weight 0. The AUC
is the Mann-Whitney statistic (ties count one half) computed from per-score-value weight
totals; it equals ``sklearn.metrics.roc_auc_score`` on the resampled arrays
(``bench/evaluate.py`` times the two).

Conventions:

* binary labels are float arrays of 0/1 with NaN for "not annotated"; studies without an
  annotation take no part in that label's metrics;
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

DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95
BINARY_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps ``[B, n]`` study weights to ``[B]`` values of a metric."""


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


def resample_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]``: how often each of ``n`` studies is drawn in each resample."""
    idx = bootstrap_indices(n, n_boot, rng)
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n))


# --- binary ---------------------------------------------------------------------------------


def weighted_auc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of study weights; NaN where a row weighs only one class.

    With P_g and N_g the weight of positives and negatives whose score is the g-th smallest
    distinct value, AUC = sum_g P_g (N_<g + N_g / 2) / (P N): the probability that a random
    positive outscores a random negative, ties counting 1/2.
    """
    y = np.asarray(y_true, dtype=bool).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if not y.size:
        return np.full(w.shape[0], np.nan)
    _, group = np.unique(np.asarray(y_score, dtype=np.float64).ravel(), return_inverse=True)
    size = int(group.max()) + 1
    flat = (np.arange(w.shape[0])[:, None] * size + group[None, :]).ravel()
    pos = np.bincount(flat, weights=(w * y).ravel(), minlength=w.shape[0] * size).reshape(-1, size)
    neg = np.bincount(flat, weights=(w * ~y).ravel(), minlength=w.shape[0] * size).reshape(-1, size)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + neg / 2)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def weighted_threshold_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Sensitivity, specificity and balanced accuracy for each row of study weights."""
    y = np.asarray(y_true, dtype=bool).ravel()
    pred = np.asarray(y_pred, dtype=bool).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_pos, n_neg = w @ y, w @ ~y
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_pos > 0, (w @ (y & pred)) / n_pos, np.nan)
        specificity = np.where(n_neg > 0, (w @ (~y & ~pred)) / n_neg, np.nan)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
    }


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The score cut that maximises Youden's J (sensitivity + specificity - 1) on these studies.

    Meant for calibration studies (training or validation), never the ones being scored:
    their threshold is then fixed before the test labels are seen. The cut lies halfway
    between the lowest score called positive and the next lower score, so a test score equal
    to a calibration score falls on the same side as it did there; of equally good cuts the
    lowest wins. NaN (and a :class:`MetricWarning`) when only one class is present.
    """
    y_true, y_score = _annotated(y_true, y_score)
    n_pos = int(y_true.sum())
    if n_pos in (0, y_true.size):
        _warn_classes("Youden threshold", y_true)
        return float("nan")
    cuts = np.unique(y_score)
    positives, negatives = np.sort(y_score[y_true == 1]), np.sort(y_score[y_true == 0])
    sensitivity = 1 - np.searchsorted(positives, cuts, side="left") / positives.size
    specificity = np.searchsorted(negatives, cuts, side="left") / negatives.size
    best = int(np.argmax(sensitivity + specificity))
    return float(cuts[0] if best == 0 else (cuts[best - 1] + cuts[best]) / 2)


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of one label (NaN and a :class:`MetricWarning` when only one class is present)."""
    y_true, y_score = _annotated(y_true, y_score)
    value = float(weighted_auc(y_true, y_score, _ones(y_true.size))[0])
    if np.isnan(value):
        _warn_classes("AUC", y_true)
    return value


def binary_statistic(
    metric: str, y_true: np.ndarray, y_score: np.ndarray, threshold: float | None
) -> Statistic:
    """The weights -> values function of one binary metric on fixed labels and scores."""
    if metric == "auc":
        return lambda w: weighted_auc(y_true, y_score, w)
    predicted = np.asarray(y_score) >= threshold
    return lambda w: weighted_threshold_metrics(y_true, predicted, w)[metric]


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
    weights = resample_weights(y_true.size, n_boot, label_rng(seed, name))
    for metric in BINARY_METRICS if threshold is not None else ("auc",):
        out[metric] = bootstrap(binary_statistic(metric, y_true, y_score, threshold), weights).as_dict()
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
    correlation between labels of one study; a study weighs 0 for the labels it lacks.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    annotated = ~np.isnan(y_true)
    hits = np.nan_to_num(y_true).astype(bool)
    weights = resample_weights(y_true.shape[0], n_boot, label_rng(seed, "macro"))
    out: dict = {}
    for metric in BINARY_METRICS:
        labels = [i for i, t in enumerate(thresholds) if metric == "auc" or t is not None]
        if not labels:
            continue
        stats = [binary_statistic(metric, hits[:, i], y_score[:, i], thresholds[i]) for i in labels]

        def per_label(w: np.ndarray, stats=stats, labels=labels) -> np.ndarray:
            return np.stack(
                [stat(w * annotated[:, i]) for stat, i in zip(stats, labels, strict=True)], axis=-1
            )

        point = per_label(_ones(y_true.shape[0]))[0]
        counted = ~np.isnan(point)
        value = float(point[counted].mean()) if counted.any() else float("nan")
        interval = (
            _percentile_interval(per_label(weights)[:, counted].mean(axis=1))
            if counted.any()
            else (np.nan,) * 2
        )
        out[metric] = {**Estimate(value, *interval).as_dict(), "n_labels": int(counted.sum())}
    return out


def bootstrap(stat: Statistic, weights: np.ndarray) -> Estimate:
    """Point estimate (all studies once) plus the percentile interval over the resample ``weights``."""
    value = float(stat(_ones(weights.shape[1]))[0])
    if np.isnan(value):
        return Estimate(value, float("nan"), float("nan"))
    return Estimate(value, *_percentile_interval(stat(weights)))


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


def weighted_balanced_accuracy(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Mean per-class recall for each row of study weights, over the classes present.

    This is scikit-learn's ``balanced_accuracy_score`` (classes predicted but absent from
    the labels do not count). Without ``weights``, every study counts once.
    """
    y = np.asarray(y_true, dtype=np.int64).ravel()
    w = _ones(y.size) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    member = y[:, None] == np.arange(n_classes)[None, :]
    support = w @ member
    correct = w @ (member & (y == np.asarray(y_pred).ravel())[:, None])
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
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(y_true), len(class_names))
    n_classes = len(class_names)
    if not y_true.size:
        warnings.warn(
            f"metrics of task {name!r} undefined (NaN): no study is annotated", MetricWarning, stacklevel=2
        )
    y_pred = probabilities.argmax(axis=1) if y_true.size else y_true
    weights = resample_weights(y_true.size, n_boot, label_rng(seed, name))
    per_class = {
        class_name: {
            "n": int((y_true == c).sum()),
            "auc": bootstrap(
                lambda w, c=c: weighted_auc(y_true == c, probabilities[:, c], w), weights
            ).as_dict(),
        }
        for c, class_name in enumerate(class_names)
    }
    accuracy = bootstrap(lambda w: weighted_balanced_accuracy(y_true, y_pred, n_classes, w), weights)
    return {
        "n": int(y_true.size),
        "classes": list(class_names),
        "balanced_accuracy": accuracy.as_dict(),
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
