"""Look inside a dataset: listing, statistics, slice montages, verification, NIfTI export.

The ``hlip-shards`` CLI is a thin wrapper around these functions.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from hlip.shards import format as fmt
from hlip.shards.format import Scan, ShardFormatError, Study
from hlip.shards.reader import ShardDataset, decode_study, parse_record
from hlip.shards.writer import MANIFEST_SCHEMA, MEMBER_COLUMNS, SCANS_SCHEMA, STAGING_DIR, TAR_BLOCK

Progress = Callable[[int], None]

CT_WINDOWS = {"soft": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}
"""CT display windows as (level, width) in HU."""

PERCENTILE_WINDOW = (1.0, 99.0)
"""Display range for intensities without a standard window (MR, PET, ...)."""


# --- listing and statistics -------------------------------------------------------------


def list_studies(dataset: ShardDataset) -> list[dict[str, Any]]:
    """One row per study: key, modality, report length and its scans' names and shapes."""
    scans: dict[str, list[str]] = {}
    for row in dataset.scans.to_pylist():
        shape = "x".join(str(row[f"shape_{axis}"]) for axis in "dhw")
        scans.setdefault(row["key"], []).append(f"{row['scan']} {shape}")
    return [
        {
            "key": row["key"],
            "modality": row["modality"],
            "n_scans": row["n_scans"],
            "report_length": row["report_length"],
            "scans": scans.get(row["key"], []),
        }
        for row in dataset.manifest.select(["key", "modality", "n_scans", "report_length"]).to_pylist()
    ]


def list_versions(dataset: ShardDataset) -> list[dict[str, Any]]:
    """One row per committed version: number, commit time, studies added and superseded,
    the shards it added and the studies it holds."""
    return [
        {
            "version": version.number,
            "created": version.created or "(before versions)",
            "added": version.added,
            "superseded": version.superseded,
            "shards": len(version.shards),
            "studies": version.studies,
        }
        for version in dataset.history
    ]


@dataclass
class DatasetStats:
    """Counts and per-item distributions of a dataset."""

    n_studies: int
    n_scans: int
    n_slices: int
    total_bytes: int
    modalities: Counter
    scans_per_study: np.ndarray
    slices_per_scan: np.ndarray
    slice_spacing: np.ndarray
    pixel_spacing: np.ndarray
    report_length: np.ndarray

    def distributions(self) -> dict[str, np.ndarray]:
        return {
            "scans per study": self.scans_per_study,
            "slices per scan": self.slices_per_scan,
            "slice spacing (mm)": self.slice_spacing,
            "in-plane spacing (mm)": self.pixel_spacing,
            "report length (chars)": self.report_length,
        }


def dataset_stats(dataset: ShardDataset) -> DatasetStats:
    manifest, scans = dataset.manifest, dataset.scans
    sizes = sum(np.asarray(manifest[f"{column}_size"]).sum() for column in MEMBER_COLUMNS.values())
    return DatasetStats(
        n_studies=manifest.num_rows,
        n_scans=scans.num_rows,
        n_slices=int(np.asarray(scans["shape_d"]).sum()),
        total_bytes=int(sizes),
        modalities=Counter(manifest["modality"].to_pylist()),
        scans_per_study=np.asarray(manifest["n_scans"]),
        slices_per_scan=np.asarray(scans["shape_d"]),
        slice_spacing=np.asarray(scans["spacing_d"]),
        pixel_spacing=np.asarray(scans["spacing_h"]),
        report_length=np.asarray(manifest["report_length"]),
    )


def histogram_edges(values: np.ndarray, bins: int = 8) -> np.ndarray:
    """Bin edges: one bin per value for integers with a small range, else ``bins`` bins."""
    lo, hi = float(values.min()), float(values.max())
    if np.issubdtype(values.dtype, np.integer) and hi - lo < 2 * bins:
        return np.arange(lo, hi + 2) - 0.5
    if lo == hi:
        return np.array([lo - 0.5, hi + 0.5])
    return np.linspace(lo, hi, bins + 1)


