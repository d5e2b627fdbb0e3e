"""Study-shard format v1: the in-memory data model every stage of hlip shares.

A :class:`Study` is one sample of a dataset (one radiology study: its scans and its
report). The ingest pipeline builds them from DICOM or NIfTI, the shard writer stores
them, and the readers hand them back with each scan's voxels as a lazy zarr array, so
the same type flows from ingest to training and evaluation.

Coordinate conventions (documented in docs/shard-format.md):

* a scan's voxels are an int16 array indexed ``[d, h, w]`` (slice, row, column);
* ``Scan.affine`` maps the index ``(d, h, w, 1)`` to DICOM patient coordinates
  ``(x, y, z, 1)`` in millimetres, LPS (x to the patient's left, y posterior, z superior);
* ``Scan.spacing`` is ``(d, h, w)`` in mm and equals the column norms of the affine;
* physical intensity = ``stored * intensity_slope + intensity_intercept`` in ``intensity_unit``
  (CT: ``"HU"`` with slope 1 and intercept 0).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "hlip-study-shards"
FORMAT_VERSION = "1.1"
"""Major.minor. Readers accept any minor of a major they know and reject other majors."""

SHARD_PREFIX = "ds"
DEFAULT_MAX_SHARD_BYTES = 1 << 30

JSON_MEMBER = "json"
TEXT_MEMBER = "txt"
ARRAYS_MEMBER = "zarr.zip"
MEMBERS = (JSON_MEMBER, TEXT_MEMBER, ARRAYS_MEMBER)


@dataclass
class Scan:
    """One 3-D volume of a study (one stack of one series).

    ``array`` is a numpy int16 array when writing; readers return a lazy array-like
    (a zarr array) that decodes only the slabs of slices a slice selection touches.
    """

    name: str
    array: Any
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    series_number: int | None = None
    series_description: str = ""
    intensity_unit: str = "HU"
    intensity_slope: float = 1.0
    intensity_intercept: float = 0.0
    source_file_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)


@dataclass
class Study:
    """One sample: a study's scans, its report text and its labels.

    ``key`` is the pseudonymous study id (a keyed hash, never a DICOM UID) and names
    the sample's members in the shard. ``meta`` holds allow-listed study metadata only.
    """

    key: str
    modality: str
    scans: list[Scan]
    report: str = ""
    labels: dict[str, Any] = field(default_factory=dict)
    body_part: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""


# --- storage layout constants (docs/shard-format.md) ---------------------------------

KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Sample keys: safe file names without dots (webdataset splits a member name at its
first dot) and short enough for a plain ustar header (``<key>.zarr.zip`` <= 100 chars)."""

SCAN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Scan names: zarr array names and ``<name>.nii.gz`` export file names."""

SHARD_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}-[0-9]{6}\.tar")
"""Shard file names as the manifest lists them: ``<prefix>-NNNNNN.tar``, no folders."""

DEFAULT_SLAB_DEPTH = 8
"""Slices per zarr chunk; bench/shards.py measures the trade-off (docs/performance.md)."""


@dataclass(frozen=True)
class SlabCodec:
    """Blosc settings of a scan's slabs (byte shuffle of the int16 values, then ``cname`` at
    ``clevel``). Readers need not be told: each array's ``zarr.json`` names its codec and
    every Blosc frame carries its own settings."""

    cname: str
    clevel: int
    shuffle: str = "shuffle"
    blocksize: int = 0
    """Bytes per Blosc block (0: Blosc chooses). Blosc's own choice for zstd at level 1 is
    small blocks, on which zstd's per-block start-up costs half its speed both ways."""


SLAB_CODECS = {
    "zstd": SlabCodec("zstd", 1, blocksize=1 << 22),
    "lz4hc": SlabCodec("lz4hc", 5),
}
"""The codecs a dataset can be written with. ``zstd`` (the default) makes the smallest shards,
in blocks of up to 4 MiB (a whole slab of 8 planes of 512x512), which compress and decode
about twice as fast as Blosc's default blocks for 1% more bytes; ``lz4hc`` makes shards about
a fifth larger that decode about three times faster still, for training loaders that are
CPU-bound, at a slower write (bench/shards.py, bench/loader.py; docs/performance.md)."""

