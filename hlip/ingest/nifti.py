"""NIfTI collections: studies given as NIfTI volumes listed in a table, as CT-RATE is distributed.

A collection table (CSV, Parquet or JSON lines) has a study id column, a volume column
(one path, several separated by ``;``, or a list), report text columns, optional
``RescaleSlope``/``RescaleIntercept`` columns (a number, or one per volume) and label
columns. Rows that share a study id are one study, so a table with one row per volume
(CT-RATE: one row per reconstruction) groups itself. :func:`ct_rate_table` turns the
CT-RATE files (reports, multi-abnormality labels, metadata) into such a table.

Geometry: NIfTI's affine maps voxel (i, j, k) to RAS+ millimetres; a :class:`Scan` wants
``[d, h, w]`` arrays whose affine maps (d, h, w) to DICOM's LPS. The array is transposed to
(k, j, i), x and y of the affine are negated, and each axis is flipped where needed so that
it runs towards the positive side (L, P or S) of the patient axis it is closest to (an
axial volume then reads like DICOM: rows top to bottom anterior to posterior, columns
right to left, slices inferior to superior). Every voxel keeps its world position.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow as pa

from hlip.ingest.deid import study_key
from hlip.ingest.reports import (
    ReportTableError,
    choose_label_columns,
    join_sections,
    read_table,
    section_headings,
)
from hlip.shards.format import Scan, Study

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
INT16_RANGE = (-32768, 32767)


class NiftiError(ValueError):
    """A volume or collection entry that cannot become a scan."""


@dataclass(frozen=True)
class NiftiTableSpec:
    """Which columns of a collection table mean what.

    ``slope_column``/``intercept_column``/``modality_column`` are used when the table has
    them; ``modality`` is the default. ``root`` resolves relative volume paths (default:
    the table's directory). Labels are the columns not named here that
    :func:`hlip.ingest.reports.choose_label_columns` allows: ``label_columns`` and the
    columns starting with one of ``label_prefixes`` when given, else the 0/1 findings."""

    study_column: str = "study_id"
    volume_column: str = "volumes"
    text_columns: Sequence[str] | Mapping[str, str] = ("report",)
    label_columns: Sequence[str] | None = None
    label_prefixes: Sequence[str] = ()
    slope_column: str = "RescaleSlope"
    intercept_column: str = "RescaleIntercept"
    modality_column: str = "modality"
    modality: str = "CT"
    body_part: str = ""
    root: str | None = None

    def headings(self) -> dict[str, str]:
        return section_headings(self.text_columns)


CT_RATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)  # fmt: skip
"""The 18 multi-abnormality label columns of CT-RATE."""

CT_RATE_SPEC = NiftiTableSpec(
    text_columns={"Findings_EN": "Findings", "Impressions_EN": "Impression"}, modality="CT", body_part="CHEST"
)
"""CT-RATE's labels are its 0/1 abnormality columns, which the default label rule takes."""


@dataclass(frozen=True)
class NiftiVolume:
    path: Path
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class NiftiStudyPlan:
    """One study of a collection, before any voxel is read."""

    study_id: str
    modality: str
    volumes: list[NiftiVolume]
    report: str = ""
    labels: dict[str, Any] = field(default_factory=dict)
    body_part: str = ""


# --- the table ---------------------------------------------------------------------------


def plan_nifti_studies(
    table: pa.Table | str | Path, spec: NiftiTableSpec = NiftiTableSpec()
) -> list[NiftiStudyPlan]:
    """Group a collection table into studies (rows sharing a study id), in first-seen order.

    Volume paths resolve against ``spec.root``, else the table's directory, else the
    working directory. A study's report is the first non-empty one of its rows; a label is
    the maximum of its rows' numeric values (positive in any reconstruction), else the
    first value; missing values leave the label absent.
    """
    root = Path(spec.root) if spec.root else None
    if not isinstance(table, pa.Table):
        root = root or Path(table).parent
        table = read_table(table, string_columns=[spec.study_column, spec.volume_column, *spec.headings()])
    _require(table, [spec.study_column, spec.volume_column, *spec.headings(), *(spec.label_columns or ())])
    labels = _label_columns(table, spec)
    plans: dict[str, NiftiStudyPlan] = {}
    for number, row in enumerate(table.to_pylist()):
        study_id = str(row[spec.study_column] or "").strip()
        if not study_id:
            raise NiftiError(f"empty {spec.study_column} in data row {number}")
        plan = plans.setdefault(
            study_id, NiftiStudyPlan(study_id, str(row.get(spec.modality_column) or spec.modality), [])
        )
        plan.body_part = plan.body_part or spec.body_part
        plan.volumes += _volumes(row, spec, root or Path.cwd())
        plan.report = plan.report or join_sections([(h, row[c]) for c, h in spec.headings().items()])
        _merge_labels(plan.labels, {c: row[c] for c in labels})
    return list(plans.values())


def _label_columns(table: pa.Table, spec: NiftiTableSpec) -> list[str]:
    named = {
        spec.study_column,
        spec.volume_column,
        spec.slope_column,
        spec.intercept_column,
        spec.modality_column,
    }
    candidates = [c for c in table.column_names if c not in named | set(spec.headings())]
    return choose_label_columns(
        table, candidates, spec.label_columns, spec.label_prefixes, "collection table"
    )


def _require(table: pa.Table, columns: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in table.column_names]
    if missing:
        raise ReportTableError(f"collection table: missing column(s) {missing}; it has {table.column_names}")


def _split(value: Any) -> list[Any]:
    """A cell holding one value, a list, or values separated by ``;``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split(";") if part.strip()]
    return [value]


def _volumes(row: Mapping[str, Any], spec: NiftiTableSpec, root: Path) -> list[NiftiVolume]:
    paths = [root / p for p in _split(row[spec.volume_column])]
    slopes = _per_volume(row.get(spec.slope_column), len(paths), 1.0, spec.slope_column)
    intercepts = _per_volume(row.get(spec.intercept_column), len(paths), 0.0, spec.intercept_column)
    return [NiftiVolume(p, s, i) for p, s, i in zip(paths, slopes, intercepts, strict=True)]


def _per_volume(value: Any, n: int, default: float, column: str) -> list[float]:
    values = [float(v) for v in _split(value) if not (isinstance(v, float) and np.isnan(v))]
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise NiftiError(f"{column} has {len(values)} values for {n} volumes")
    return values


def _merge_labels(labels: dict[str, Any], row: Mapping[str, Any]) -> None:
    for column, value in row.items():
        if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
            continue
        old = labels.get(column)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if old is None or (numeric and isinstance(old, (int, float)) and value > old):
            labels[column] = value


# --- CT-RATE --------------------------------------------------------------------------------


def ct_rate_study_id(volume_name: str) -> str:
    """``train_1_a_1.nii.gz`` -> ``train_1_a``: the reconstructions of one scan share it."""
    stem = re.sub(r"\.nii(\.gz)?$", "", volume_name)
    return re.sub(r"_\d+$", "", stem)


def ct_rate_table(
    reports: str | Path,
    volumes_dir: str | Path,
    labels: str | Path | None = None,
    metadata: str | Path | None = None,
) -> pa.Table:
    """A collection table (one row per volume, for :data:`CT_RATE_SPEC`) from CT-RATE's files:
    the reports CSV (VolumeName, Findings_EN, Impressions_EN; other columns are not used), the multi-abnormality
    labels CSV, the metadata CSV (RescaleSlope, RescaleIntercept) and the folder of volumes
    (searched recursively: ``train/train_1/train_1_a/train_1_a_1.nii.gz``). Volumes absent
    from the folder are left out."""
    found = {p.name: p for pattern in ("*.nii.gz", "*.nii") for p in Path(volumes_dir).rglob(pattern)}
    texts = read_table(reports, string_columns=["VolumeName", *CT_RATE_SPEC.headings()])
    rows = {r["VolumeName"]: {c: r.get(c) for c in CT_RATE_SPEC.headings()} for r in texts.to_pylist()}
    for extra, columns in ((labels, CT_RATE_LABELS), (metadata, ("RescaleSlope", "RescaleIntercept"))):
        if extra is not None:
            for row in read_table(extra, string_columns=["VolumeName"]).to_pylist():
                if row["VolumeName"] in rows:
                    rows[row["VolumeName"]].update({c: row[c] for c in columns if c in row})
    table = [
        {"study_id": ct_rate_study_id(name), "volumes": str(found[name]), **row}
        for name, row in sorted(rows.items())
        if name in found
    ]
    return pa.Table.from_pylist(table)


# --- volumes -------------------------------------------------------------------------------


def nifti_to_dhw_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI array ``[i, j, k]`` with its RAS affine as a ``[d, h, w]`` array and an affine
    from (d, h, w, 1) to LPS, each axis flipped to run towards L, P or S (see module doc)."""
    lps = RAS_TO_LPS @ np.asarray(affine, float)
    array = np.asarray(data).transpose(2, 1, 0)
    out = np.eye(4)
    out[:, :3] = lps[:, [2, 1, 0]]
    out[:, 3] = lps[:, 3]
    for axis in range(3):
        column = out[:3, axis]
        if column[np.argmax(np.abs(column))] < 0:
            out[:3, 3] += (array.shape[axis] - 1) * column
            out[:3, axis] = -column
            array = np.flip(array, axis)
    return np.ascontiguousarray(array), out


def read_nifti_scan(volume: NiftiVolume, modality: str, name: str) -> Scan:
    """One volume as a :class:`Scan`: CT in HU (NIfTI scaling, then the table's slope and
    intercept), other modalities scaled into int16 with the scale recorded."""
    try:
        image = nib.load(volume.path)
    except (FileNotFoundError, nib.filebasedimages.ImageFileError) as error:
        raise NiftiError(f"{volume.path}: {error}") from error
    proxy = image.dataobj
    raw = np.asarray(proxy.get_unscaled())
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise NiftiError(f"{volume.path}: a 3-D volume is needed, this one has shape {raw.shape}")
    slope = _finite(proxy.slope, 1.0) * volume.slope
    intercept = _finite(proxy.inter, 0.0) * volume.slope + volume.intercept
    array, affine = nifti_to_dhw_lps(raw, image.affine)
    if modality == "CT":
        values, unit, scale, offset = _hu_int16(array, slope, intercept), "HU", 1.0, 0.0
    else:
        values, scale = _scaled_int16(array, slope, intercept)
        unit, offset = "", 0.0
    return Scan(
        name=name,
        array=values,
        spacing=tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),
        affine=affine,
        modality=modality,
        intensity_unit=unit,
        intensity_slope=scale,
        intensity_intercept=offset,
        source_file_count=1,
        extra={"source_format": "nifti"},
    )


