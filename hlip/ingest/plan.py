"""Plan stage: a pure function of the index deciding studies, scans and rejects.

Every file of the index ends in exactly one outcome: a slice source of at least one scan,
the source of a study's report (DICOM SR), or a reject with a reason code from
:data:`REASONS`. No pixel data is read here; geometry comes from the header fields the
index kept, so the rules below are unit-testable with hand-made tables.

The rules (documented for users in docs/ingest.md, "Planning rules"):

1. File level. Unreadable files, DICOMDIRs, repeated SOPInstanceUIDs, non-image SOP
   classes (secondary captures, presentation states, raw data, dose reports, encapsulated
   documents, ...), burned-in annotation, non-grayscale pixels, localizers (ImageType
   LOCALIZER or a series description such as "scout"), dose screens and images without
   usable geometry are rejected. SR documents become report sources of their study.
2. Slices. Every remaining file becomes slices: a classic image one, an enhanced
   multi-frame object one per frame (geometry from its functional groups), a Siemens
   mosaic one per tile (positions corrected as dcm2niix does).
3. Stacks. Slices are grouped by study, SeriesInstanceUID *and* SeriesNumber (one UID is
   sometimes shared by several series), orientation, image shape, pixel spacing, echo,
   complex component (magnitude/phase/real/imaginary), ORIGINAL/DERIVED and enhanced
   StackID. A series whose stacks have mutually orthogonal orientations is a 3-plane
   localizer. Enhanced copies of classic images in the same study are dropped.
4. Volumes. Within a stack, slices at the same position along the normal are different
   time points, diffusion directions or acquisitions of one location: when every
   position holds the same number ``k > 1`` of slices the stack is ``k`` volumes (ordered
   by TemporalPositionIdentifier, AcquisitionNumber, InstanceNumber, frame); a single
   position is "not a volume"; unequal counts are refused.
5. Checks. Volumes with fewer than ``min_slices`` slices, or with an isolated step larger
   than ``gap_factor`` x the median slice step (missing slices), are rejected. Two or three
   runs of constant spacing (a change of spacing regime, as in GE sequential head CT) are
   kept; they, other uneven spacing and gantry tilt are flagged on the scan for the build
   stage (:meth:`hlip.ingest.geometry.StackGeometry.spacing_rule` says which rule fired).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from hlip.ingest import geometry
from hlip.ingest.mosaic import mosaic_grid

REASONS: dict[str, str] = {
    "empty": "zero-byte file",
    "not_dicom": "not a DICOM file",
    "truncated": "DICOM file that ends early (header or pixel data cut off)",
    "unreadable": "DICOM file that could not be parsed",
    "dicomdir": "DICOMDIR media directory (an index of other files, no image)",
    "duplicate_instance": "another file holds the same SOPInstanceUID; the first one (by file id) is kept",
    "duplicate_enhanced_copy": "enhanced multi-frame copy of classic images that are kept",
    "report_without_images": "SR report of a study in which no scan was kept",
    "dose_report": "radiation dose structured report (RDSR)",
    "dose_screen": "dose information captured as an image",
    "secondary_capture": "secondary capture image (screenshot, scanned document, rendering)",
    "presentation_state": "presentation state (display settings, no pixels)",
    "raw_data": "raw data or vendor-private non-image object",
    "encapsulated_document": "encapsulated document (PDF, CDA, ...)",
    "unsupported_sop_class": "SOP class that is not a CT/MR/PET cross-sectional image",
    "no_pixel_data": "image object without pixel data (often a file cut off before its pixels)",
    "burned_in_annotation": "image with burned-in annotation (BurnedInAnnotation = YES)",
    "not_grayscale": "colour or palette image (not one sample per pixel)",
    "localizer": "localizer/scout image or 3-plane localizer series",
    "missing_geometry": "ImagePositionPatient, ImageOrientationPatient, PixelSpacing or mosaic layout missing",
    "invalid_geometry": "ImageOrientationPatient or PixelSpacing not a valid orthonormal frame",
    "not_a_volume": "all slices of the stack lie at one position",
    "inconsistent_slice_count": "slice positions hold different numbers of images (cannot form volumes)",
    "too_few_slices": "stack with fewer slices than PlanConfig.min_slices",
    "missing_slices": "isolated step larger than PlanConfig.gap_factor x the median step (missing files)",
    "extra_volume": "time point beyond PlanConfig.max_volumes_per_series",
    # Raised by the build stage (hlip.ingest.volume.ScanRejected).
    "decode_error": "pixel data could not be decoded",
    "uneven_spacing": "uneven slice spacing and no target spacing to resample to (native mode)",
    "too_large": "volume larger than VolumeConfig.max_voxels",
}

# SOP classes (PS3.4 B.5) grouped by what the plan does with them.
_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image (refused as not grayscale)
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
}
_REPORT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
}
_DOSE_SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
}
_SOP_CLASS_PREFIX_REASONS = (
    ("1.2.840.10008.5.1.4.1.1.7", "secondary_capture"),  # and its multi-frame variants .7.1-.7.4
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation_state"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated_document"),
)
_RAW_DATA_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
    "1.3.12.2.1107.5.9.1",  # Siemens CSA Non-Image
}
_VOLUME_MODALITIES = {"CT", "MR", "PT"}
"""Modalities accepted from files that lack a SOPClassUID (old ACR-NEMA style)."""

DEFAULT_LOCALIZER_HINTS = (
    r"locali[sz]er",
    r"scout",  # no word boundary: Siemens names them "AAHead_Scout"
    r"survey",
    r"surview",
    r"topogram",
    r"scanogram",
    r"\b3[- _]?pl(ane)?\b",
    r"tri[- _]?pilot",
)
DEFAULT_DOSE_HINTS = (
    r"dose[ _-]?(report|info|summary|record|sheet)",
    r"patient protocol",
    r"dosisprotokoll",
    r"screen ?save",
)
"""Series descriptions of dose screens; a bare "dose" would also hit "Low Dose Chest" CTs."""
_CAPTURE_IMAGE_TYPES = {"SCREEN SAVE", "DOSE_INFO", "DOSE INFO", "SCREENSHOT"}


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of the planning rules (see the module docstring)."""

    min_slices: int = 5
    gap_factor: float = 1.5
    uneven_tolerance: float = 0.1
    """Largest deviation of a slice from an even grid, as a fraction of the mean step."""
    tilt_tolerance_px: float = 0.05
    """In-plane drift over a whole stack (pixels) above which the stack counts as tilted."""
    position_tolerance_mm: float = 0.01
    orientation_tolerance: float = geometry.ORIENTATION_TOLERANCE
    max_volumes_per_series: int | None = None
    """Keep only the first N time points/directions of a 4-D series (None: all)."""
    localizer_hints: tuple[str, ...] = DEFAULT_LOCALIZER_HINTS
    dose_hints: tuple[str, ...] = DEFAULT_DOSE_HINTS