DEFAULT_CODEC = "zstd"


def slab_codec(name: str) -> SlabCodec:
    """The codec called ``name``; ValueError lists the known ones."""
    if name not in SLAB_CODECS:
        raise ValueError(f"unknown slab codec {name!r}; known: {', '.join(SLAB_CODECS)}")
    return SLAB_CODECS[name]


ARRAY_DTYPE = np.dtype("int16")

MANIFEST_FILE = "manifest.parquet"
SCANS_FILE = "scans.parquet"
LOCAL_DIR = "_ingest"
"""The ingest's local folder in a dataset directory (index, per-file outcomes, secret):
kept where the dataset was made, never shipped, so not among the files a dataset lists."""


LOCK_FILE = "_ingest.lock"
"""Present while an ingest writes the dataset (hlip/ingest/lock.py); not a dataset file."""


class ShardFormatError(ValueError):
    """A dataset, shard or sample that does not follow the shard format."""


def parse_version(version: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; a malformed version is a format error."""
    major, sep, minor = str(version).partition(".")
    if not (sep and major.isdigit() and minor.isdigit()):
        raise ShardFormatError(f"malformed format version {version!r} (expected MAJOR.MINOR)")
    return int(major), int(minor)


def check_version(version: str, where: str = "") -> None:
    """Accept any minor of the supported major; reject other majors with both versions named."""
    found, supported = parse_version(version)[0], parse_version(FORMAT_VERSION)[0]
    if found != supported:
        at = f" in {where}" if where else ""
        raise ShardFormatError(
            f"unsupported {FORMAT_NAME} version {version}{at}: this reader supports "
            f"major version {supported} ({supported}.x); found major version {found}"
        )


def check_key(key: object) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"unsafe study key {key!r}: keys must match [A-Za-z0-9_-]{{1,64}} "
            "(no dots: webdataset splits member names at the first dot)"
        )
    return key


def check_name(name: object, pattern: re.Pattern, what: str) -> str:
    """``name`` if it matches ``pattern``; a dataset naming a file otherwise (a path, ``..``)
    is damaged or hostile, so this is a ShardFormatError."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ShardFormatError(f"unsafe {what} {name!r} (must match {pattern.pattern})")
    return name


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, resolved, refused unless it lies inside ``folder``: every file a
    writer derives from data (keys, scan names, shard names) goes through here, so no
    name can place a file elsewhere (``/tmp/x``, ``../x``, a symlink out)."""
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if target.parent != root:
        raise ShardFormatError(f"refusing to write {name!r}: it resolves to {target}, outside {root}")
    return target


def validate_scan(scan: Scan, key: str) -> None:
    """Raise ValueError naming the study and scan when a scan cannot be stored losslessly."""
    where = f"study {key!r} scan {scan.name!r}"
    if not isinstance(scan.name, str) or not SCAN_NAME_PATTERN.fullmatch(scan.name):
        raise ValueError(
            f"study {key!r}: unsafe scan name {scan.name!r} (must match {SCAN_NAME_PATTERN.pattern})"
        )
    array = scan.array
    if not isinstance(array, np.ndarray) or array.dtype != ARRAY_DTYPE:
        found = getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"{where}: array must be a numpy int16 array, got {found}")
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{where}: array must be 3-D [d, h, w] and non-empty, got shape {array.shape}")
    spacing = np.asarray(scan.spacing if scan.spacing is not None else [], dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(
            f"{where}: spacing must be three positive finite mm values (d, h, w), got {scan.spacing!r}"
        )
    affine = np.asarray(scan.affine, dtype=float) if scan.affine is not None else np.empty(0)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{where}: affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"{where}: affine last row must be [0, 0, 0, 1], got {affine[3].tolist()}")


def validate_study(study: Study) -> None:
    """Raise ValueError with the reason when ``study`` cannot be written as format v1."""
    key = check_key(study.key)
    if not study.scans:
        raise ValueError(f"study {key!r}: has no scans")
    names = [scan.name for scan in study.scans]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"study {key!r}: duplicate scan names {duplicates}")
    for scan in study.scans:
        validate_scan(scan, key)
    if not isinstance(study.report, str):
        raise ValueError(f"study {key!r}: report must be a str, got {type(study.report).__name__}")
