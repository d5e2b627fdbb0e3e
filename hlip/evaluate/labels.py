"""Study labels for evaluation: where they come from and how they become targets.

Labels come either from the shards (``Study.labels``, joined from the report table at
ingest) or from a separate table keyed by study key (CSV or Parquet, ``--labels``); a
table entry overrides a shard label of the same name. Values are read leniently because
report tables are written by people: 1/0, true/false, yes/no, positive/negative,
present/absent are binary; empty, NaN, ``na`` and missing entries mean "not annotated"
and the study is left out of that label's metrics.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from hlip.evaluate.prompts import BinaryLabel, MulticlassTask, PromptSet

_TRUE = {"1", "1.0", "true", "yes", "y", "positive", "pos", "present"}
_FALSE = {"0", "0.0", "false", "no", "n", "negative", "neg", "absent"}
_MISSING = {"", "nan", "na", "n/a", "none", "null", "missing"}

DEFAULT_KEY_COLUMN = "key"


class LabelError(ValueError):
    """Labels are missing or unusable for the requested task; the message says which and why."""


def is_missing(value: Any) -> bool:
    """True for values that mean "not annotated"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def to_binary(value: Any, *, column: str = "") -> float:
    """1.0, 0.0 or NaN (not annotated); anything else raises :class:`LabelError`."""
    if is_missing(value):
        return float("nan")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating) and value in (0, 1):
        return float(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    raise LabelError(
        f"label {column!r}: value {value!r} is not binary (use 1/0, true/false, yes/no or leave empty)"
    )


def binary_targets(labels: Sequence[Mapping[str, Any]], column: str) -> np.ndarray:
    """Float array of 0/1/NaN, one entry per study."""
    return np.array([to_binary(study.get(column), column=column) for study in labels], dtype=np.float64)


def class_targets(labels: Sequence[Mapping[str, Any]], task: MulticlassTask) -> np.ndarray:
    """Class index per study (-1 when not annotated); class names match case-insensitively."""
    if task.one_hot:
        return _one_hot_targets(labels, task)
    lookup = {name.strip().lower(): i for i, name in enumerate(task.classes)}
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, study in enumerate(labels):
        value = study.get(task.column)
        if is_missing(value):
            continue
        index = lookup.get(str(value).strip().lower())
        if index is None:
            raise LabelError(
                f"task {task.name!r}: label {task.column!r} has value {value!r}, "
                f"which is none of the classes {list(task.classes)}"
            )
        out[i] = index
    return out


def _one_hot_targets(labels: Sequence[Mapping[str, Any]], task: MulticlassTask) -> np.ndarray:
    """Class index from one 0/1 column per class; exactly one must be 1 unless all are missing."""
    hot = np.stack([binary_targets(labels, name) for name in task.classes], axis=1)
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, row in enumerate(hot):
        if np.isnan(row).all():
            continue
        if np.nansum(row) != 1:
            raise LabelError(
                f"task {task.name!r}: study {i} has {int(np.nansum(row))} of the one-hot class columns "
                f"{list(task.classes)} set; exactly one must be 1"
            )
        out[i] = int(np.nanargmax(row))
    return out


def load_label_table(path: str | Path, key_column: str = DEFAULT_KEY_COLUMN) -> dict[str, dict[str, Any]]:
    """Read a CSV or Parquet label table into ``{study key: {label: value}}``."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"label table not found: {path}")
    if path.suffix.lower() == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    if rows and key_column not in rows[0]:
        raise LabelError(f"{path}: no key column {key_column!r}; columns are {list(rows[0])}")
    return {str(row.pop(key_column)): row for row in rows}


def merge_labels(
    keys: Sequence[str],
    shard_labels: Sequence[Mapping[str, Any]],
    table: Mapping[str, Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    """Per study: shard labels updated with the table row of the same key (if any)."""
    merged = [dict(labels) for labels in shard_labels]
    if table:
        for labels, key in zip(merged, keys, strict=True):
            labels.update(table.get(key, {}))
    return merged


def available_columns(labels: Iterable[Mapping[str, Any]]) -> list[str]:
    """Label names annotated (non-missing) in at least one study, sorted."""
    return sorted({name for study in labels for name, value in study.items() if not is_missing(value)})


def check_columns(prompts: PromptSet, labels: Sequence[Mapping[str, Any]], where: str) -> None:
    """Fail with one clear message if the data lack labels the prompts file needs."""
    present = available_columns(labels)
    if not present:
        raise LabelError(
            f"{where} carries no labels, so zero-shot classification and the linear probe have nothing to "
            "score against; pass a label table with --labels (CSV or Parquet with a 'key' column), "
            "or run only --tasks retrieval"
        )
    needed = [(b, b.column) for b in prompts.binary] + [(m, c) for m in prompts.multiclass for c in m.columns]
    missing = [(task, column) for task, column in needed if column not in present]
    if missing:
        lines = [f"  - {_describe(task, column)}{_hint(column, present)}" for task, column in missing]
        raise LabelError(
            f"{prompts.source} names labels that no study in {where} carries:\n"
            + "\n".join(lines)
            + f"\nlabels present: {present}"
        )


def _describe(task: BinaryLabel | MulticlassTask, column: str) -> str:
    return repr(task.name) if column == task.name else f"{task.name!r} (column {column!r})"


def _hint(column: str, present: list[str]) -> str:
    close = difflib.get_close_matches(column, present, n=1, cutoff=0.6)
    return f": did you mean {close[0]!r}?" if close else ""
