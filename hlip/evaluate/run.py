"""One evaluation run, start to finish: checks, embedding, tasks, report.

Everything ``hlip-eval run`` does is :func:`run_evaluation`; the CLI only parses options.
Inputs are checked before the model runs (prompts file, labels the tasks need, the
checkpoint against its preset), so a mistake costs seconds, not an embedding pass.
Metric warnings (labels with one class, probes skipped for lack of studies) are collected
into ``metrics.json`` under ``warnings``, where the CLI prints them from.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hlip.evaluate import labels as labels_mod
from hlip.evaluate.embed import Embeddings, EvalInputError, embed_dataset, load_model, text_encoder
from hlip.evaluate.grounding import Corpus, grounding_paths, model_corpus
from hlip.evaluate.metrics import DEFAULT_BOOTSTRAP, MetricWarning
from hlip.evaluate.probe import DEFAULT_FOLDS, run_probe
from hlip.evaluate.prompts import PromptSet, load_prompts
from hlip.evaluate.report import ReportFiles, write_report
from hlip.evaluate.retrieval import run_retrieval
from hlip.evaluate.zeroshot import calibrate_thresholds, run_zeroshot

TASKS = ("zeroshot", "retrieval", "probe")
EMBEDDINGS_FILE = "embeddings.parquet"
SCORES_FILE = "zeroshot_scores.csv"


@dataclass
class EvalOptions:
    """Everything one evaluation needs (the CLI options, one to one)."""

    checkpoint: str
    data: str
    out: str
    version: int | None = None
    """Dataset version of ``data`` (default: the latest); recorded in metrics.json."""
    prompts: str | None = None
    calibrate: str | None = None
    """Shards of labelled studies other than ``data`` (training or validation) whose zero-shot
    scores fix each label's threshold (Youden's J) for sensitivity, specificity, balanced accuracy."""
    ground: str = "auto"
    """Shards whose reports ground the prompts (:mod:`hlip.evaluate.grounding`); ``auto``: the
    model's own training shards, when it is an hlip-train run whose data can be read here;
    ``none``: the prompts alone."""
    tasks: Sequence[str] = ("zeroshot", "retrieval")
    labels: str | None = None
    label_key: str = labels_mod.DEFAULT_KEY_COLUMN
    preset: str | None = None
    text_model: str | None = None
    template_set: str | None = None
    only: Sequence[str] = ()
    """Restrict the prompts file to these labels/tasks (e.g. the subset a paper reports)."""
    batch_size: int = 8
    workers: int = 0
    device: str = "auto"
    settings: Sequence[str] = ()
    bootstrap: int = DEFAULT_BOOTSTRAP
    folds: int = DEFAULT_FOLDS
    seed: int = 0


@dataclass
class EvalOutcome:
    metrics: dict[str, Any]
    files: ReportFiles
    embeddings: Path
    extra: list[Path] = field(default_factory=list)


def check_tasks(tasks: Sequence[str], prompts: str | None) -> list[str]:
    """Known task names, in canonical order; zero-shot and probe need a prompts file."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise EvalInputError(f"unknown task(s) {unknown or tasks}; choose from {', '.join(TASKS)}")
    needs_prompts = [t for t in ("zeroshot", "probe") if t in tasks]
    if needs_prompts and not prompts:
        raise EvalInputError(
            f"--tasks {','.join(needs_prompts)} needs --prompts: the prompts (or benchmark) file defines "
            "the labels to score (see configs/benchmarks/)"
        )
    return [t for t in TASKS if t in tasks]


