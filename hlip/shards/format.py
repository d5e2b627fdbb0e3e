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

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_NAME = "hlip-study-shards"
FORMAT_VERSION = "1.0"
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
