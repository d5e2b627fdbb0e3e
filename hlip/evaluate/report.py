"""Evaluation outputs: ``metrics.json``, ``report.md`` and PNG plots.

``metrics.json`` is the machine-readable result (NaN is written as ``null``);
``report.md`` renders the same numbers as tables with the plots beside it in ``plots/``:
one ROC curve per binary label, a confusion matrix per multi-class task and the
retrieval rank histograms. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hlip.evaluate.grounding import MIN_REPORTS
from hlip.evaluate.zeroshot import ZeroShotResult

PLOTS_DIR = "plots"
METRIC_NAMES = {
    "auc": "AUC",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}
BINARY_CONFUSION = "binary labels at the threshold"


@dataclass
class ReportFiles:
    """Paths of everything :func:`write_report` wrote."""

    metrics: Path
    report: Path
    plots: list[Path] = field(default_factory=list)


def json_safe(value: Any) -> Any:
    """Nested metrics with NaN/inf as None and numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def slug(name: str) -> str:
    """A file-name-safe version of a label name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "label"


def fmt(value: float | None, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def fmt_estimate(estimate: Mapping[str, float] | None) -> str:
    """``0.912 [0.871, 0.950]`` (or ``n/a``)."""
    if not estimate or estimate.get("value") is None or math.isnan(estimate["value"]):
        return "n/a"
    low, high = estimate.get("ci_low"), estimate.get("ci_high")
    interval = f" [{fmt(low)}, {fmt(high)}]" if low is not None and not math.isnan(low) else ""
    return fmt(estimate["value"]) + interval


def summary_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(task, measure, value) rows of the headline numbers, for the console and report."""
    rows: list[tuple[str, str, str]] = []
    zeroshot = metrics.get("zeroshot", {})
    for measure, estimate in zeroshot.get("macro", {}).items():
        name = f"macro {METRIC_NAMES[measure]} ({estimate['n_labels']} labels)"
        rows.append(("zero-shot", name, fmt_estimate(estimate)))
    for name, task in zeroshot.get("multiclass", {}).items():
        rows.append(("zero-shot", f"{name}: balanced accuracy", fmt_estimate(task["balanced_accuracy"])))
    for direction, values in metrics.get("retrieval", {}).items():
        if isinstance(values, Mapping):
            label = direction.replace("_", " ")
            rows.append(("retrieval", f"{label} R@1/5/10", _recalls(values)))
            rows.append(("retrieval", f"{label} median rank", fmt(values["median_rank"], 1)))
    probe = metrics.get("probe", {})
    if "macro_auc" in probe:
        rows.append(("linear probe", "macro AUC (CV mean)", fmt(probe["macro_auc"])))
    for name, task in probe.get("multiclass", {}).items():
        rows.append(("linear probe", f"{name}: balanced accuracy", _mean_sd(task["balanced_accuracy"])))
    return rows


def _recalls(values: Mapping[str, float]) -> str:
    return " / ".join(fmt(values[f"recall@{k}"]) for k in (1, 5, 10) if f"recall@{k}" in values)


def _mean_sd(values: Mapping[str, float]) -> str:
    return "n/a" if math.isnan(values["mean"]) else f"{values['mean']:.3f} ± {fmt(values['sd'])}"


# --- plots --------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y_true: np.ndarray, y_score: np.ndarray, title: str, path: Path) -> Path | None:
    """ROC curve of one label (annotated studies only); None when only one class is present."""
    from sklearn.metrics import roc_auc_score, roc_curve

    keep = ~np.isnan(y_true)
    y, s = y_true[keep].astype(int), y_score[keep]
    if len(set(y.tolist())) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, s)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(y, s):.3f} (n={y.size}, {int(y.sum())} pos)")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> Path:
    """Confusion matrix heat map, rows = true class, columns = predicted class."""
    plt = _pyplot()
    counts = np.asarray(matrix)
    size = 1.2 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(counts, cmap="Blues")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > counts.max() / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_binary_confusions(binary: Mapping[str, Any], path: Path) -> Path | None:
    """2x2 confusion matrices of the thresholded binary labels, one panel per label."""
    labels = {name: m["counts"] for name, m in binary.items() if "counts" in m}
    if not labels:
        return None
    plt = _pyplot()
    cols = min(len(labels), 4)
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    for ax, (name, c) in zip(axes.flat, labels.items(), strict=False):
        counts = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(counts, cmap="Blues", vmin=0)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(
                j, i, str(n), ha="center", va="center", color="white" if n > counts.max() / 2 else "black"
            )
        ax.set(
            xticks=[0, 1], yticks=[0, 1], xticklabels=["neg", "pos"], yticklabels=["neg", "pos"], title=name
        )
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    return _save(fig, path)


