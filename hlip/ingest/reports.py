"""Radiology reports: report tables (CSV, Parquet, JSONL), DICOM SR text, text cleaning.

A report table has one row per study: a key column (StudyInstanceUID or AccessionNumber),
one or more text columns (joined into one report with section headings), and other
columns, of which an allow-list becomes the study's labels (:func:`choose_label_columns`):
hospital exports carry MRNs, names, birth dates and exam dates beside the findings, and a
label is copied into every shard and manifest. DICOM Structured Reports in a study are the
other source of report text (:func:`sr_text`).
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from hlip.ingest.deid import PHI_KEYWORDS

TABLE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


IDENTIFIER_COLUMNS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", *PHI_KEYWORDS})
"""Columns never taken as labels by default: identifiers and PHI (a label reaches the shards)."""


IDENTIFYING_NAME_PARTS = frozenset({
    "name", "names", "dob", "birth", "birthday", "birthdate", "date", "dates", "time", "datetime",
    "timestamp", "dt", "id", "ids", "uid", "mrn", "accession", "acc", "ssn", "nhs", "insurance",
    "phone", "tel", "telephone", "mobile", "fax", "email", "mail", "address", "street", "city",
    "zip", "zipcode", "postcode", "postal", "patient", "pt", "physician", "doctor", "radiologist",
    "referring", "operator", "author", "signed", "surname", "firstname", "lastname",
})  # fmt: skip
"""Words of a column name that mark it identifying (``MRN``, ``patient_name``, ``DOB``,
``exam_date``, ``PatientID``...): such a column never becomes a label, even when asked."""

_IDENTIFYING_SUBSTRINGS = ("mrn", "patient", "birth", "accession", "phone", "address", "email", "physician")
"""Found inside run-together names too (``patientname``, ``dateofbirth``)."""

FREE_TEXT_CHARS, FREE_TEXT_WORDS = 40, 5
"""A label value longer than this, or of more words, is free text (it may quote the report)."""

DISTINCT_ID_ROWS = 20
"""A text column, or one of integers reaching four digits, whose values all differ over at
least this many rows is an identifier (ages and scores repeat; record numbers do not)."""

_DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|(19|20)\d{6}")
_PHONE = re.compile(r"\+?\d[\d ().-]{6,}\d")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.\w+")
_DIGITS = re.compile(r"\d{5,}")

log = logging.getLogger(__name__)


class ReportTableError(ValueError):
    """A report table that cannot be used as asked (missing column, duplicate or empty keys)."""


@dataclass(frozen=True)
class Report:
    """A study's report text (cleaned) and its labels (column -> value; absent when missing)."""

    text: str
    labels: dict[str, Any] = field(default_factory=dict)


# --- tables ------------------------------------------------------------------------------


def read_table(path: str | Path, string_columns: Sequence[str] = ()) -> pa.Table:
    """Read a CSV/TSV, Parquet or JSON-lines table; ``string_columns`` are read as text.

    Reading identifiers as text keeps what type inference would lose (leading zeros of
    accession numbers, long numeric IDs). CSV values may span lines (quoted reports).
    """
    path = Path(path)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ReportTableError(
            f"{path}: unknown table type {path.suffix!r}; use one of {sorted(TABLE_SUFFIXES)}"
        )
    if kind == "parquet":
        table = pq.read_table(path)
    elif kind == "jsonl":
        table = pa_json.read_json(path)
    else:
        parse = pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
        convert = pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns})
        table = pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
    return table


def load_report_table(
    path: str | Path,
    key_column: str = "StudyInstanceUID",
    text_columns: Sequence[str] | Mapping[str, str] = ("report",),
    label_columns: Sequence[str] | None = None,
    label_prefixes: Sequence[str] = (),
) -> dict[str, Report]:
    """Reports by key (the stripped text of ``key_column``, read as text: leading zeros kept).

    Several ``text_columns`` are joined into sections headed by the column name
    (``Findings_EN`` -> "Findings:"); a mapping column -> heading sets the headings.
    Labels are the columns :func:`choose_label_columns` allows; label values keep their
    type (numbers stay numbers) and a missing value (null, empty, NaN) leaves the label absent.
    """
    headings = section_headings(text_columns)
    table = read_table(path, string_columns=[key_column, *headings])
    _require_columns(path, table, [key_column, *headings, *(label_columns or ())])
    candidates = [c for c in table.column_names if c != key_column and c not in headings]
    labels = choose_label_columns(table, candidates, label_columns, label_prefixes, where=str(path))
    _require_columns(path, table, [key_column, *headings, *labels])
    rows = table.select([key_column, *headings, *labels]).to_pylist()
    keys = [_key(row[key_column]) for row in rows]
    _check_keys(path, key_column, keys)
    return {
        key: Report(
            text=join_sections([(headings[c], row[c]) for c in headings]),
            labels={c: row[c] for c in labels if not _missing(row[c])},
        )
        for key, row in zip(keys, rows, strict=True)
    }