@dataclass(frozen=True)
class SliceRef:
    """One 2-D slice: a frame of a file (0 for single-frame files) or a mosaic tile."""

    file_id: str
    frame: int = 0
    tile: int = 0
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class ScanPlan:
    """One volume to build: its slices sorted along the slice normal and their geometry."""

    name: str
    files: list[str]
    series_number: int | None
    series_description: str
    modality: str
    study_uid: str = ""
    series_uid: str = ""
    slices: list[SliceRef] = field(default_factory=list)
    image_orientation: tuple[float, ...] = ()
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    rows: int = 0
    columns: int = 0
    kind: str = "classic"
    """``classic`` (one image per file), ``enhanced`` (multi-frame) or ``mosaic``."""
    image_type: tuple[str, ...] = ()
    echo_number: int | None = None
    complex_component: str = "MAGNITUDE"
    volume_index: int = 0
    volume_count: int = 1
    slice_step: float = 0.0
    """Mean distance between consecutive slices along the normal (mm)."""
    tilted: bool = False
    uneven_spacing: bool = False
    spacing_rule: str = "even"
    """:meth:`hlip.ingest.geometry.StackGeometry.spacing_rule`: even, uneven or regimes."""


@dataclass
class StudyPlan:
    study_uid: str
    accession_number: str
    modality: str
    scans: list[ScanPlan]
    report_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reject:
    file_id: str
    reason: str
    message: str = ""