def manifest_labels(data: str, version: int | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Study keys and their labels from the dataset's manifest (no shard is read)."""
    from hlip.shards.format import ShardFormatError
    from hlip.shards.reader import ShardDataset

    try:
        manifest = ShardDataset(data, version=version).manifest
    except ShardFormatError as error:
        raise EvalInputError(f"cannot read shards at {data}: {error}") from None
    rows = manifest.select(["key", "labels"]).to_pylist()
    return [r["key"] for r in rows], [json.loads(r["labels"] or "{}") for r in rows]


def study_labels(keys: Sequence[str], shard_labels: Sequence[dict], options: EvalOptions) -> list[dict]:
    table = labels_mod.load_label_table(options.labels, options.label_key) if options.labels else None
    if table is not None and not set(table) & set(keys):
        raise EvalInputError(
            f"no key of label table {options.labels} (column {options.label_key!r}) matches a study in "
            f"{options.data}; keys there look like {keys[0]!r}"
        )
    return labels_mod.merge_labels(keys, shard_labels, table)


def check_labels(prompts: PromptSet, labels: list[dict], options: EvalOptions) -> None:
    """The labels every task needs exist and read as binary / known classes."""
    where = options.data + (f" (with labels from {options.labels})" if options.labels else "")
    labels_mod.check_columns(prompts, labels, where)
    for label in prompts.binary:
        labels_mod.binary_targets(labels, label.column)
    for task in prompts.multiclass:
        labels_mod.class_targets(labels, task)


def run_evaluation(options: EvalOptions, progress: Callable[[int, int], None] | None = None) -> EvalOutcome:
    """Check inputs, embed the studies, run the tasks and write the report into ``options.out``."""
    tasks = check_tasks(options.tasks, options.prompts)
    prompts = load_prompts(options.prompts, template_set=options.template_set) if options.prompts else None
    if prompts is not None and options.only:
        prompts = prompts.select(list(options.only))
    keys, shard_labels = manifest_labels(options.data, options.version)
    if prompts is not None:
        check_labels(prompts, study_labels(keys, shard_labels, options), options)
    if options.calibrate and "zeroshot" in tasks:
        calibration = replace(options, data=options.calibrate)
        check_labels(prompts, study_labels(*manifest_labels(options.calibrate), calibration), calibration)
    if options.ground not in ("auto", "none") and "zeroshot" in tasks:
        manifest_labels(options.ground)  # readable shards, before the model runs
    loaded = load_model(
        options.checkpoint,
        preset=options.preset,
        text_path=options.text_model,
        overrides=options.settings,
        device=options.device,
    )
    embeddings = _embed(loaded, options.data, options, progress, version=options.version)
    out = Path(options.out)
    embeddings_path = embeddings.save(out / EMBEDDINGS_FILE)
    labels = study_labels(embeddings.keys, embeddings.labels, options)
    corpus = _grounding_corpus(loaded, options.ground) if "zeroshot" in tasks else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        thresholds = (
            _calibrated_thresholds(loaded, prompts, corpus, options, progress)
            if options.calibrate and "zeroshot" in tasks
            else None
        )
        metrics, zeroshot, ranks = _run_tasks(
            tasks, embeddings, labels, prompts, text_encoder(loaded), thresholds, corpus, options
        )
    metrics["warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, MetricWarning)})
    metrics = {"run": _run_info(options, prompts, embeddings, tasks), **metrics}
    files = write_report(out, metrics, zeroshot=zeroshot, ranks=ranks)
    extra = [_write_scores(out / SCORES_FILE, embeddings.keys, zeroshot, prompts)] if zeroshot else []
    return EvalOutcome(metrics, files, embeddings_path, extra)


def _embed(loaded, data, options: EvalOptions, progress, version: int | None = None):
    """Embeddings of the studies of ``data`` with the run's batch size and workers."""
    return embed_dataset(
        loaded,
        data,
        batch_size=options.batch_size,
        num_workers=options.workers,
        progress=progress,
        version=version,
    )


def _grounding_corpus(loaded, ground: str) -> Corpus | None:
    """The corpus of the shards ``ground`` names (see :attr:`EvalOptions.ground`), or None."""
    paths = grounding_paths(ground, loaded.config.data)
    return model_corpus(loaded, paths) if paths else None


def _calibrated_thresholds(
    loaded, prompts: PromptSet, corpus: Corpus | None, options: EvalOptions, progress
) -> dict[str, float]:
    """Embed the calibration studies and choose each label's threshold on their scores."""
    studies = _embed(loaded, options.calibrate, options, progress)
    labels = study_labels(studies.keys, studies.labels, replace(options, data=options.calibrate))
    scale = studies.meta["logit_scale"]
    return calibrate_thresholds(studies.image, labels, prompts, text_encoder(loaded), scale, corpus)


def _run_tasks(
    tasks, embeddings: Embeddings, labels, prompts, encode, thresholds, corpus, options: EvalOptions
):
    metrics: dict[str, Any] = {}
    zeroshot = ranks = None
    if "zeroshot" in tasks:
        scale = embeddings.meta["logit_scale"]
        zeroshot = run_zeroshot(
            embeddings.image, labels, prompts, encode, scale,
            thresholds=thresholds, corpus=corpus, n_boot=options.bootstrap, seed=options.seed,
        )  # fmt: skip
        metrics["zeroshot"] = zeroshot.metrics
        if zeroshot.metrics["thresholds"] == "none" and prompts.binary:
            warnings.warn(
                "sensitivity, specificity and balanced accuracy need thresholds: pass --calibrate with "
                "labelled training or validation shards (or set a fixed threshold in the prompts file)",
                MetricWarning,
                stacklevel=2,
            )
    if "retrieval" in tasks:
        metrics["retrieval"], ranks = run_retrieval(
            embeddings.image, embeddings.report, embeddings.has_report
        )
    if "probe" in tasks:
        metrics["probe"] = run_probe(
            embeddings.image, labels, prompts, folds=options.folds, seed=options.seed
        )
    return metrics, zeroshot, ranks


def _run_info(
    options: EvalOptions, prompts: PromptSet | None, embeddings: Embeddings, tasks
) -> dict[str, Any]:
    info = {
        "checkpoint": options.checkpoint,
        "data": options.data,
        "data_version": embeddings.meta.get("data_version"),
        "studies": len(embeddings),
        "tasks": ",".join(tasks),
        "logit_scale": round(float(embeddings.meta["logit_scale"]), 4),
        "bootstrap": options.bootstrap,
        "seed": options.seed,
    }
    if options.preset:
        info["preset"] = options.preset
    if options.labels:
        info["labels"] = options.labels
    if options.calibrate:
        info["calibrate"] = options.calibrate
    if prompts is not None:
        info.update(prompts=prompts.source, prompts_name=prompts.name, ensemble=prompts.ensemble)
        if options.template_set:
            info["template_set"] = options.template_set
        if options.only:
            info["only"] = ",".join(options.only)
    return info


def _write_scores(path: Path, keys: Sequence[str], zeroshot, prompts: PromptSet) -> Path:
    """Per-study zero-shot scores as CSV: p(positive) (or similarity) per label, then
    one ``task:class`` probability column per class of each multi-class task."""
    import csv

    columns: dict[str, Any] = {label.name: zeroshot.scores[label.name] for label in prompts.binary}
    for task in prompts.multiclass:
        for j, name in enumerate(task.classes):
            columns[f"{task.name}:{name}"] = zeroshot.scores[task.name][:, j]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", *columns])
        for i, key in enumerate(keys):
            writer.writerow([key, *(f"{column[i]:.6f}" for column in columns.values())])
    return path