def section_headings(text_columns: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Text column -> section heading: none for a single column, else from the column name."""
    if isinstance(text_columns, str):
        text_columns = (text_columns,)
    if isinstance(text_columns, Mapping):
        return dict(text_columns)
    if len(text_columns) == 1:
        return {text_columns[0]: ""}
    return {column: section_heading(column) for column in text_columns}


def section_heading(column: str) -> str:
    """``Findings_EN`` -> ``Findings``; ``clinical_information`` -> ``Clinical information``."""
    name = re.sub(r"_[A-Z]{2}$", "", column).replace("_", " ").strip()
    return name[:1].upper() + name[1:]


def choose_label_columns(
    table: pa.Table,
    candidates: Sequence[str],
    label_columns: Sequence[str] | None = None,
    label_prefixes: Sequence[str] = (),
    where: str = "report table",
) -> list[str]:
    """The columns of ``table`` that become labels: an allow-list, since a label reaches
    every shard and manifest.

    Asked for (``label_columns`` by name, and every candidate starting with one of
    ``label_prefixes``): those columns, each checked by :func:`label_refusal`; an
    identifying, date-like or free-text one is refused with ReportTableError, not dropped.
    Not asked (neither given): only candidates that look like binary findings, all of
    whose values are 0/1 or true/false, under a name that does not identify; the other
    candidates are left out, and named in a warning so that none is lost unnoticed.
    """
    if label_columns is None and not label_prefixes:
        chosen = [c for c in candidates if _binary(table[c]) and not identifying_name(c)]
        left_out = [c for c in candidates if c not in chosen]
        if left_out:
            log.warning(
                "%s: column(s) %s not taken as labels (only 0/1 findings are by default; "
                "allow one with --label-column NAME)",
                where,
                ", ".join(left_out),
            )
        return chosen
    asked = [*(label_columns or ()), *(c for c in candidates if c.startswith(tuple(label_prefixes)))]
    chosen = list(dict.fromkeys(asked))
    refusals = [f"{c!r} ({reason})" for c in chosen if (reason := label_refusal(c, table[c]))]
    if refusals:
        raise ReportTableError(
            f"{where}: refusing label column(s) {', '.join(refusals)}: identifiers, dates and "
            "free text never become labels (docs/ingest.md, de-identification)"
        )
    return chosen


def identifying_name(column: str) -> bool:
    """Whether a column's name marks it as an identifier or PHI (:data:`IDENTIFIER_COLUMNS`,
    :data:`IDENTIFYING_NAME_PARTS`)."""
    if column in IDENTIFIER_COLUMNS:
        return True
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", column)
    lowered = column.lower()
    return any(w.lower() in IDENTIFYING_NAME_PARTS for w in words) or any(
        part in lowered for part in _IDENTIFYING_SUBSTRINGS
    )


def label_refusal(column: str, values: pa.ChunkedArray) -> str | None:
    """Why ``column`` may not be a label, or None: an identifying name, date or time
    values, text that is long (free text), holds a date, a DICOM person name (``^``), a
    phone number, an e-mail address or a long digit run, or text or integers of four or
    more digits that differ in every row (an identifier, e.g. an MRN under another name)."""
    if identifying_name(column):
        return "identifying name"
    kind = values.type
    if pa.types.is_temporal(kind):
        return "date or time values"
    present = [v for v in values.to_pylist() if not _missing(v)]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        for value in present:
            if len(value) > FREE_TEXT_CHARS or len(value.split()) > FREE_TEXT_WORDS:
                return "free text"
            for pattern, reason in ((_DATE, "a date"), (_EMAIL, "an e-mail address"), (_PHONE, "a phone number"),
                                    (_DIGITS, "a long number")):  # fmt: skip
                if pattern.search(value):
                    return f"values hold {reason}"
            if "^" in value:
                return "values hold a DICOM person name"
    if pa.types.is_integer(kind) and any(_DATE.fullmatch(str(v)) for v in present):
        return "values hold a date"
    code_like = pa.types.is_string(kind) or (
        pa.types.is_integer(kind) and max(map(abs, present), default=0) >= 1000
    )
    if code_like and len(present) >= DISTINCT_ID_ROWS and len(set(present)) == len(present):
        return "every value differs: an identifier"
    return None


def _binary(values: pa.ChunkedArray) -> bool:
    """All present values 0/1 (integers, floats or booleans), and at least one present."""
    if not (
        pa.types.is_boolean(values.type)
        or pa.types.is_integer(values.type)
        or pa.types.is_floating(values.type)
    ):
        return False
    present = {v for v in values.to_pylist() if not _missing(v)}
    return bool(present) and present <= {0, 1}


def _require_columns(path: str | Path, table: pa.Table, columns: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in table.column_names]
    if missing:
        raise ReportTableError(f"{path}: missing column(s) {missing}; the table has {table.column_names}")


def _key(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _check_keys(path: str | Path, key_column: str, keys: Sequence[str]) -> None:
    empty = [i for i, key in enumerate(keys) if not key]
    if empty:
        raise ReportTableError(f"{path}: empty {key_column} in data row(s) {_some(empty)}")
    duplicates = [key for key, count in Counter(keys).items() if count > 1]
    if duplicates:
        raise ReportTableError(f"{path}: duplicate {key_column} value(s) {_some(duplicates)}")


def _some(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def join_sections(sections: Sequence[tuple[str, Any]]) -> str:
    """Cleaned sections joined by blank lines, each under ``Heading:``; empty ones skipped."""
    parts = []
    for heading, body in sections:
        text = "" if _missing(body) else clean_text(str(body))
        if text:
            parts.append(f"{heading}:\n{text}" if heading else text)
    return "\n\n".join(parts)


# --- text cleaning -----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")


def clean_text(text: str) -> str:
    """Unicode NFC, no control or zero-width characters, ``\\n`` line ends, single spaces,
    no trailing spaces, at most one blank line in a row, no surrounding whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text.replace("\t", " "))
    lines = [re.sub(r" {2,}", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- DICOM structured reports -----------------------------------------------------------

_CONTENT_RELATIONSHIPS = {"CONTAINS", "INFERRED FROM", "HAS PROPERTIES", None}
"""Followed when walking an SR tree. Not followed: HAS OBS CONTEXT and HAS ACQ CONTEXT
(observer names, organisations, dates: context, often PHI), HAS CONCEPT MOD, SELECTED FROM."""


def sr_text(dataset: Any) -> str:
    """The report text of a DICOM SR document (cleaned).

    Walks the content tree from the document root: a CONTAINER gives a section headed by
    its concept name (``Findings:``) holding its children; TEXT gives its value; CODE and
    NUM give ``Name: value`` (``Diameter: 3 cm``). Children of a container whose
    ContinuityOfContent is CONTINUOUS are joined into one sentence run. PNAME, DATE, TIME,
    DATETIME, UIDREF and references to images are left out.
    """
    blocks = _children(dataset)
    return clean_text("\n\n".join(b for b in blocks if b))


def _children(item: Any) -> list[str]:
    continuous = item.get("ContinuityOfContent") == "CONTINUOUS"
    parts = []
    for child in item.get("ContentSequence", []) or []:
        if child.get("RelationshipType") in _CONTENT_RELATIONSHIPS:
            parts.append(_render(child, named=not continuous))
    parts = [p for p in parts if p]
    if continuous:
        return [" ".join(parts)] if parts else []
    return parts


def _render(item: Any, named: bool) -> str:
    """One content item; ``named`` prefixes CODE and NUM values with their concept name
    (not inside a CONTINUOUS run, where the values are words of a sentence)."""
    value_type = item.get("ValueType")
    name = _concept_name(item)
    if value_type == "CONTAINER":
        body = "\n".join(_children(item))
        return f"{name}:\n{body}" if name and body else body
    if value_type == "TEXT":
        value = str(item.get("TextValue", "") or "").strip()
    elif value_type in ("CODE", "NUM"):
        value = _code_meaning(item.get("ConceptCodeSequence")) if value_type == "CODE" else _numeric(item)
        value = f"{name}: {value}" if named and name and value else value
    else:
        return ""
    return "\n".join(p for p in [value, *_children(item)] if p)


def _concept_name(item: Any) -> str:
    return _code_meaning(item.get("ConceptNameCodeSequence"))


def _code_meaning(sequence: Any) -> str:
    return str(sequence[0].get("CodeMeaning", "") or "").strip() if sequence else ""


def _numeric(item: Any) -> str:
    measured = item.get("MeasuredValueSequence")
    if not measured:
        return ""
    value = str(measured[0].get("NumericValue", "") or "").strip()
    units = measured[0].get("MeasurementUnitsCodeSequence")
    unit = str(units[0].get("CodeValue", "") or "").strip() if units else ""
    return f"{value} {unit}".strip() if unit not in ("", "1") else value