@dataclass
class Plan:
    studies: list[StudyPlan]
    rejects: list[Reject]

    def outcomes(self) -> dict[str, tuple[str, str]]:
        """``file_id -> (outcome, detail)``: ("scan", scan name), ("report", study UID) or
        ("rejected", reason). Every file of the planned index appears exactly once."""
        out: dict[str, tuple[str, str]] = {}
        for study in self.studies:
            for scan in study.scans:
                for file_id in scan.files:
                    out.setdefault(file_id, ("scan", scan.name))
            for file_id in study.report_files:
                out[file_id] = ("report", study.study_uid)
        for reject in self.rejects:
            out[reject.file_id] = ("rejected", reject.reason)
        return out


# --------------------------------------------------------------------------- entry point


def plan(
    index: pa.Table, config: PlanConfig | None = None, duplicates: Mapping[str, str] | None = None
) -> Plan:
    """Studies, scans and rejects for every file of ``index`` (an INDEX_SCHEMA table).

    ``duplicates`` (file_id -> SOPInstanceUID) names the files that repeat an instance
    stored elsewhere, when ``index`` is one partition of a larger index and the rule was
    applied over the whole of it (:func:`hlip.ingest.partitions.find_duplicates`);
    without it, the rule is applied within ``index``.
    """
    config = config or PlanConfig()
    rows = sorted(index.to_pylist(), key=lambda r: r["file_id"])
    ledger = _Ledger()
    candidates, reports = _classify_files(rows, config, ledger, duplicates)
    slices = _expand_slices(candidates, ledger)
    stacks = _group_stacks(slices, config)
    stacks = _reject_localizer_series(stacks, config, ledger)
    stacks = _reject_enhanced_copies(stacks, ledger)
    scans = [scan for stack in stacks for scan in _plan_stack(stack, config, ledger)]
    scans = _limit_volumes(scans, config, ledger)
    _name_scans(scans)
    studies = _assemble_studies(scans, reports, {r["file_id"]: r for r in rows}, ledger)
    return Plan(studies=studies, rejects=ledger.finalize(scans, studies))


class _Ledger:
    """Collects reject reasons; a file is rejected only if no scan uses it."""

    def __init__(self) -> None:
        self.reasons: dict[str, Reject] = {}

    def reject(self, file_id: str, reason: str, message: str = "") -> None:
        assert reason in REASONS, reason
        self.reasons.setdefault(file_id, Reject(file_id, reason, message))

    def reject_slices(self, slices: Iterable[_Slice], reason: str, message: str) -> None:
        for s in slices:
            self.reject(s.file_id, reason, message)

    def finalize(self, scans: list[ScanPlan], studies: list[StudyPlan]) -> list[Reject]:
        used = {f for scan in scans for f in scan.files}
        used |= {f for study in studies for f in study.report_files}
        return [r for file_id, r in sorted(self.reasons.items()) if file_id not in used]


# --------------------------------------------------------------------------- 1. files