def plot_ranks(ranks: Mapping[str, np.ndarray], path: Path) -> Path:
    """Histograms of the rank of the true match, one panel per direction."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ranks), figsize=(4.5 * len(ranks), 3.5), dpi=100, squeeze=False)
    for ax, (direction, r) in zip(axes[0], ranks.items(), strict=True):
        n = max(int(r.max()) if r.size else 1, 1)
        ax.hist(r, bins=np.arange(1, n + 2) - 0.5 if n <= 50 else 50, color="tab:blue")
        ax.set(xlabel="rank of the true match", ylabel="queries", title=direction.replace("_", " "))
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


# --- markdown -------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _zeroshot_section(metrics: Mapping[str, Any], plots: Mapping[str, Path], out: Path) -> list[str]:
    lines = ["## Zero-shot classification", ""]
    binary = metrics.get("binary", {})
    if binary:
        lines += [
            "Binary labels: score = p(positive) of the two-prompt softmax (labels without negative "
            f"prompts: the similarity to the positive prompts); {_THRESHOLD_RULES[metrics.get('thresholds', 'none')]} "
            "95% bootstrap CIs in brackets.",
            "",
            _grounding_line(metrics.get("grounding", "none")),
            "",
        ]
        rows = [
            [name, f"{m['n']} ({m['n_positive']})", fmt(m.get("threshold"))]
            + [fmt_estimate(m.get(k)) for k in _BINARY_COLUMNS]
            for name, m in binary.items()
        ]
        macro = metrics.get("macro", {})
        rows.append(["**macro**", "", ""] + [fmt_estimate(macro.get(k)) for k in _BINARY_COLUMNS])
        header = ["label", "n (pos)", "threshold", "AUC", "balanced acc.", "sensitivity", "specificity"]
        lines += _table(header, rows) + [""]
        lines += [f"![ROC {name}]({plots[name].relative_to(out)})" for name in binary if name in plots] + [""]
        if BINARY_CONFUSION in plots:
            lines += [f"![confusion matrices]({plots[BINARY_CONFUSION].relative_to(out)})", ""]
    for name, task in metrics.get("multiclass", {}).items():
        lines += [
            f"### {name}",
            "",
            f"Balanced accuracy {fmt_estimate(task['balanced_accuracy'])}, "
            f"accuracy {fmt(task['accuracy'])}, n = {task['n']}.",
            "",
        ]
        rows = [[cls, str(v["n"]), fmt_estimate(v["auc"])] for cls, v in task["per_class"].items()]
        lines += _table(["class", "n", "one-vs-rest AUC"], rows) + [""]
        if name in plots:
            lines += [f"![confusion {name}]({plots[name].relative_to(out)})", ""]
    return lines


_THRESHOLD_RULES = {
    "calibrated": "a study is positive when its score reaches the label's threshold, chosen by Youden's J "
    "on the calibration studies (never on these).",
    "fixed": "a study is positive when p reaches the fixed threshold of the prompts file.",
    "none": "no thresholds (no calibration studies were given), so AUC only.",
}


def _grounding_line(grounding: Any) -> str:
    if not isinstance(grounding, Mapping):
        return "Prompts scored as written (not grounded in training reports)."
    unreadable = grounding.get("unreadable_reports", 0)
    return (
        f"Each prompt class also holds its nearest sentences among {grounding['sentences']} distinct "
        f"sentences of {grounding['reports']} training reports ({', '.join(grounding['data'])}"
        + (f"; {unreadable} damaged reports left out" if unreadable else "")
        + f"); where each class of a label has at least {MIN_REPORTS} of those reports sorted to it, "
        + "the label is scored against the mean of each class's reports (per label in metrics.json, "
        + "`grounding`); "
        + "no label of those studies is read."
    )


_BINARY_COLUMNS = ("auc", "balanced_accuracy", "sensitivity", "specificity")


def _retrieval_section(metrics: Mapping[str, Any], plot: Path | None, out: Path) -> list[str]:
    lines = [
        "## Retrieval",
        "",
        f"{metrics['n']} studies with a report ({metrics['n_without_report']} without).",
        "",
    ]
    rows = []
    for direction, v in metrics.items():
        if isinstance(v, Mapping):
            recalls = [fmt(v[k]) for k in v if k.startswith("recall@")]
            rows.append(
                [direction.replace("_", " "), *recalls, fmt(v["median_rank"], 1), fmt(v["mean_rank"], 1)]
            )
    header_recalls = [k.replace("recall", "R") for k in metrics["image_to_report"] if k.startswith("recall@")]
    lines += _table(["direction", *header_recalls, "median rank", "mean rank"], rows) + [""]
    if plot is not None:
        lines += [f"![retrieval ranks]({plot.relative_to(out)})", ""]
    return lines


def _probe_section(metrics: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Linear probe",
        "",
        f"Logistic regression (C = {metrics['C']}) on frozen image embeddings, stratified "
        f"{metrics['folds']}-fold cross-validation; mean ± sd over folds.",
        "",
    ]
    rows = [[n, str(r["n"]), str(r["folds"]), _mean_sd(r["auc"])] for n, r in metrics["binary"].items()]
    rows += [
        [n, str(r["n"]), str(r["folds"]), _mean_sd(r["balanced_accuracy"])]
        for n, r in metrics["multiclass"].items()
    ]
    return lines + _table(["label", "n", "folds", "AUC / balanced acc."], rows) + [""]


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    *,
    zeroshot: ZeroShotResult | None = None,
    ranks: Mapping[str, np.ndarray] | None = None,
) -> ReportFiles:
    """Write metrics.json, the plots and report.md into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(metrics=out / "metrics.json", report=out / "report.md")
    files.metrics.write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    plots: dict[str, Path] = {}
    zs = metrics.get("zeroshot", {})
    if zeroshot is not None:
        for name in zs.get("binary", {}):
            path = plot_roc(
                zeroshot.targets[name], zeroshot.scores[name], name, out / PLOTS_DIR / f"roc-{slug(name)}.png"
            )
            if path is not None:
                plots[name] = path
        binary_confusion = plot_binary_confusions(
            zs.get("binary", {}), out / PLOTS_DIR / "confusion-binary.png"
        )
        if binary_confusion is not None:
            plots[BINARY_CONFUSION] = binary_confusion
        for name, task in zs.get("multiclass", {}).items():
            plots[name] = plot_confusion(
                task["confusion_matrix"],
                task["classes"],
                name,
                out / PLOTS_DIR / f"confusion-{slug(name)}.png",
            )
    rank_plot = plot_ranks(ranks, out / PLOTS_DIR / "retrieval-ranks.png") if ranks else None
    files.plots = [*plots.values(), *([rank_plot] if rank_plot else [])]
    files.report.write_text("\n".join(_markdown(metrics, plots, rank_plot, out)) + "\n")
    return files


def _markdown(
    metrics: Mapping[str, Any], plots: Mapping[str, Path], rank_plot: Path | None, out: Path
) -> list[str]:
    info = metrics.get("run", {})
    lines = [f"# Evaluation report: {info.get('prompts_name') or 'hlip'}", ""]
    lines += [f"- {key}: `{value}`" for key, value in info.items()] + [""]
    lines += _table(["task", "measure", "value"], [list(row) for row in summary_rows(metrics)]) + [""]
    if "zeroshot" in metrics:
        lines += _zeroshot_section(metrics["zeroshot"], plots, out)
    if "retrieval" in metrics:
        lines += _retrieval_section(metrics["retrieval"], rank_plot, out)
    if "probe" in metrics:
        lines += _probe_section(metrics["probe"])
    return lines