def _finite(value: Any, default: float) -> float:
    value = float(value) if value is not None else default
    return value if np.isfinite(value) else default


def _hu_int16(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and float(intercept).is_integer() and raw.dtype.kind in "iu":
        return np.clip(raw.astype(np.int32) + int(intercept), *INT16_RANGE).astype(np.int16)
    return np.clip(np.rint(raw.astype(np.float32) * slope + intercept), *INT16_RANGE).astype(np.int16)


def _scaled_int16(raw: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, float]:
    """Values into int16 as ``stored * scale``; integers that fit are kept as they are."""
    values = raw.astype(np.float64) * slope + intercept
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if np.all(values == np.rint(values)) and peak <= INT16_RANGE[1]:
        return values.astype(np.int16), 1.0
    scale = peak / 32000.0 if peak > 0 else 1.0
    return np.rint(values / scale).astype(np.int16), scale


def _scan_name(path: Path, study_id: str, index: int) -> str:
    """The volume's name after the study id (CT-RATE ``train_1_a_2`` -> ``2``), else
    ``volume<index>``: file names may carry PHI, so only that remainder is kept."""
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name)
    rest = stem[len(study_id) :].strip("_-. ") if stem.startswith(study_id) else ""
    return re.sub(r"[^0-9A-Za-z_]", "_", rest) if rest else f"volume{index}"


def build_nifti_study(plan: NiftiStudyPlan, secret: bytes, config_hash: str = "") -> Study:
    """Read a planned study's volumes; its key is the keyed hash of its study id."""
    if not plan.volumes:
        raise NiftiError(f"study {plan.study_id!r} lists no volume")
    scans = [
        read_nifti_scan(v, plan.modality, _scan_name(v.path, plan.study_id, i))
        for i, v in enumerate(plan.volumes)
    ]
    for number, scan in enumerate(scans, start=1):
        scan.series_number = number
    return Study(
        key=study_key(plan.study_id, secret),
        modality=plan.modality,
        scans=scans,
        report=plan.report,
        labels=dict(plan.labels),
        body_part=plan.body_part,
        meta={"Modality": plan.modality},
        config_hash=config_hash,
    )


def iter_nifti_studies(
    table: pa.Table | str | Path,
    spec: NiftiTableSpec = NiftiTableSpec(),
    *,
    secret: bytes,
    config_hash: str = "",
) -> Iterator[Study]:
    """Every study of a collection, read one at a time."""
    for plan in plan_nifti_studies(table, spec):
        yield build_nifti_study(plan, secret, config_hash)