def _classify_files(
    rows: list[dict[str, Any]], config: PlanConfig, ledger: _Ledger, duplicates: Mapping[str, str] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reject files by file-level rules; return image candidates and SR report rows."""
    localizer = _compile(config.localizer_hints)
    dose = _compile(config.dose_hints)
    seen_instances: set[str] = set()
    candidates, reports = [], []
    for row in rows:
        if duplicates is None:
            duplicate = row.get("SOPInstanceUID") in seen_instances
        else:
            duplicate = row["file_id"] in duplicates
        verdict = _file_verdict(row, duplicate, localizer, dose)
        if row.get("SOPInstanceUID") and not row.get("error"):
            seen_instances.add(row["SOPInstanceUID"])
        if verdict == "report":
            reports.append(row)
        elif verdict is None:
            candidates.append(row)
        else:
            reason, message = verdict
            ledger.reject(row["file_id"], reason, message)
    return candidates, reports


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.I) if patterns else None


def _file_verdict(
    row: dict[str, Any], duplicate: bool, localizer: re.Pattern[str] | None, dose: re.Pattern[str] | None
) -> tuple[str, str] | str | None:
    """None for an image candidate, "report" for an SR, else ``(reason, message)``."""
    if row.get("error"):
        code, _, message = row["error"].partition(": ")
        return (code if code in REASONS else "unreadable", message or row["error"])
    if row.get("IsDICOMDIR"):
        return ("dicomdir", "")
    if duplicate:
        return ("duplicate_instance", f"SOPInstanceUID {row['SOPInstanceUID']}")
    sop_verdict = _sop_class_verdict(row)
    if sop_verdict is not None:
        return sop_verdict
    return _image_verdict(row, localizer, dose)


def _sop_class_verdict(row: dict[str, Any]) -> tuple[str, str] | str | None:
    sop = row.get("SOPClassUID") or ""
    if sop in _REPORT_SOP_CLASSES:
        return "report"
    if sop in _DOSE_SR_SOP_CLASSES:
        return ("dose_report", sop)
    if sop in _RAW_DATA_SOP_CLASSES:
        return ("raw_data", sop)
    for prefix, reason in _SOP_CLASS_PREFIX_REASONS:
        if sop.startswith(prefix):
            return (reason, sop)
    if sop in _VOLUME_SOP_CLASSES or (not sop and row.get("Modality") in _VOLUME_MODALITIES):
        return None
    return ("unsupported_sop_class", sop or f"no SOPClassUID, Modality {row.get('Modality')}")


def _image_verdict(
    row: dict[str, Any], localizer: re.Pattern[str] | None, dose: re.Pattern[str] | None
) -> tuple[str, str] | None:
    image_type = [v.upper() for v in row.get("ImageType") or []]
    descriptions = " ".join(filter(None, (row.get("SeriesDescription"), row.get("ProtocolName"))))
    if not row.get("HasPixelData"):
        return ("no_pixel_data", "")
    if (row.get("BurnedInAnnotation") or "").upper() == "YES":
        return ("burned_in_annotation", "")
    photometric = (row.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if (row.get("SamplesPerPixel") or 1) != 1 or not photometric.startswith("MONOCHROME"):
        return ("not_grayscale", photometric)
    if "LOCALIZER" in image_type or (localizer and localizer.search(descriptions)):
        return ("localizer", descriptions or "\\".join(image_type))
    if (dose and dose.search(descriptions)) or _CAPTURE_IMAGE_TYPES & set(image_type):
        return ("dose_screen", descriptions or "\\".join(image_type))
    if row.get("ConversionType"):
        return ("secondary_capture", f"ConversionType {row['ConversionType']}")
    return None


# --------------------------------------------------------------------------- 2. slices


@dataclass
class _Slice:
    """One slice with everything the grouping and ordering rules need."""

    file_id: str
    frame: int
    tile: int
    position: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    row: dict[str, Any]
    kind: str
    echo: float | None
    complex_component: str
    stack_id: str
    order: tuple

    def ref(self) -> SliceRef:
        return SliceRef(self.file_id, self.frame, self.tile, tuple(float(v) for v in self.position))


def _expand_slices(candidates: list[dict[str, Any]], ledger: _Ledger) -> list[_Slice]:
    out: list[_Slice] = []
    for row in candidates:
        try:
            out.extend(_file_slices(row))
        except _GeometryError as exc:
            ledger.reject(row["file_id"], exc.reason, str(exc))
    return out


class _GeometryError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _file_slices(row: dict[str, Any]) -> list[_Slice]:
    if row.get("IsMosaic"):
        return _mosaic_slices(row)
    n_frames = row.get("NumberOfFrames") or 1
    if row.get("IsEnhanced") or n_frames > 1:
        return [_make_slice(row, frame) for frame in range(n_frames)]
    return [_make_slice(row, 0)]


def _frame_value(row: dict[str, Any], column: str, frame: int, fallback: str | None) -> Any:
    values = row.get(column)
    if values is not None and frame < len(values) and values[frame] is not None:
        return values[frame]
    return row.get(fallback) if fallback else None


def _make_slice(row: dict[str, Any], frame: int) -> _Slice:
    position = _frame_value(row, "FramePositions", frame, "ImagePositionPatient")
    orientation = _frame_value(row, "FrameOrientations", frame, "ImageOrientationPatient")
    spacing = _frame_value(row, "FramePixelSpacing", frame, "PixelSpacing")
    _check_geometry(position, orientation, spacing, row)
    enhanced = bool(row.get("IsEnhanced"))
    echo = _frame_value(row, "FrameEchoTime", frame, None) if enhanced else row.get("EchoNumbers")
    temporal = _frame_value(row, "FrameTemporalPosition", frame, "TemporalPositionIdentifier")
    acquisition = _frame_value(row, "FrameAcquisitionNumber", frame, "AcquisitionNumber")
    return _Slice(
        file_id=row["file_id"],
        frame=frame,
        tile=0,
        position=np.asarray(position, dtype=np.float64),
        orientation=tuple(float(v) for v in orientation),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(row["Rows"]),
        columns=int(row["Columns"]),
        row=row,
        kind="enhanced" if enhanced else "classic",
        echo=echo,
        complex_component=_complex_component(row, frame),
        stack_id=str(_frame_value(row, "FrameStackID", frame, None) or ""),
        order=_order_key(temporal, acquisition, row.get("InstanceNumber"), frame, row["file_id"]),
    )


def _order_key(temporal: Any, acquisition: Any, instance: Any, frame: int, file_id: str) -> tuple:
    """Acquisition order of images at one position (time points, diffusion directions)."""
    return (temporal or 0, acquisition or 0, instance or 0, frame, file_id)


def _check_geometry(position: Any, orientation: Any, spacing: Any, row: dict[str, Any]) -> None:
    if (
        position is None
        or orientation is None
        or spacing is None
        or not row.get("Rows")
        or not row.get("Columns")
    ):
        raise _GeometryError("missing_geometry", "ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    if len(position) != 3 or not np.all(np.isfinite(position)):
        raise _GeometryError("invalid_geometry", f"ImagePositionPatient {position}")
    if not geometry.is_valid_orientation(orientation):
        raise _GeometryError("invalid_geometry", f"ImageOrientationPatient {orientation}")
    if not geometry.is_valid_spacing(spacing):
        raise _GeometryError("invalid_geometry", f"PixelSpacing {spacing}")


_COMPLEX_TOKENS = {
    "P": "PHASE",
    "PHASE": "PHASE",
    "PHASE MAP": "PHASE",
    "R": "REAL",
    "REAL": "REAL",
    "I": "IMAGINARY",
    "IMAGINARY": "IMAGINARY",
}


def _complex_component(row: dict[str, Any], frame: int) -> str:
    """MAGNITUDE, PHASE, REAL or IMAGINARY, from the frame type or the ImageType values."""
    per_frame = _frame_value(row, "FrameComplexComponent", frame, None)
    if per_frame:
        return str(per_frame).upper()
    for value in (row.get("ImageType") or [])[2:]:
        component = _COMPLEX_TOKENS.get(value.upper())
        if component:
            return component
    return "MAGNITUDE"


def _mosaic_slices(row: dict[str, Any]) -> list[_Slice]:
    n_images = row.get("NumberOfImagesInMosaic")
    normal = row.get("SliceNormalVector")
    spacing = row.get("SpacingBetweenSlices") or row.get("MosaicSliceSpacing") or row.get("SliceThickness")
    if not n_images or n_images < 1 or normal is None or not spacing:
        raise _GeometryError("missing_geometry", "mosaic without NumberOfImagesInMosaic/SliceNormalVector")
    base = _make_slice(row, 0)
    grid = mosaic_grid(n_images)
    if base.rows % grid or base.columns % grid:
        raise _GeometryError(
            "invalid_geometry", f"{base.rows}x{base.columns} mosaic is not a {grid}x{grid} grid"
        )
    positions = geometry.mosaic_slice_positions(
        base.position,
        base.orientation,
        base.pixel_spacing,
        (base.rows, base.columns),
        grid,
        n_images,
        normal,
        spacing,
    )
    tiles = []
    for tile, position in enumerate(positions):
        tiles.append(_Slice(**{**vars(base), "tile": tile, "position": position, "kind": "mosaic"}))
        tiles[-1].rows, tiles[-1].columns = base.rows // grid, base.columns // grid
    return tiles


# --------------------------------------------------------------------------- 3. stacks


@dataclass
class _Stack:
    """Slices sharing every identity attribute (one series may hold several stacks)."""

    series_key: tuple
    orientation_group: int
    slices: list[_Slice]

    @property
    def first(self) -> _Slice:
        return self.slices[0]

    @property
    def study_uid(self) -> str:
        return self.series_key[0]


def _group_stacks(slices: list[_Slice], config: PlanConfig) -> list[_Stack]:
    by_series: dict[tuple, list[_Slice]] = defaultdict(list)
    for s in slices:
        r = s.row
        by_series[
            (r.get("StudyInstanceUID") or "", r.get("SeriesInstanceUID") or "", r.get("SeriesNumber"))
        ].append(s)
    stacks = []
    for series_key in sorted(by_series, key=_sort_key):
        groups: dict[tuple, list[_Slice]] = defaultdict(list)
        orientations: list[tuple[float, ...]] = []
        for s in by_series[series_key]:
            group = _orientation_group(s.orientation, orientations, config.orientation_tolerance)
            groups[(group, *_identity(s))].append(s)
        stacks.extend(_Stack(series_key, key[0], groups[key]) for key in sorted(groups, key=_sort_key))
    return stacks


def _sort_key(key: tuple) -> str:
    """An order for keys whose values may be None or of mixed types."""
    return repr(key)


def _orientation_group(
    orientation: tuple[float, ...], known: list[tuple[float, ...]], tolerance: float
) -> int:
    for i, reference in enumerate(known):
        if max(abs(a - b) for a, b in zip(orientation, reference, strict=True)) <= tolerance:
            return i
    known.append(orientation)
    return len(known) - 1


def _identity(s: _Slice) -> tuple:
    image_type = s.row.get("ImageType") or []
    return (
        s.rows,
        s.columns,
        round(s.pixel_spacing[0], 4),
        round(s.pixel_spacing[1], 4),
        None if s.echo is None else round(float(s.echo), 3),
        s.complex_component,
        (image_type[0].upper() if image_type else ""),
        s.stack_id,
        s.kind,
    )


def _reject_localizer_series(stacks: list[_Stack], config: PlanConfig, ledger: _Ledger) -> list[_Stack]:
    """A series with mutually orthogonal orientation groups is a 3-plane localizer."""
    normals_by_series: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
    for stack in stacks:
        normals_by_series[stack.series_key][stack.orientation_group] = geometry.slice_normal(
            stack.first.orientation
        )
    localizer_series = {
        key for key, normals in normals_by_series.items() if _has_orthogonal_pair(normals.values())
    }
    kept = []
    for stack in stacks:
        if stack.series_key in localizer_series:
            ledger.reject_slices(stack.slices, "localizer", "series holds orthogonal image planes")
        else:
            kept.append(stack)
    return kept


def _has_orthogonal_pair(normals: Iterable[np.ndarray]) -> bool:
    normals = list(normals)
    return any(abs(float(a @ b)) < 0.1 for i, a in enumerate(normals) for b in normals[i + 1 :])


def _reject_enhanced_copies(stacks: list[_Stack], ledger: _Ledger) -> list[_Stack]:
    """Drop enhanced stacks that duplicate classic images of the same study.

    A copy either references the classic instances it was made from (DerivationImage /
    SourceImage sequences) or has the same series number, shape and slice positions.
    """
    classic_instances: dict[str, set[str]] = defaultdict(set)
    classic_layouts: set[tuple] = set()
    for stack in stacks:
        if stack.first.kind != "enhanced":
            classic_instances[stack.study_uid].update(s.row.get("SOPInstanceUID") or "" for s in stack.slices)
            classic_layouts.add(_layout(stack))
    kept = []
    for stack in stacks:
        if stack.first.kind == "enhanced":
            refs = {ref for s in stack.slices for ref in s.row.get("ReferencedSOPInstanceUIDs") or []}
            if refs & classic_instances[stack.study_uid] or _layout(stack) in classic_layouts:
                ledger.reject_slices(stack.slices, "duplicate_enhanced_copy", "classic images kept instead")
                continue
        kept.append(stack)
    return kept


def _layout(stack: _Stack) -> tuple:
    first = stack.first
    positions = tuple(sorted({tuple(np.round(s.position, 2)) for s in stack.slices}))
    return (stack.study_uid, first.row.get("SeriesNumber"), first.rows, first.columns, first.echo, positions)


# --------------------------------------------------------------------------- 4-5. volumes


def _plan_stack(stack: _Stack, config: PlanConfig, ledger: _Ledger) -> list[ScanPlan]:
    """Split a stack into volumes, check each one and describe the survivors."""
    first = stack.first
    normal = geometry.slice_normal(first.orientation)
    ordered = sorted(stack.slices, key=lambda s: (float(s.position @ normal), s.order))
    locations = _split_locations(ordered, normal, config.position_tolerance_mm)
    counts = Counter(len(loc) for loc in locations)
    if len(locations) == 1 and len(ordered) > 1:
        ledger.reject_slices(ordered, "not_a_volume", f"{len(ordered)} images at one position")
        return []
    if len(counts) > 1:
        ledger.reject_slices(ordered, "inconsistent_slice_count", f"images per position: {dict(counts)}")
        return []
    n_volumes = next(iter(counts))
    volumes = [[sorted(loc, key=lambda s: s.order)[t] for loc in locations] for t in range(n_volumes)]
    return [
        scan
        for t, volume in enumerate(volumes)
        if (scan := _plan_volume(volume, t, n_volumes, config, ledger))
    ]


def _split_locations(ordered: list[_Slice], normal: np.ndarray, tolerance: float) -> list[list[_Slice]]:
    """Group slices (sorted along the normal) that lie at the same position."""
    locations: list[list[_Slice]] = []
    last = None
    for s in ordered:
        offset = float(s.position @ normal)
        if last is None or offset - last > tolerance:
            locations.append([])
        locations[-1].append(s)
        last = offset
    return locations


def _plan_volume(
    volume: list[_Slice], index: int, count: int, config: PlanConfig, ledger: _Ledger
) -> ScanPlan | None:
    first = volume[0]
    positions = np.stack([s.position for s in volume])
    stack_geometry = geometry.stack_geometry(positions, first.orientation, first.pixel_spacing)
    spacing_rule = stack_geometry.spacing_rule(config.gap_factor, config.uneven_tolerance)
    if spacing_rule == "gap":
        steps = stack_geometry.steps
        message = (
            f"isolated step {steps.max():.3f} mm = {steps.max() / np.median(steps):.2f} x the median "
            f"{np.median(steps):.3f} mm (rule: gap, not a spacing regime)"
        )
        ledger.reject_slices(volume, "missing_slices", message)
        return None
    if len(volume) < config.min_slices:
        ledger.reject_slices(volume, "too_few_slices", f"{len(volume)} < min_slices={config.min_slices}")
        return None
    row = first.row
    return ScanPlan(
        name="",
        files=list(dict.fromkeys(s.file_id for s in volume)),
        series_number=row.get("SeriesNumber"),
        series_description=row.get("SeriesDescription") or "",
        modality=row.get("Modality") or "",
        study_uid=row.get("StudyInstanceUID") or "",
        series_uid=row.get("SeriesInstanceUID") or "",
        slices=[s.ref() for s in volume],
        image_orientation=first.orientation,
        pixel_spacing=first.pixel_spacing,
        rows=first.rows,
        columns=first.columns,
        kind=first.kind,
        image_type=tuple(row.get("ImageType") or ()),
        echo_number=row.get("EchoNumbers"),
        complex_component=first.complex_component,
        volume_index=index,
        volume_count=count,
        slice_step=_mean_step(stack_geometry.offsets),
        tilted=stack_geometry.is_tilted(config.tilt_tolerance_px),
        uneven_spacing=spacing_rule in ("uneven", "regimes"),
        spacing_rule=spacing_rule,
    )


def _mean_step(offsets: np.ndarray) -> float:
    return float((offsets[-1] - offsets[0]) / (len(offsets) - 1)) if len(offsets) > 1 else 0.0


def _limit_volumes(scans: list[ScanPlan], config: PlanConfig, ledger: _Ledger) -> list[ScanPlan]:
    if config.max_volumes_per_series is None:
        return scans
    kept = []
    for scan in scans:
        if scan.volume_index < config.max_volumes_per_series:
            kept.append(scan)
        else:
            for file_id in scan.files:
                ledger.reject(file_id, "extra_volume", f"volume {scan.volume_index} of {scan.volume_count}")
    return kept


# --------------------------------------------------------------------------- naming, studies


def _name_scans(scans: list[ScanPlan]) -> None:
    """Name scans by series number plus what distinguishes stacks of one series.

    Suffixes: ``_e<echo>`` (several echoes), ``_ph``/``_real``/``_imag`` (complex
    components), ``_t<k>`` (volumes of a 4-D series), ``_<k>`` (other stacks).
    """
    by_series: dict[tuple, list[ScanPlan]] = defaultdict(list)
    for scan in scans:
        by_series[(scan.study_uid, scan.series_uid, scan.series_number)].append(scan)
    for members in by_series.values():
        echoes = {s.echo_number for s in members}
        for scan in members:
            base = str(scan.series_number) if scan.series_number is not None else "series"
            suffix = f"_e{scan.echo_number}" if len(echoes) > 1 and scan.echo_number is not None else ""
            suffix += _COMPONENT_SUFFIX.get(scan.complex_component, "")
            suffix += (
                f"_t{scan.volume_index:0{len(str(scan.volume_count - 1))}d}" if scan.volume_count > 1 else ""
            )
            scan.name = base + suffix
    _make_unique(scans)


_COMPONENT_SUFFIX = {"PHASE": "_ph", "REAL": "_real", "IMAGINARY": "_imag"}


def _make_unique(scans: list[ScanPlan]) -> None:
    by_study: dict[str, list[ScanPlan]] = defaultdict(list)
    for scan in scans:
        by_study[scan.study_uid].append(scan)
    for members in by_study.values():
        counts = Counter(s.name for s in members)
        seen: Counter[str] = Counter()
        for scan in members:
            if counts[scan.name] > 1:
                seen[scan.name] += 1
                scan.name = f"{scan.name}_{seen[scan.name]}"


def _assemble_studies(
    scans: list[ScanPlan], reports: list[dict[str, Any]], rows: dict[str, dict[str, Any]], ledger: _Ledger
) -> list[StudyPlan]:
    by_study: dict[str, list[ScanPlan]] = defaultdict(list)
    for scan in scans:
        by_study[scan.study_uid].append(scan)
    report_files: dict[str, list[str]] = defaultdict(list)
    for row in reports:
        study_uid = row.get("StudyInstanceUID") or ""
        if study_uid in by_study:
            report_files[study_uid].append(row["file_id"])
        else:
            ledger.reject(row["file_id"], "report_without_images", f"StudyInstanceUID {study_uid}")
    studies = []
    for study_uid in sorted(by_study):
        members = sorted(
            by_study[study_uid], key=lambda s: (s.series_number is None, s.series_number or 0, s.name)
        )
        first_row = rows[members[0].files[0]]
        modality = Counter(s.modality for s in members).most_common(1)[0][0]
        studies.append(
            StudyPlan(
                study_uid=study_uid,
                accession_number=first_row.get("AccessionNumber") or "",
                modality=modality,
                scans=members,
                report_files=sorted(report_files[study_uid]),
            )
        )
    return studies