def histogram_text(values: np.ndarray, bins: int = 8, width: int = 30) -> list[str]:
    """A histogram as text lines ``range  count  bar``."""
    if values.size == 0:
        return ["(no values)"]
    counts, edges = np.histogram(values, bins=histogram_edges(values, bins))
    scale = width / max(counts.max(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    if (np.issubdtype(values.dtype, np.integer) and np.allclose(np.diff(edges), 1.0)) or len(counts) == 1:
        labels = [f"{center:.4g}" for center in centers]
    else:
        labels = [f"{lo:.4g} - {hi:.4g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [
        f"{label:>17} {count:>6}  {'#' * int(round(count * scale))}"
        for label, count in zip(labels, counts, strict=True)
    ]


def stats_text(stats: DatasetStats) -> str:
    lines = [
        f"studies {stats.n_studies}   scans {stats.n_scans}   slices {stats.n_slices}   "
        f"bytes {stats.total_bytes / 1e6:.1f} MB",
        "modalities " + ", ".join(f"{name} {count}" for name, count in sorted(stats.modalities.items())),
    ]
    for name, values in stats.distributions().items():
        if values.size:
            lines.append(
                f"\n{name}: min {values.min():.4g}  median {np.median(values):.4g}  max {values.max():.4g}"
            )
        lines += histogram_text(values)
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stats_png(stats: DatasetStats, path: str | os.PathLike) -> None:
    """The distributions of :class:`DatasetStats` as one PNG of histograms."""
    plt = _pyplot()
    distributions = stats.distributions()
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (name, values) in zip(axes.flat, distributions.items(), strict=False):
        if values.size:
            ax.hist(values, bins=histogram_edges(values, bins=20), color="tab:blue")
        ax.set_title(name)
    modalities = sorted(stats.modalities.items())
    axes.flat[-1].bar([m for m, _ in modalities], [c for _, c in modalities], color="tab:orange")
    axes.flat[-1].set_title("studies per modality")
    figure.suptitle(f"{stats.n_studies} studies, {stats.n_scans} scans, {stats.n_slices} slices")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


# --- montage ----------------------------------------------------------------------------


def montage_indices(depth: int, count: int) -> list[int]:
    """``count`` evenly spaced slice indices from first to last (fewer if depth is small)."""
    return sorted({int(round(i)) for i in np.linspace(0, depth - 1, min(count, depth))})


def physical(scan: Scan, stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float32) * scan.intensity_slope + scan.intensity_intercept


def display_range(scan: Scan, values: np.ndarray, ct_window: str = "soft") -> tuple[float, float]:
    """CT in HU uses a fixed window (level, width); anything else the 1-99th percentiles."""
    if scan.modality == "CT" and scan.intensity_unit == "HU":
        level, width = CT_WINDOWS[ct_window]
        return level - width / 2, level + width / 2
    lo, hi = np.percentile(values, PERCENTILE_WINDOW)
    return float(lo), float(max(hi, lo + 1e-6))


def montage_png(study: Study, path: str | os.PathLike, n_slices: int = 6, ct_window: str = "soft") -> None:
    """One row per scan of evenly spaced slices (only their slabs are decoded)."""
    plt = _pyplot()
    rows = max(len(study.scans), 1)
    figure, axes = plt.subplots(rows, n_slices, figsize=(2.2 * n_slices, 2.4 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, scan in enumerate(study.scans):
        indices = montage_indices(scan.shape[0], n_slices)
        slices = physical(scan, np.stack([np.asarray(scan.array[i]) for i in indices]))
        lo, hi = display_range(scan, slices, ct_window)
        aspect = scan.spacing[1] / scan.spacing[2]
        for col, (index, image) in enumerate(zip(indices, slices, strict=True)):
            axes[row, col].imshow(
                image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest"
            )
            axes[row, col].set_title(f"{scan.name} [{index}]", fontsize=8)
    figure.suptitle(f"{study.key}  {study.modality}  {study.body_part}".strip(), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def study_summary(study: Study) -> dict[str, Any]:
    """Metadata of a study for display (everything but voxels and report)."""
    return {
        "key": study.key,
        "modality": study.modality,
        "body_part": study.body_part,
        "labels": study.labels,
        "meta": study.meta,
        "config_hash": study.config_hash,
        "scans": [
            {
                "name": s.name,
                "series": " ".join(
                    str(v) for v in (s.series_number, s.series_description) if v not in (None, "")
                ),
                "shape": list(s.shape),
                "spacing": list(s.spacing),
                "intensity": f"{s.intensity_unit} (x{s.intensity_slope:g} + {s.intensity_intercept:g})",
                "storage": storage_text(s.array),
            }
            for s in study.scans
        ],
    }


def storage_text(array: Any) -> str:
    """How a scan's voxels are stored: slab depth and codec of a zarr array (the codec a
    dataset was ingested with, ``--codec``), or "in memory"."""
    chunks = getattr(array, "chunks", None)
    compressors = getattr(array, "compressors", None)
    if chunks is None or compressors is None:
        return "in memory"
    codecs = ", ".join(
        f"{c.cname.value} {c.clevel}" if hasattr(c, "cname") else type(c).__name__ for c in compressors
    )
    return f"slabs of {chunks[0]}, {codecs or 'uncompressed'}"


# --- verification -----------------------------------------------------------------------


@dataclass
class Problem:
    """One verification failure; ``key`` is None for dataset-level problems."""

    key: str | None
    message: str


@dataclass
class VerifyReport:
    studies: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def failed_keys(self) -> list[str]:
        return sorted({p.key for p in self.problems if p.key is not None})


def _check_schema(dataset: ShardDataset) -> list[Problem]:
    """Every manifest and scans fragment of the dataset's version has the format's columns."""
    problems = []
    fragments = [(name, MANIFEST_SCHEMA) for name in dataset.version.manifests]
    fragments += [(name, SCANS_SCHEMA) for name in dataset.version.scans]
    for name, schema in fragments:
        try:
            with dataset.location.open(name) as file:
                found = pq.read_schema(file)
        except (OSError, ValueError) as error:
            problems.append(Problem(None, f"{name}: {error}"))
            continue
        for column in schema:
            if column.name not in found.names or found.field(column.name).type != column.type:
                problems.append(
                    Problem(None, f"{name}: column {column.name} ({column.type}) missing or mistyped")
                )
    return problems


def _check_tar_headers(dataset: ShardDataset, key: str) -> None:
    """Each member's tar header names ``<key>.<ext>`` and its size: catches offsets that
    point at the wrong bytes and damage to headers, which member checksums cannot see."""
    row = dataset.row(key)
    with dataset.open_shard(key, row["shard"]) as file:
        for ext, column in MEMBER_COLUMNS.items():
            file.seek(row[f"{column}_offset"] - TAR_BLOCK)
            try:
                info = tarfile.TarInfo.frombuf(file.read(TAR_BLOCK), "utf-8", "strict")
            except tarfile.HeaderError as error:
                raise ShardFormatError(f"study {key!r}: bad tar header of member {ext}: {error}") from None
            if info.name != f"{key}.{ext}" or info.size != row[f"{column}_size"]:
                raise ShardFormatError(
                    f"study {key!r}: tar header says {info.name} ({info.size} bytes) where the "
                    f"manifest expects {key}.{ext} ({row[f'{column}_size']} bytes)"
                )


def verify_study(dataset: ShardDataset, key: str) -> None:
    """Checksums, tar headers, JSON schema, and a full decode of every array."""
    members = dataset.read_members(key, verify=True)
    _check_tar_headers(dataset, key)
    parse_record(members[fmt.JSON_MEMBER], key)
    study = decode_study(key, members)
    for scan in study.scans:
        try:
            voxels = scan.array[...]
        except Exception as error:
            raise ShardFormatError(
                f"study {key!r} scan {scan.name!r}: array does not decode: {error}"
            ) from None
        if voxels.shape != scan.shape or voxels.dtype != fmt.ARRAY_DTYPE:
            raise ShardFormatError(f"study {key!r} scan {scan.name!r}: decoded {voxels.dtype}{voxels.shape}")


def _unlisted_files(dataset: ShardDataset) -> list[Problem]:
    """Files under the dataset root that its version log does not list (the local ingest
    folder, a staging area and an ingest's lock aside): whoever ships or receives a dataset
    should know of anything extra."""
    listed = dataset.listed_files()
    transient = {fmt.LOCAL_DIR, STAGING_DIR, fmt.LOCK_FILE}
    found = (name for name in dataset.location.find() if name.split("/")[0] not in transient)
    return [
        Problem(None, f"unlisted file {name} (no manifest lists it)") for name in found if name not in listed
    ]


def verify_dataset(
    path: str | os.PathLike, progress: Progress | None = None, version: int | None = None
) -> VerifyReport:
    """Verify every study of the dataset at ``path`` (at ``version``, default the latest);
    failures are collected, not raised."""
    try:
        dataset = ShardDataset(path, version=version)
    except (ShardFormatError, OSError) as error:
        return VerifyReport(problems=[Problem(None, str(error))])
    report = VerifyReport(studies=len(dataset), problems=_check_schema(dataset) + _unlisted_files(dataset))
    for key in dataset:
        try:
            verify_study(dataset, key)
        except (ShardFormatError, OSError, ValueError) as error:
            report.problems.append(Problem(key, str(error)))
        if progress is not None:
            progress(1)
    return report


# --- NIfTI export -----------------------------------------------------------------------

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DHW_TO_NIFTI = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
"""Maps a NIfTI index (i, j, k, 1) = (w, h, d, 1) to the stored index (d, h, w, 1)."""


def nifti_affine(affine_lps: np.ndarray) -> np.ndarray:
    """The NIfTI (RAS) affine of ``array.transpose(2, 1, 0)`` for an LPS ``[d, h, w]`` affine.

    NIfTI's first axis is the column (w) and the world is RAS, so
    ``A_nifti = diag(-1, -1, 1, 1) @ A_lps @ P`` with ``P`` swapping d and w.
    """
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=float) @ DHW_TO_NIFTI


def scan_to_nifti(scan: Scan):
    """A nibabel image with int16 voxels, RAS affine in qform and sform, scaling in scl_*."""
    import nibabel as nib

    data = np.asarray(scan.array[...]).transpose(2, 1, 0)
    affine = nifti_affine(scan.affine)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_slope_inter(scan.intensity_slope, scan.intensity_intercept)
    return image


def export_study(dataset: ShardDataset, key: str, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<scan>.nii.gz`` per scan, ``report.txt`` and ``study.json`` into ``out_dir``.

    The study is read and checked first (ShardFormatError, nothing written), and no name
    from the data can place a file outside ``out_dir``."""
    import nibabel as nib

    members = dataset.read_members(key)
    study = decode_study(key, members)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for scan in study.scans:
        target = fmt.path_inside(out, f"{scan.name}.nii.gz")
        nib.save(scan_to_nifti(scan), target)
        written.append(target)
    report, metadata = fmt.path_inside(out, "report.txt"), fmt.path_inside(out, "study.json")
    report.write_text(study.report, encoding="utf-8")
    record = json.loads(members[fmt.JSON_MEMBER])
    metadata.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return [*written, report, metadata]
