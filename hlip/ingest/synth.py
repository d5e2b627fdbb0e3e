"""Synthetic uncurated DICOM archives: phantom CT and MR studies with planted findings,
their radiology reports, and the clutter of a real hospital export.

:func:`make_archive` writes, deterministically for a seed (same bytes):

* chest CT studies (thin and thick axial, coronal and sagittal reformats, localizers, a dose
  screen secondary capture) and brain MR studies (3-plane localizer, T1, T2, FLAIR), each
  image sampled from an analytic phantom in patient coordinates (LPS, mm), so every series,
  whatever its orientation, tilt or grid, shows the same anatomy and findings;
* findings (:data:`FINDINGS`) planted in the phantom, positive in about 45% of the studies
  of their modality, independently, and stated (or negated) in the report;
* ``reports.csv``: StudyInstanceUID, AccessionNumber, report, one 0/1 column per finding
  (empty for the other modality's findings); for some studies the report lives in a DICOM
  SR object instead and the CSV cell is empty;
* fake PHI in the headers (names, IDs, dates, institution) that the reports repeat in
  varied formats, so that de-identification has work to do;
* mixed transfer syntaxes, gantry tilt, oblique MR, non-square and reformatted grids,
  nested folders, files without extension, a zip export, a DICOMDIR file set, a duplicate
  instance, and broken files (truncated, empty, not DICOM).

The returned :class:`SynthArchive` lists every file with its kind and every PHI string, so
tests can check what an ingest run made of each file and grep its outputs for PHI.

Compressed syntaxes: RLE Lossless is encoded by pydicom itself; JPEG Lossless (Process 14
SV1), JPEG-LS Lossless and JPEG 2000 Lossless by GDCM (python-gdcm), as pydicom has no
encoder for the first two (JPEG-LS would need pyjpegls) and pylibjpeg-openjpeg refuses
images under 32 pixels. Without GDCM, JPEG 2000 falls back to pylibjpeg-openjpeg and the
other two are left out of the cycle (see :func:`available_transfer_syntaxes`); the summary
records the syntax each file has.
"""

from __future__ import annotations

import bisect
import csv
import io
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import FileSet
from pydicom.filewriter import write_data_element
from pydicom.pixels import get_encoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from hlip.ingest.reports import sr_text

# --- findings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A finding the phantom can carry: where, what it looks like, and how reports say it.

    The prompts are sentences in the style of the reports, for zero-shot classification.
    """

    label: str
    modality: str
    body_part: str
    description: str
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]


FINDINGS: dict[str, Finding] = {
    f.label: f
    for f in (
        Finding(
            "lung_nodule",
            "CT",
            "CHEST",
            "1-3 solid spheres of soft tissue (40 HU), 12-24 mm, inside a lung (-850 HU).",
            (  # a size and a lobe, as every nodule report gives them
                "A 20 mm solid nodule in the right upper lobe.",
                "There is a 30 mm pulmonary nodule in the left lower lobe.",
                "Multiple pulmonary nodules, the largest measuring 25 mm in the right middle lobe.",
            ),
            ("No pulmonary nodules.", "There is no lung nodule.", "The lungs are clear without nodules."),
        ),
        Finding(
            "pleural_effusion",
            "CT",
            "CHEST",
            "Fluid (15 HU) filling the dependent (posterior) 25-55% of one or both pleural spaces.",
            ("There is a pleural effusion.", "Pleural effusion is present.", "Fluid in the pleural space."),
            ("No pleural effusion.", "There is no pleural effusion.", "The pleural spaces are clear."),
        ),
        Finding(
            "emphysema",
            "CT",
            "CHEST",
            "Lungs of lower attenuation (-930 HU) with 20-40 bullae (-990 HU, 10-24 mm), upper-lobe predominant.",
            (
                "There is emphysema.",
                "Emphysematous changes of the lungs.",
                "Centrilobular emphysema with bullae.",
            ),
            ("No emphysema.", "There is no emphysema.", "No emphysematous change of the lungs."),
        ),
        Finding(
            "mass",
            "MR",
            "HEAD",
            "A 18-34 mm mass in a cerebral hemisphere, bright on T2 and FLAIR, dark on T1, with a halo of edema.",
            (
                "There is an intracranial mass.",
                "A brain mass with surrounding edema.",
                "Mass lesion in the brain.",
            ),
            ("No intracranial mass.", "There is no mass lesion.", "No space-occupying lesion in the brain."),
        ),
        Finding(
            "hemorrhage",
            "MR",
            "HEAD",
            "A 15-30 mm intraparenchymal hematoma, bright on T1 and FLAIR, dark on T2.",
            (  # a size and a lobe, as every hematoma report gives them
                "There is a 40 mm right frontal hematoma.",
                "Intraparenchymal hemorrhage in the left parietal lobe measuring 30 mm, hyperintense on T1.",
                "There is a 50 mm left temporal hematoma.",
            ),
            ("No intracranial hemorrhage.", "There is no hemorrhage.", "No blood products in the brain."),
        ),
        Finding(
            "hydrocephalus",
            "MR",
            "HEAD",
            "Lateral ventricles (CSF) about twice their normal width and length.",
            (
                "There is hydrocephalus.",
                "The ventricles are enlarged.",
                "Ventriculomegaly consistent with hydrocephalus.",
            ),
            ("No hydrocephalus.", "The ventricles are normal in size.", "There is no ventriculomegaly."),
        ),
    )
}
PREVALENCE = 0.45
"""Probability that a finding is planted in a study of its modality, independently per finding."""

# --- what was written ------------------------------------------------------------------------

KINDS = {
    "ct_axial_thin": "thin axial CT (ORIGINAL\\PRIMARY\\AXIAL)",
    "ct_axial_thick": "thick axial CT",
    "ct_axial_tilted": "thick axial CT with gantry tilt (sheared stack)",
    "ct_reformat": "coronal or sagittal reformat (DERIVED\\SECONDARY\\REFORMATTED)",
    "mr_t1": "T1-weighted MR (sagittal)",
    "mr_t2": "T2-weighted MR (axial, oblique in some studies)",
    "mr_flair": "FLAIR MR (axial, oblique in some studies)",
    "localizer": "localizer: CT topograms, MR 3-plane (one series)",
    "dose_report": "dose screen secondary capture with burned-in text",
    "sr_report": "Basic Text or Enhanced SR carrying the study's report",
    "duplicate": "byte-identical copy of another instance",
    "truncated": "DICOM file cut short inside the pixel data",
    "empty": "zero-byte file",
    "not_dicom": "text or binary junk",
    "dicomdir": "DICOMDIR of a file-set export",
}
"""Every kind of file :func:`make_archive` writes."""

SCAN_KINDS = frozenset(
    {"ct_axial_thin", "ct_axial_thick", "ct_axial_tilted", "ct_reformat", "mr_t1", "mr_t2", "mr_flair"}
)


@dataclass
class SynthFile:
    """One file of the archive; ``member`` names it inside the zip at ``path`` ("" if none)."""

    path: str
    kind: str
    member: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax: str = ""


@dataclass
class SynthSeries:
    series_uid: str
    series_number: int
    series_description: str
    kind: str
    n_files: int
    transfer_syntax: str


@dataclass
class SynthStudy:
    """A study's truth: its labels and what was planted for each positive one (size, side,
    lobe), the report as an ingest run finds it, its PHI (header keyword -> value)."""

    study_uid: str
    accession_number: str
    modality: str
    body_part: str
    labels: dict[str, int]
    report: str
    report_in_sr: bool
    phi: dict[str, str]
    findings: dict[str, dict] = field(default_factory=dict)
    series: list[SynthSeries] = field(default_factory=list)


@dataclass
class SynthArchive:
    root: Path
    reports_csv: Path
    studies: list[SynthStudy]
    files: list[SynthFile]
    phi_values: list[str]

    def files_of(self, kind: str) -> list[SynthFile]:
        return [f for f in self.files if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "reports_csv": str(self.reports_csv),
            "studies": [asdict(s) for s in self.studies],
            "files": [asdict(f) for f in self.files],
            "phi_values": list(self.phi_values),
        }


# --- phantoms ------------------------------------------------------------------------------

(
    AIR,
    FAT,
    SOFT,
    BONE,
    LUNG,
    EMPHYSEMA,
    BULLA,
    FLUID,
    NODULE,
    VESSEL,
    CSF,
    GRAY,
    WHITE,
    MASS,
    EDEMA,
    BLOOD,
    ENHANCED,
) = range(17)

HU = np.array([-1000, -100, 40, 750, -850, -930, -990, 15, 40, 45, 5, 35, 28, 35, 20, 60, 300], np.float32)
"""CT number (HU) of each tissue code."""

MR_SIGNAL = {
    "T1": np.array([0, 900, 420, 60, 0, 0, 0, 0, 0, 300, 200, 500, 750, 380, 450, 1250, 0], np.float32),
    "T2": np.array([0, 500, 450, 50, 0, 0, 0, 0, 0, 100, 1500, 800, 520, 1350, 1200, 220, 0], np.float32),
    "FLAIR": np.array([0, 400, 350, 40, 0, 0, 0, 0, 0, 80, 90, 700, 520, 1150, 1050, 950, 0], np.float32),
}
"""MR signal (arbitrary units before the study's receiver gain) of each tissue code."""


@dataclass(frozen=True)
class _Ellipsoid:
    """Tissue inside an axis-aligned ellipsoid (infinite along an axis with semi-axis inf),
    optionally only posterior of a coronal plane (y >= ``posterior_of``)."""

    center: tuple[float, float, float]
    semi: tuple[float, float, float]
    tissue: int
    posterior_of: float | None = None

    def inside(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        """Mask over the broadcast shape of the coordinate arrays ``xyz`` (x, y, z in mm).

        Each axis' term is computed at its own (broadcast) shape, so grids aligned with the
        axes cost little more than one pass over their pixels."""
        q = sum(((c - m) / s) ** 2 for c, m, s in zip(xyz, self.center, self.semi, strict=True) if s != INF)
        mask = q <= 1.0
        if self.posterior_of is not None:
            mask = mask & (xyz[1] >= self.posterior_of)
        return mask


@dataclass
class _Phantom:
    """Tissue shapes painted in order (later wins) over air."""

    shapes: list[_Ellipsoid] = field(default_factory=list)

    def add(self, center, semi, tissue: int, posterior_of: float | None = None) -> None:
        self.shapes.append(_Ellipsoid(tuple(center), tuple(semi), tissue, posterior_of))

    def labels(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        """Tissue codes at the points of the broadcastable coordinate arrays ``xyz``."""
        out = np.zeros(np.broadcast_shapes(*(np.shape(c) for c in xyz)), np.uint8)
        low = np.array([np.min(c) for c in xyz])
        high = np.array([np.max(c) for c in xyz])
        for shape in self.shapes:
            center, semi = np.asarray(shape.center), np.asarray(shape.semi)
            if np.all(center + semi >= low) and np.all(center - semi <= high):  # skip shapes out of reach
                out[np.broadcast_to(shape.inside(xyz), out.shape)] = shape.tissue
        return out


INF = float("inf")


def _chest_phantom(
    rng: np.random.Generator, z0: float, labels: dict[str, int], contrast: bool, half_z: float, scale: float
):
    """A supine chest (LPS: +x patient left, +y posterior) centred on z = ``z0``, with findings
    planted within ``half_z`` mm of it (the scanned range); returns the phantom and the details
    of its findings, for the report. A finding that finds no room is set to 0 in ``labels``."""
    ph, details = _Phantom(), {}
    ax, ay = rng.uniform(150, 170), rng.uniform(100, 118)
    ph.add((0, 0, 0), (ax, ay, INF), FAT)
    ph.add((0, 0, 0), (ax - 12, ay - 12, INF), SOFT)
    lung_tissue = EMPHYSEMA if labels.get("emphysema") else LUNG
    lungs = {
        side: ((sign * 68.0, 5.0, z0 + 15), (52.0, 70.0, 105.0))
        for side, sign in (("right", -1), ("left", 1))
    }
    for center, semi in lungs.values():
        ph.add(center, semi, lung_tissue)
    window = (z0 - half_z, z0 + half_z)
    if labels.get("emphysema"):
        details["emphysema"] = _plant_bullae(rng, ph, lungs, window, scale)
    if labels.get("pleural_effusion"):
        details["pleural_effusion"] = _plant_effusion(rng, ph, lungs)
    ph.add((22, -28, z0 - 40), (55, 45, 48), SOFT)  # heart
    ph.add((8, 45, 0), (11, 11, INF), ENHANCED if contrast else VESSEL)  # descending aorta
    ph.add((0, ay - 38, 0), (17, 15, INF), BONE)  # vertebral bodies
    ph.add((0, -(ay - 20), 0), (11, 5, INF), BONE)  # sternum
    if labels.get("lung_nodule"):
        details["lung_nodule"] = _plant_nodules(rng, ph, lungs, window, scale)
    labels.update({label: int(bool(details.get(label))) for label in labels})
    return ph, details


def _lobe(side: str, center, semi, z: float) -> str:
    rel = (z - center[2]) / semi[2]
    if side == "left":
        return "left upper lobe" if rel > -0.1 else "left lower lobe"
    return "right upper lobe" if rel > 0.25 else ("right middle lobe" if rel > -0.3 else "right lower lobe")


def _point_in(rng, center, semi, margin: float, z_window=(-INF, INF)) -> np.ndarray:
    """A uniform point in the ellipsoid shrunk by ``margin`` mm, at least ``margin`` mm inside
    ``z_window``."""
    while True:
        u = rng.uniform(-1, 1, 3)
        point = np.asarray(center) + u * (np.asarray(semi) - margin)
        if u @ u <= 1 and z_window[0] + margin <= point[2] <= z_window[1] - margin:
            return point


def _plant_bullae(rng, ph: _Phantom, lungs, z_window, scale: float) -> dict:
    count = int(rng.integers(20, 41))
    for _ in range(count):
        center, semi = lungs["right" if rng.random() < 0.5 else "left"]
        point = _point_in(rng, center, semi, 12, z_window)
        while point[2] < center[2] - 0.3 * semi[2] and rng.random() < 0.6:  # upper-lobe predominant
            point = _point_in(rng, center, semi, 12, z_window)
        ph.add(point, (rng.uniform(5, 12) * scale,) * 3, BULLA)
    return {"severity": "moderate" if count < 30 else "severe"}


def _plant_effusion(rng, ph: _Phantom, lungs) -> dict:
    side = str(rng.choice(["left", "right", "bilateral"]))
    size, fraction = [("small", 0.25), ("moderate", 0.4), ("large", 0.55)][int(rng.integers(3))]
    for name, (center, semi) in lungs.items():
        if side in (name, "bilateral"):
            ph.add(center, semi, FLUID, posterior_of=center[1] + semi[1] * (1 - 2 * fraction))
    return {"side": side, "size": size}


def _plant_nodules(rng, ph: _Phantom, lungs, z_window, scale: float) -> dict:
    """1-3 nodules, each placed where the phantom is lung all around it."""
    nodules = []
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        diameter = int(round(rng.integers(12, 25) * scale))
        for _attempt in range(200):
            side = "right" if rng.random() < 0.5 else "left"
            center, semi = lungs[side]
            point = _point_in(rng, center, semi, diameter / 2 + 4, z_window)
            probe = point + np.vstack([np.zeros(3), np.eye(3) * diameter / 2, -np.eye(3) * diameter / 2])
            if np.all(np.isin(ph.labels(probe.T), (LUNG, EMPHYSEMA, BULLA))):
                ph.add(point, (diameter / 2,) * 3, NODULE)
                nodules.append((diameter, _lobe(side, center, semi, point[2])))
                break
    nodules.sort(reverse=True)
    return {"nodules": nodules} if nodules else {}


def _brain_phantom(rng: np.random.Generator, z0: float, labels: dict[str, int], scale: float):
    """A head centred on (0, 0, z0): scalp fat, skull, CSF, grey and white matter, lateral
    ventricles; returns the phantom and the details of its findings."""
    ph, details = _Phantom(), {}
    s = rng.uniform(0.94, 1.06)
    for semi, tissue in (
        ((72, 92, 80), FAT),
        ((67, 87, 75), BONE),
        ((63, 83, 71), CSF),
        ((61, 81, 69), GRAY),
    ):
        ph.add((0, 0, z0), tuple(a * s for a in semi), tissue)
    ph.add((0, 0, z0 + 3), (50 * s, 68 * s, 55 * s), WHITE)
    big = bool(labels.get("hydrocephalus"))
    for sign in (-1, 1):
        ph.add((sign * (16 if big else 10), -5, z0 + 10), (15, 34, 19) if big else (7, 27, 11), CSF)
    if big:
        details["hydrocephalus"] = {"degree": str(rng.choice(["mild", "moderate"]))}
    for label, plant in (("mass", _plant_mass), ("hemorrhage", _plant_hematoma)):
        if labels.get(label):
            details[label] = plant(rng, ph, z0, s, scale)
    return ph, details


def _brain_site(rng, z0: float, s: float, radius: float) -> tuple[np.ndarray, str, str]:
    """A point in a hemisphere's white matter, clear of the ventricles; with side and lobe.

    A large lesion keeps to the outer quarter of the hemisphere when clearing the ventricles by
    its own half-size would leave no room (else the search would never end)."""
    semi_x = 50 * s - radius * 0.6
    clearance = min(radius * 0.5 + 22, 0.75 * semi_x)
    while True:
        point = _point_in(rng, (0, 0, z0 + 3), (50 * s, 68 * s, 55 * s), radius * 0.6)
        if abs(point[0]) > clearance:
            break
    side = "left" if point[0] > 0 else "right"  # LPS: +x is the patient's left
    if point[1] < -25:
        lobe = "frontal"
    elif point[1] > 40:
        lobe = "occipital"
    elif point[2] < z0 - 5:
        lobe = "temporal"
    else:
        lobe = "parietal"
    return point, side, lobe


def _plant_mass(rng, ph: _Phantom, z0: float, s: float, scale: float) -> dict:
    diameter = int(round(rng.integers(18, 35) * scale))
    point, side, lobe = _brain_site(rng, z0, s, diameter / 2)
    ph.add(point, (diameter * 0.8,) * 3, EDEMA)
    ph.add(point, (diameter / 2,) * 3, MASS)
    return {"diameter": diameter, "side": side, "lobe": lobe}


def _plant_hematoma(rng, ph: _Phantom, z0: float, s: float, scale: float) -> dict:
    diameter = int(round(rng.integers(15, 31) * scale))
    point, side, lobe = _brain_site(rng, z0, s, diameter / 2)
    ph.add(point, (diameter / 2, diameter * 0.4, diameter * 0.35), BLOOD)
    return {"diameter": diameter, "side": side, "lobe": lobe}


# --- geometry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A stack of equal images in patient space: pixel (r, c) of slice k lies at
    ``positions[k] + c * spacing[1] * row_dir + r * spacing[0] * col_dir`` (DICOM's
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing)."""

    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    rows: int
    cols: int
    spacing: tuple[float, float]
    thickness: float

    def coordinates(self, first: int, stop: int) -> list[np.ndarray]:
        """x, y, z (mm) of the pixel centres of slices ``first:stop``, each as an array that
        broadcasts to (stop - first, rows, cols) and varies only along the indices it depends on."""
        k = self.positions[first:stop, :, None, None]
        r = np.arange(self.rows)[None, :, None] * self.spacing[0]
        c = np.arange(self.cols)[None, None, :] * self.spacing[1]
        axes = []
        for a in range(3):
            coordinate = k[:, a] if np.ptp(k[:, a]) else k[:1, a]
            for step, index in ((self.col_dir[a], r), (self.row_dir[a], c)):
                if step:
                    coordinate = coordinate + step * index
            axes.append(coordinate.astype(np.float32))
        return axes

    @property
    def orientation(self) -> list[float]:
        return [round(float(v), 6) for v in (*self.row_dir, *self.col_dir)]


def _stack(
    center, row_dir, col_dir, shape, pixel: float, n: int, step: float, thickness: float, step_dir=None
) -> _Grid:
    """``n`` images of ``shape`` (rows, cols) centred on ``center``, ``step`` mm apart along
    ``step_dir`` (default: the slice normal; a tilted CT steps along the table instead)."""
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    step_dir = np.cross(row_dir, col_dir) if step_dir is None else np.asarray(step_dir, float)
    rows, cols = shape
    corner = np.asarray(center, float) - (cols - 1) / 2 * pixel * row_dir - (rows - 1) / 2 * pixel * col_dir
    positions = np.array([corner + (k - (n - 1) / 2) * step * step_dir for k in range(n)])
    return _Grid(np.round(positions, 4), row_dir, col_dir, rows, cols, (pixel, pixel), thickness)


AXIAL, CORONAL, SAGITTAL = ((1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, 0, -1)), ((0, 1, 0), (0, 0, -1))


def _tilted(degrees: float):
    t = np.deg2rad(degrees)
    return (1, 0, 0), (0, np.cos(t), -np.sin(t))


# --- study plans -----------------------------------------------------------------------------

FAMILY_NAMES = (
    "Anderson", "Baker", "Castillo", "Delgado", "Eriksen", "Fischer", "Garcia", "Haddad", "Ivanova",
    "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Rossi",
    "Schneider", "Tanaka", "Umarov", "Varga", "Whitfield", "Xu", "Yilmaz", "Zimmermann", "O'Connell",
    "Van der Berg", "Smith-Jones", "Brennan",
)  # fmt: skip
GIVEN_NAMES = (
    "Adele", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jonas",
    "Katarina", "Luca", "Maren", "Nadia", "Oskar", "Priya", "Rafael", "Sofia", "Tomasz", "Ursula",
    "Viktor", "Wanda", "Yusuf", "Zora", "Anneliese", "Mateo", "Leona", "Emil",
)  # fmt: skip
INSTITUTIONS = (
    "Riverbend General Hospital", "St. Aldric Medical Center", "Northgate University Clinic",
    "Lakeshore Regional Hospital", "Harrow Valley Imaging Institute",
)  # fmt: skip
CT_SCANNERS = (("SIEMENS", "SOMATOM Definition AS+", "Br40d"), ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD"),
               ("Philips", "iCT 256", "B"), ("TOSHIBA", "Aquilion ONE", "FC08"))  # fmt: skip
MR_SCANNERS = (
    ("SIEMENS", "Skyra", 3.0),
    ("GE MEDICAL SYSTEMS", "SIGNA Premier", 3.0),
    ("Philips", "Ingenia", 1.5),
)
TRANSFER_SYNTAX_CYCLE = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLosslessSV1,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
)
"""Image series take transfer syntaxes in this order, one after the other across the archive."""


@dataclass
class _Person:
    family: str
    given: str

    @property
    def pn(self) -> str:
        return f"{self.family.upper()}^{self.given.upper()}"

    @property
    def plain(self) -> str:
        return f"{self.given} {self.family}"


@dataclass
class _Study:
    """Everything decided about one study before any pixel is made."""

    index: int
    modality: str
    rng: np.random.Generator
    uid: str
    frame_uid: str
    accession: str
    patient: _Person
    patient_id: str
    sex: str
    birth_date: str
    study_date: str
    study_time: str
    referring: _Person
    reader: _Person
    institution: str
    scanner: tuple
    labels: dict[str, int]
    details: dict[str, dict]
    phantom: _Phantom
    z0: float
    variant: int
    contrast: bool = False
    report_in_sr: bool = False

    def uid_for(self, *parts: Any) -> str:
        return _uid(self.uid, *parts)


def _plan_study(index: int, seed: int, modality: str, sizes: Sizes) -> _Study:
    rng = np.random.default_rng([seed, index])
    uid = _uid("hlip-synth", seed, index)
    labels = {name: int(rng.random() < PREVALENCE) for name, f in FINDINGS.items() if f.modality == modality}
    age_days = int(rng.integers(25 * 365, 89 * 365))
    study_day = np.datetime64("2019-01-01") + int(rng.integers(0, 6 * 365))
    z0 = float(rng.uniform(-160, -100)) if modality == "CT" else float(rng.uniform(40, 80))
    contrast = modality == "CT" and rng.random() < 0.35
    if modality == "CT":
        phantom, details = _chest_phantom(
            rng, z0, labels, contrast, sizes.ct_coverage_mm / 2, sizes.lesion_scale
        )
    else:
        phantom, details = _brain_phantom(rng, z0, labels, sizes.lesion_scale)
    scanners = CT_SCANNERS if modality == "CT" else MR_SCANNERS
    return _Study(
        index=index,
        modality=modality,
        rng=rng,
        uid=uid,
        frame_uid=_uid(uid, "frame"),
        accession=f"{'RB' if index % 2 else 'AC'}{int(rng.integers(10**7, 10**8))}",
        patient=_person(rng),
        patient_id=f"{int(rng.integers(10**5, 10**8)):08d}",
        sex=str(rng.choice(["F", "M"])),
        birth_date=_da(study_day - age_days),
        study_date=_da(study_day),
        study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        referring=_person(rng),
        reader=_person(rng),
        institution=str(rng.choice(INSTITUTIONS)),
        scanner=scanners[int(rng.integers(len(scanners)))],
        labels=labels,
        details=details,
        phantom=phantom,
        z0=z0,
        variant=index // 2,
        contrast=contrast,
        report_in_sr=index % 3 == 2,
    )


def _uid(*parts: Any) -> str:
    """A UID under the 2.25 root from a name-based (version 5) UUID: the same parts, the same UID."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(map(str, parts))).int}"


def _person(rng) -> _Person:
    return _Person(str(rng.choice(FAMILY_NAMES)), str(rng.choice(GIVEN_NAMES)))


def _da(day: np.datetime64) -> str:
    return str(day).replace("-", "")


# --- DICOM series ---------------------------------------------------------------------------


@dataclass
class _Series:
    """One series to write: ``template`` holds the elements every instance shares, each of
    ``instances`` the elements of one instance (SOP Instance UID, number, position), and
    ``pixels[i]`` is instance i's stored frame (None for objects without pixels)."""

    number: int
    description: str
    kind: str
    uid: str
    template: Dataset
    instances: list[Dataset] = field(default_factory=list)
    pixels: np.ndarray | None = None
    transfer_syntax: UID = ExplicitVRLittleEndian

    def add_instance(self, study: _Study, number: int, grid: _Grid | None = None, k: int = 0) -> None:
        ds = Dataset()
        ds.SOPInstanceUID = study.uid_for(self.number, number)
        ds.InstanceNumber = number
        if grid is not None:
            ds.ImagePositionPatient = [round(float(v), 4) for v in grid.positions[k]]
            ds.ImageOrientationPatient = grid.orientation
            ds.PixelSpacing = [round(grid.spacing[0], 6), round(grid.spacing[1], 6)]
            ds.SliceLocation = round(float(grid.positions[k] @ np.cross(grid.row_dir, grid.col_dir)), 4)
        self.instances.append(ds)


def _new_series(study: _Study, number: int, description: str, kind: str, sop_class: str) -> _Series:
    """A series with the patient, study, series and equipment modules (fake PHI included)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = "SR" if kind == "sr_report" else study.modality
    ds.Manufacturer, ds.ManufacturerModelName = study.scanner[0], study.scanner[1]
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring.pn
    ds.NameOfPhysiciansReadingStudy = study.reader.pn
    ds.StudyDescription = _exam_name(study)
    ds.SeriesDescription = description
    ds.PatientName = study.patient.pn
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{int(study.study_date[:4]) - int(study.birth_date[:4]):03d}Y"
    ds.BodyPartExamined = "CHEST" if study.modality == "CT" else "HEAD"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = study.uid_for("series", number)
    ds.StudyID = str(1000 + study.index)
    ds.SeriesNumber = number
    return _Series(number, description, kind, ds.SeriesInstanceUID, ds)


def _exam_name(study: _Study) -> str:
    if study.modality == "MR":
        return "MRI BRAIN WITHOUT CONTRAST"
    return "CT CHEST WITH CONTRAST" if study.contrast else "CT CHEST WITHOUT CONTRAST"


def _image_modules(
    series: _Series, study: _Study, image_type: list[str], pixels: np.ndarray, bits_stored: int
) -> None:
    """General, plane and pixel modules shared by the series' images; ``pixels`` is (n, rows, cols)."""
    ds = series.template
    ds.ImageType = image_type
    if series.kind != "dose_report":
        ds.FrameOfReferenceUID = study.frame_uid
        ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    series.pixels = pixels


def _sample(phantom: _Phantom, grid: _Grid, table: np.ndarray, max_points: int = 1 << 21) -> np.ndarray:
    """``table[tissue]`` at every pixel centre of ``grid``: (n, rows, cols), in slabs of slices."""
    n = len(grid.positions)
    out = np.empty((n, grid.rows, grid.cols), np.float32)
    step = max(1, max_points // (grid.rows * grid.cols))
    for k in range(0, n, step):
        out[k : k + step] = table[phantom.labels(grid.coordinates(k, min(n, k + step)))]
    return out


@dataclass(frozen=True)
class _CTStorage:
    """How a scanner stores HU: ``stored = HU - intercept`` (slope 1) in ``dtype``."""

    dtype: type
    bits_stored: int
    intercept: float

    def encode(self, hu: np.ndarray) -> np.ndarray:
        low, high = (0, 2**self.bits_stored - 1) if self.dtype is np.uint16 else (-(2**15), 2**15 - 1)
        return np.clip(np.rint(hu - self.intercept), low, high).astype(self.dtype)


CT_STORAGES = (
    _CTStorage(np.uint16, 12, -1024.0),
    _CTStorage(np.int16, 16, 0.0),
    _CTStorage(np.int16, 16, -1024.0),
)

MR_SEQUENCES = {
    "T1": dict(ScanningSequence="SE", SequenceVariant="SP", RepetitionTime=500.0, EchoTime=10.0),
    "T2": dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=4000.0, EchoTime=100.0),
    "FLAIR": dict(ScanningSequence=["SE", "IR"], SequenceVariant="SK", RepetitionTime=9000.0, EchoTime=120.0, InversionTime=2500.0),
}  # fmt: skip


# --- series of a CT study -------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Image sizes: CT in-plane matrix, slice thicknesses and coverage, MR matrix; and a
    factor on the diameters of nodules, bullae, masses and hematomas (reports follow it).

    The defaults keep an archive small (a 12-study archive is a few tens of MB); a
    benchmark archive of 512x512 CT slices uses ``Sizes(ct_matrix=512)``."""

    ct_matrix: int = 128
    ct_thin_mm: float = 2.5
    ct_thick_mm: float = 5.0
    ct_coverage_mm: float = 160.0
    mr_matrix: int = 128
    lesion_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.ct_coverage_mm < 80 * max(self.lesion_scale, 1.0):
            raise ValueError(
                "ct_coverage_mm must be at least 80 mm (times lesion_scale), room for the largest nodule"
            )
        if not 0.25 <= self.lesion_scale <= 2.0:
            raise ValueError("lesion_scale must be between 0.25 and 2")


def _ct_series(study: _Study, sizes: Sizes) -> list[_Series]:
    fov = float(study.rng.uniform(350, 400))
    pixel = fov / sizes.ct_matrix
    center = (0.0, 0.0, study.z0)
    square = (sizes.ct_matrix, sizes.ct_matrix)
    reformat_shape = (int(round(sizes.ct_coverage_mm / pixel)), sizes.ct_matrix)
    tilt = 15.0 if study.variant % 3 == 1 else 0.0
    thick_n = int(round(sizes.ct_coverage_mm / sizes.ct_thick_mm))
    thin_n = int(round(sizes.ct_coverage_mm / sizes.ct_thin_mm))
    thick = _stack(
        center,
        *(_tilted(tilt) if tilt else AXIAL),
        square,
        pixel,
        thick_n,
        sizes.ct_thick_mm,
        sizes.ct_thick_mm,
        (0, 0, 1),
    )
    thin = _stack(center, *AXIAL, square, pixel, thin_n, sizes.ct_thin_mm, sizes.ct_thin_mm)
    axial, reformat = ["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "REFORMATTED"]
    series = [
        _ct_localizer(study, sizes),
        _ct_stack(
            study,
            2,
            f"Axial {sizes.ct_thick_mm:g}mm",
            "ct_axial_tilted" if tilt else "ct_axial_thick",
            thick,
            axial,
            tilt,
        ),
        _ct_stack(study, 3, f"Axial {sizes.ct_thin_mm:g}mm", "ct_axial_thin", thin, axial),
        _ct_stack(
            study,
            601,
            "Coronal MPR 5mm",
            "ct_reformat",
            _stack(center, *CORONAL, reformat_shape, pixel, 48, 5.0, 5.0),
            reformat,
        ),
    ]
    if study.variant % 2 == 0:
        sagittal = _stack(center, *SAGITTAL, reformat_shape, pixel, int(fov * 0.8 / 5), 5.0, 5.0)
        series.append(_ct_stack(study, 602, "Sagittal MPR 5mm", "ct_reformat", sagittal, reformat))
    series.append(_dose_report(study))
    return series


def _ct_template(study: _Study, series: _Series, storage: _CTStorage) -> None:
    ds = series.template
    ds.KVP = 120
    ds.ConvolutionKernel = study.scanner[2]
    if study.contrast:
        ds.ContrastBolusAgent = "Iohexol 350"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = storage.intercept, 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400


def _ct_stack(study, number, description, kind, grid: _Grid, image_type, tilt: float = 0.0) -> _Series:
    """A CT series in HU plus 10 HU noise; in odd studies InstanceNumber runs against the slice order."""
    series = _new_series(study, number, description, kind, CTImageStorage)
    storage = CT_STORAGES[study.index % len(CT_STORAGES)]
    noise = np.random.default_rng([study.index, number, 7])
    hu = _sample(study.phantom, grid, HU)
    hu += noise.normal(0, 10, hu.shape).astype(np.float32)
    _image_modules(series, study, image_type, storage.encode(hu), storage.bits_stored)
    _ct_template(study, series, storage)
    series.template.SliceThickness = grid.thickness
    series.template.GantryDetectorTilt = tilt
    n = len(grid.positions)
    for k in range(n):
        series.add_instance(study, n - k if study.variant % 2 else k + 1, grid, k)
    return series


def _ct_localizer(study: _Study, sizes: Sizes) -> _Series:
    """Topograms (projections): AP, and a lateral one in every other study."""
    series = _new_series(study, 1, "Topogram 0.6", "localizer", CTImageStorage)
    cols = min(sizes.ct_matrix, 256)
    pixel = 500.0 / cols
    shape = (int(round((sizes.ct_coverage_mm + 120) / pixel)), cols)
    views = [(CORONAL, 1)] + ([(SAGITTAL, 0)] if study.variant % 2 else [])
    grids, images = [], []
    for orientation, depth_axis in views:
        grid = _stack((0.0, 0.0, study.z0), *orientation, shape, pixel, 1, 0.0, 1.0)
        depth = np.linspace(-200, 200, 40, dtype=np.float32)
        xyz = [c[0, ..., None] for c in grid.coordinates(0, 1)]
        xyz[depth_axis] = xyz[depth_axis] + depth
        mu = np.clip(HU[study.phantom.labels(xyz)] + 1000.0, 0, None) / 1000.0
        images.append(np.clip(mu.sum(axis=2) * 100, 0, 4095).astype(np.uint16))
        grids.append(grid)
    _image_modules(series, study, ["ORIGINAL", "PRIMARY", "LOCALIZER"], np.stack(images), 12)
    series.template.KVP = 120
    series.template.SliceThickness = 1.0
    for instance, grid in enumerate(grids, start=1):
        series.add_instance(study, instance, grid)
    return series


def _dose_report(study: _Study) -> _Series:
    """A dose screen: a Secondary Capture with rows of glyph-like blocks (burned-in text)."""
    series = _new_series(study, 999, "Dose Report", "dose_report", SecondaryCaptureImageStorage)
    rng = np.random.default_rng([study.index, 999])
    image = np.zeros((1, 192, 256), np.uint8)
    for line in range(12):
        for char in range(int(rng.integers(10, 30))):
            glyph = (rng.random((7, 5)) < 0.45) * np.uint8(230)
            image[0, 8 + line * 14 : 15 + line * 14, 8 + char * 8 : 13 + char * 8] = glyph
    _image_modules(series, study, ["DERIVED", "SECONDARY"], image, 8)
    series.template.ConversionType = "WSD"
    series.template.BurnedInAnnotation = "YES"
    series.add_instance(study, 1)
    return series


# --- series of an MR study ------------------------------------------------------------------


def _mr_series(study: _Study, sizes: Sizes) -> list[_Series]:
    m = sizes.mr_matrix
    pixel = float(study.rng.uniform(230, 250)) / m
    gain = float(study.rng.uniform(0.6, 1.6))
    center = (0.0, 0.0, study.z0 + 5)
    angle = float(study.rng.uniform(8, 15)) if study.variant % 2 else 0.0
    axial = _tilted(-angle) if angle else AXIAL
    axial_shape = (m, int(round(m * 0.875)))
    return [
        _mr_localizer(study, sizes),
        _mr_stack(
            study,
            2,
            "T1 SE sag",
            "mr_t1",
            _stack(center, *SAGITTAL, (m, m), pixel, 36, 4.0, 4.0),
            "T1",
            np.uint16,
            gain,
        ),
        _mr_stack(
            study,
            3,
            "T2 TSE ax",
            "mr_t2",
            _stack(center, *axial, axial_shape, pixel, 26, 6.0, 5.0),
            "T2",
            np.int16,
            gain,
        ),
        _mr_stack(
            study,
            4,
            "FLAIR ax",
            "mr_flair",
            _stack(center, *axial, axial_shape, pixel, 26, 6.0, 5.0),
            "FLAIR",
            np.uint16,
            gain,
        ),
    ]


def _mr_signal(study: _Study, grids: Sequence[_Grid], weighting: str, gain: float, noise) -> np.ndarray:
    """Magnitude images: tissue signal times the receiver gain, plus Rician-like noise, 12 bits."""
    signal = np.concatenate([_sample(study.phantom, g, MR_SIGNAL[weighting]) for g in grids]) * gain
    signal = np.abs(signal + noise.normal(0, 18 * gain, signal.shape).astype(np.float32))
    return np.clip(np.rint(signal), 0, 4095)


def _mr_template(study: _Study, series: _Series, weighting: str, gain: float, thickness: float) -> None:
    ds = series.template
    for keyword, value in MR_SEQUENCES[weighting].items():
        setattr(ds, keyword, value)
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = study.scanner[2]
    ds.SliceThickness = thickness
    ds.WindowCenter, ds.WindowWidth = int(900 * gain), int(1800 * gain)


def _mr_stack(study, number, description, kind, grid: _Grid, weighting: str, dtype, gain: float) -> _Series:
    series = _new_series(study, number, description, kind, MRImageStorage)
    noise = np.random.default_rng([study.index, number, 7])
    pixels = _mr_signal(study, [grid], weighting, gain, noise).astype(dtype)
    _image_modules(
        series, study, ["ORIGINAL", "PRIMARY", "M", "ND"], pixels, 16 if pixels.dtype.kind == "i" else 12
    )
    _mr_template(study, series, weighting, gain, grid.thickness)
    steps = np.linalg.norm(np.diff(grid.positions, axis=0), axis=1)
    series.template.SpacingBetweenSlices = round(float(steps[0]), 4) if len(steps) else grid.thickness
    for k in range(len(grid.positions)):
        series.add_instance(study, k + 1, grid, k)
    return series


def _mr_localizer(study: _Study, sizes: Sizes) -> _Series:
    """One image per plane in one series; flagged LOCALIZER in ImageType in even studies only,
    as not every scanner does."""
    flagged = study.variant % 2 == 0
    series = _new_series(study, 1, "localizer" if flagged else "3-plane loc", "localizer", MRImageStorage)
    pixel = 260.0 / sizes.mr_matrix
    grids = [
        _stack((0.0, 0.0, study.z0), *o, (sizes.mr_matrix,) * 2, pixel, 1, 0.0, 8.0)
        for o in (SAGITTAL, CORONAL, AXIAL)
    ]
    pixels = _mr_signal(study, grids, "T1", 1.0, np.random.default_rng([study.index, 1, 7])).astype(np.uint16)
    image_type = ["ORIGINAL", "PRIMARY", "LOCALIZER"] if flagged else ["ORIGINAL", "PRIMARY", "M", "ND"]
    _image_modules(series, study, image_type, pixels, 12)
    _mr_template(study, series, "T1", 1.0, 8.0)
    for instance, grid in enumerate(grids, start=1):
        series.add_instance(study, instance, grid)
    return series


# --- structured report ----------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _content(relationship: str, value_type: str, concept: Dataset, **values) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = [concept]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _sr_report(study: _Study, sections: list[tuple[str, str]]) -> _Series:
    """The report as an SR document (TID 2000 style): History, Findings and Impressions
    containers of TEXT items, and the reader as observer context (a PNAME, left out of the text)."""
    sop_class = EnhancedSRStorage if study.variant % 2 else BasicTextSRStorage
    series = _new_series(study, 900, "Radiology Report", "sr_report", sop_class)
    ds = series.template
    containers = {
        "CLINICAL INFORMATION": ("121060", "History"),
        "FINDINGS": ("121070", "Findings"),
        "IMPRESSION": ("121072", "Impressions"),
    }
    items = {
        "121060": ("121060", "History"),
        "121070": ("121071", "Finding"),
        "121072": ("121073", "Impression"),
    }
    content = [
        _content(
            "HAS OBS CONTEXT",
            "CODE",
            _code("121005", "DCM", "Observer Type"),
            ConceptCodeSequence=[_code("121006", "DCM", "Person")],
        ),
        _content(
            "HAS OBS CONTEXT",
            "PNAME",
            _code("121008", "DCM", "Person Observer Name"),
            PersonName=study.reader.pn,
        ),
    ]
    for heading, text in sections:
        if heading in containers:
            code, name = containers[heading]
            item_code, item_name = items[code]
            paragraphs = [
                _content("CONTAINS", "TEXT", _code(item_code, "DCM", item_name), TextValue=p)
                for p in text.split("\n")
                if p
            ]
            content.append(
                _content(
                    "CONTAINS",
                    "CONTAINER",
                    _code(code, "DCM", name),
                    ContinuityOfContent="SEPARATE",
                    ContentSequence=paragraphs,
                )
            )
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentTemplateSequence = [Dataset()]
    ds.ContentTemplateSequence[0].MappingResource, ds.ContentTemplateSequence[0].TemplateIdentifier = (
        "DCMR",
        "2000",
    )
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.ContentSequence = content
    series.add_instance(study, 1)
    return series


# --- reports --------------------------------------------------------------------------------

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")  # fmt: skip


def _date_text(da: str, style: int) -> str:
    """A DA value written as reports write dates."""
    y, m, d = int(da[:4]), int(da[4:6]), int(da[6:])
    styles = (
        f"{m:02d}/{d:02d}/{y}",
        f"{y}-{m:02d}-{d:02d}",
        f"{MONTHS[m - 1]} {d}, {y}",
        f"{d} {MONTHS[m - 1][:3]} {y}",
        da,
    )
    return styles[style % len(styles)]


def _pick(rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _finding_sentences(label: str, detail: dict | None, rng) -> tuple[str, str]:
    """(findings sentence, impression sentence or "") for a positive (detail) or negative finding."""
    if detail is None:
        return _pick(rng, NEGATIVE_SENTENCES[label]), ""
    return POSITIVE_SENTENCES[label](detail, rng)


def _nodule_sentences(detail, rng):
    (diameter, lobe), n = detail["nodules"][0], len(detail["nodules"])
    if n > 1:
        return (
            f"Multiple pulmonary nodules, the largest measuring {diameter} mm in the {lobe}.",
            f"{n} pulmonary nodules, largest {diameter} mm in the {lobe}; follow-up CT recommended.",
        )
    return (
        _pick(rng, (f"A {diameter} mm solid nodule in the {lobe}.", f"There is a {diameter} mm pulmonary nodule in the {lobe}.",
                    f"{lobe.capitalize()} nodule measuring {diameter} mm.")),
        f"{diameter} mm {lobe} pulmonary nodule.",
    )  # fmt: skip


def _effusion_sentences(detail, rng):
    size, side = detail["size"], detail["side"]
    noun = "pleural effusions" if side == "bilateral" else "pleural effusion"
    return (
        _pick(rng, (f"{size.capitalize()} {side} {noun}.", f"There is a {size} {side} {noun}.")),
        _pick(rng, (f"{size.capitalize()} {side} {noun}.", f"{size.capitalize()} {side} effusion.")),
    )


def _emphysema_sentences(detail, rng):
    severity = detail["severity"]
    return (
        _pick(rng, (f"{severity.capitalize()} centrilobular emphysema, upper lobe predominant, with scattered bullae.",
                    f"There is {severity} emphysema with bullae in both lungs.")),
        f"{severity.capitalize()} emphysema.",
    )  # fmt: skip


def _mass_sentences(detail, rng):
    d, side, lobe = detail["diameter"], detail["side"], detail["lobe"]
    return (
        _pick(rng, (f"A {d} mm mass in the {side} {lobe} lobe, hyperintense on T2 and FLAIR, with surrounding edema.",
                    f"There is a {d} mm {side} {lobe} mass with vasogenic edema.")),
        f"{d} mm {side} {lobe} mass with edema; further evaluation with contrast is recommended.",
    )  # fmt: skip


def _hemorrhage_sentences(detail, rng):
    d, side, lobe = detail["diameter"], detail["side"], detail["lobe"]
    return (
        _pick(rng, (f"Intraparenchymal hemorrhage in the {side} {lobe} lobe measuring {d} mm, hyperintense on T1.",
                    f"There is a {d} mm {side} {lobe} hematoma.")),
        f"{side.capitalize()} {lobe} intraparenchymal hemorrhage ({d} mm).",
    )  # fmt: skip


def _hydrocephalus_sentences(detail, rng):
    degree = detail["degree"]
    return (
        _pick(rng, (f"The lateral ventricles are enlarged, consistent with {degree} hydrocephalus.",
                    f"{degree.capitalize()} hydrocephalus with dilated lateral ventricles.")),
        f"{degree.capitalize()} hydrocephalus.",
    )  # fmt: skip


POSITIVE_SENTENCES: dict[str, Callable] = {
    "lung_nodule": _nodule_sentences,
    "pleural_effusion": _effusion_sentences,
    "emphysema": _emphysema_sentences,
    "mass": _mass_sentences,
    "hemorrhage": _hemorrhage_sentences,
    "hydrocephalus": _hydrocephalus_sentences,
}
NEGATIVE_SENTENCES = {
    "lung_nodule": (
        "No pulmonary nodules.",
        "There is no evidence of a pulmonary nodule.",
        "No lung nodule or mass is seen.",
    ),
    "pleural_effusion": (
        "No pleural effusion.",
        "There is no evidence of pleural effusion.",
        "The pleural spaces are clear.",
    ),
    "emphysema": (
        "No emphysema.",
        "There is no evidence of emphysema.",
        "The lung parenchyma shows no emphysematous change.",
    ),
    "mass": ("No intracranial mass.", "There is no evidence of a mass lesion.", "No space-occupying lesion."),
    "hemorrhage": (
        "No intracranial hemorrhage.",
        "There is no evidence of hemorrhage.",
        "No blood products are seen.",
    ),
    "hydrocephalus": (
        "No hydrocephalus.",
        "The ventricles are normal in size.",
        "There is no evidence of hydrocephalus.",
    ),
}
NORMAL_SENTENCES = {
    "CT": ("The heart is normal in size.", "No mediastinal or hilar lymphadenopathy.", "The central airways are patent.",
           "The osseous structures are unremarkable.", "The visualized upper abdomen is unremarkable."),
    "MR": ("No midline shift.", "The major intracranial flow voids are preserved.", "The cerebellum and brainstem are normal.",
           "The orbits and paranasal sinuses are unremarkable."),
}  # fmt: skip
INDICATIONS = {
    "CT": ("Cough.", "Shortness of breath.", "Weight loss.", "Chest pain.", "Staging."),
    "MR": ("Headache.", "Dizziness.", "Seizure.", "Memory loss.", "Visual disturbance."),
}


def _report_sections(study: _Study) -> list[tuple[str, str]]:
    """The report as (heading, text) sections, with header PHI repeated in the text."""
    rng = study.rng
    findings, impressions = [], []
    for label in study.labels:
        finding, impression = _finding_sentences(label, study.details.get(label), rng)
        if impression or rng.random() > 0.15:  # negatives are sometimes not mentioned
            findings.append(finding)
        if impression:
            impressions.append(impression)
    findings += [s for s in NORMAL_SENTENCES[study.modality] if rng.random() < 0.6]
    if not impressions:
        impressions = [_pick(rng, ("No acute abnormality.", "Normal study.", "No significant abnormality."))]
    exam = (
        "CT CHEST" + (" WITH CONTRAST" if study.contrast else " WITHOUT CONTRAST")
        if study.modality == "CT"
        else "MRI BRAIN WITHOUT CONTRAST"
    )
    date = _date_text(study.study_date, study.index)
    referring = _pick(
        rng, (f"Dr. {study.referring.plain}", f"Dr. {study.referring.family}", study.referring.pn)
    )
    history = f"{_pick(rng, INDICATIONS[study.modality])} Referred by {referring}."
    if study.index % 2:
        history += (
            f" Patient {study.patient.family.upper()}, {study.patient.given.upper()}, MRN {study.patient_id}."
        )
    return [
        ("EXAMINATION", f"{exam}, {date}. Accession {study.accession}."),
        ("CLINICAL INFORMATION", history),
        (
            "TECHNIQUE",
            "Axial images of the chest."
            if study.modality == "CT"
            else "Sagittal T1, axial T2 and FLAIR images of the brain.",
        ),
        ("COMPARISON", "None."),
        ("FINDINGS", "\n".join(findings)),
        (
            "IMPRESSION",
            "\n".join(f"{i}. {s}" if len(impressions) > 1 else s for i, s in enumerate(impressions, 1)),
        ),
        (
            "",
            f"Dictated by Dr. {study.reader.given} {study.reader.family}, {study.institution}, on {_date_text(study.study_date, study.index + 2)}.",
        ),
    ]


def _report_text(sections: list[tuple[str, str]], capitals: bool) -> str:
    parts = []
    for heading, text in sections:
        title = heading if capitals else heading.capitalize()
        parts.append(f"{title}:\n{text}" if heading else text)
    return "\n\n".join(parts)


def _phi_strings(study: _Study) -> dict[str, str]:
    """The study's fake PHI, as in the headers."""
    return {
        "PatientName": study.patient.pn,
        "PatientID": study.patient_id,
        "PatientBirthDate": study.birth_date,
        "StudyDate": study.study_date,
        "AccessionNumber": study.accession,
        "ReferringPhysicianName": study.referring.pn,
        "NameOfPhysiciansReadingStudy": study.reader.pn,
        "InstitutionName": study.institution,
        "StudyInstanceUID": study.uid,
    }


def _phi_variants(study: _Study) -> list[str]:
    """Every PHI string of the study, as headers and reports write it."""
    people = (study.patient, study.referring, study.reader)
    names = [
        v
        for p in people
        for v in (p.pn, p.plain, f"{p.family}, {p.given}", f"{p.family.upper()}, {p.given.upper()}")
    ]
    dates = [_date_text(study.study_date, s) for s in range(5)] + [study.birth_date]
    return [*_phi_strings(study).values(), *names, *dates]


# --- encoding and writing -------------------------------------------------------------------

_GDCM_SYNTAXES = (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless)
"""Encoded with GDCM when it is installed (one call per series; it also copes with images
under 32 pixels, which pylibjpeg-openjpeg's default settings refuse)."""
PIXEL_DATA = Tag(0x7FE0, 0x0010)
MEDIA_STORAGE_SOP_INSTANCE_UID = Tag(0x0002, 0x0003)


def available_transfer_syntaxes() -> list[UID]:
    """The syntaxes of :data:`TRANSFER_SYNTAX_CYCLE` this environment can encode."""
    available = []
    for uid in dict.fromkeys(TRANSFER_SYNTAX_CYCLE):
        if uid in _GDCM_SYNTAXES and _gdcm() is not None:
            ok = True
        else:
            ok = not uid.is_compressed or (uid != JPEGLosslessSV1 and get_encoder(uid).is_available)
        if ok:
            available.append(uid)
    return available


def _gdcm():
    try:
        import gdcm
    except ImportError:
        return None
    return gdcm


def _pixel_values(series: _Series, scratch: Path) -> list[bytes] | None:
    """Each instance's Pixel Data value in the series' transfer syntax (encapsulated if compressed)."""
    if series.pixels is None:
        return None
    syntax = series.transfer_syntax
    if not syntax.is_compressed:
        return [np.ascontiguousarray(f, f.dtype.newbyteorder("<")).tobytes() for f in series.pixels]
    if syntax in _GDCM_SYNTAXES and _gdcm() is not None:
        frames = _gdcm_frames(series, scratch)
    else:
        ds = series.template
        descriptors = dict(rows=ds.Rows, columns=ds.Columns, samples_per_pixel=1, bits_allocated=ds.BitsAllocated,
                           bits_stored=ds.BitsStored, pixel_representation=ds.PixelRepresentation,
                           photometric_interpretation=ds.PhotometricInterpretation, number_of_frames=1)  # fmt: skip
        frames = [get_encoder(syntax).encode(frame, **descriptors) for frame in series.pixels]
    return [encapsulate([frame]) for frame in frames]


def _gdcm_frames(series: _Series, scratch: Path) -> list[bytes]:
    """Compress every frame of the series with GDCM in one go, through a multi-frame scratch file."""
    gdcm = _gdcm()
    source, target = scratch / "frames.dcm", scratch / "frames-compressed.dcm"
    ds = Dataset()
    for keyword in ("SOPClassUID", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):  # fmt: skip
        setattr(ds, keyword, series.template[keyword].value)
    ds.SOPInstanceUID = series.uid
    ds.NumberOfFrames = len(series.pixels)
    ds.PixelData = np.ascontiguousarray(series.pixels, series.pixels.dtype.newbyteorder("<")).tobytes()
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds.save_as(source, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(series.transfer_syntax))))
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    if not reader.Read():
        raise RuntimeError(f"GDCM could not read {source}")
    change.SetInput(reader.GetImage())
    writer.SetFile(reader.GetFile())
    if not change.Change():
        raise RuntimeError(f"GDCM could not encode {series.transfer_syntax.name}")
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM could not write {target}")
    return list(generate_frames(pydicom.dcmread(target).PixelData, number_of_frames=len(series.pixels)))


def _file_meta(sop_class: str, sop_instance: str, syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HLIP_SYNTH_1"
    meta.FileMetaInformationVersion = b"\x00\x01"
    return meta


def _encode_elements(elements: Sequence[DataElement], implicit: bool) -> bytes:
    """Elements encoded as pydicom writes them (little endian, ISO_IR 100)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    for element in elements:
        write_data_element(fp, element, ["latin_1"])
    return fp.getvalue()


def _pixel_element(value: bytes, series: _Series) -> DataElement:
    if series.transfer_syntax.is_compressed:
        return DataElement(PIXEL_DATA, "OB", value, is_undefined_length=True)
    return DataElement(PIXEL_DATA, "OB" if series.template.BitsAllocated == 8 else "OW", value)


def series_files(series: _Series, scratch: Path) -> list[bytes]:
    """The bytes of each instance's DICOM file (preamble, file meta, data set).

    The elements shared by every instance are encoded once per series and the few that
    differ are spliced in tag order, which gives the bytes pydicom's writer would give
    for each full data set, many times faster.
    """
    syntax = series.transfer_syntax
    values = _pixel_values(series, scratch)
    pixels = {PIXEL_DATA: [_pixel_element(v, series) for v in values]} if values else {}
    implicit = syntax == ImplicitVRLittleEndian
    bodies = _spliced(series.template, series.instances, pixels, implicit)
    meta = _file_meta(series.template.SOPClassUID, "", syntax)
    del meta.MediaStorageSOPInstanceUID
    instance_uids = [
        {MEDIA_STORAGE_SOP_INSTANCE_UID: DataElement(MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", i.SOPInstanceUID)}
        for i in series.instances
    ]
    metas = _spliced(meta, instance_uids, {}, implicit=False)
    files = []
    for meta_bytes, body in zip(metas, bodies, strict=True):
        if syntax == DeflatedExplicitVRLittleEndian:
            body = _deflate(body)
        group_length = _encode_elements([DataElement(0x00020000, "UL", len(meta_bytes))], implicit=False)
        files.append(b"\x00" * 128 + b"DICM" + group_length + meta_bytes + body)
    return files


def _spliced(
    shared: Dataset, instances: Sequence[Mapping], extra: Mapping[Tag, list], implicit: bool
) -> list[bytes]:
    """Each instance's elements (``instances[i]`` and ``extra[tag][i]``) merged in tag order
    with the ``shared`` ones, which are encoded once."""
    variable = sorted(set(instances[0].keys()) | set(extra))
    runs: list[list[DataElement]] = [[] for _ in range(len(variable) + 1)]
    for tag in sorted(shared.keys()):
        runs[bisect.bisect(variable, tag)].append(shared[tag])
    encoded = [_encode_elements(run, implicit) for run in runs]
    out = []
    for i, instance in enumerate(instances):
        parts = [encoded[0]]
        for tag, after in zip(variable, encoded[1:], strict=True):
            element = extra[tag][i] if tag in extra else instance[tag]
            parts += [_encode_elements([element], implicit), after]
        out.append(b"".join(parts))
    return out


def _deflate(body: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(body) + compressor.flush()
    return deflated + b"\x00" * (len(deflated) % 2)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _layout(study: _Study, series: _Series, instance: Dataset) -> str:
    """Where an instance goes; three folder styles seen in real exports."""
    style, number = study.index % 3, instance.InstanceNumber
    if style == 0:
        return f"{study.patient_id}/{study.accession}/{series.number:03d}_{_slug(series.description)}/IM{number:04d}"
    if style == 1:
        return f"{study.uid}/{series.uid}/{instance.SOPInstanceUID}.dcm"
    return f"{study.study_date}_{study.accession}/S{series.number:04d}I{number:04d}.DCM"


_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


class _Writer:
    """Writes the archive's files and records what each one is."""

    def __init__(self, root: Path, scratch: Path):
        self.root, self.scratch, self.files = root, scratch, []

    def put(self, relpath: str, data: bytes, record: SynthFile | None) -> None:
        """Write a file; ``record`` is None for a container whose members are recorded."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if record is not None:
            self.files.append(record)

    def write_study(self, study: _Study, series_list: list[_Series], packaging: str) -> None:
        """Write every instance loose, into one zip, or as a DICOMDIR file set."""
        encoded = [
            (series, instance, data)
            for series in series_list
            for instance, data in zip(series.instances, series_files(series, self.scratch), strict=True)
        ]
        if packaging == "zip":
            self._zip(study, encoded)
        elif packaging == "dicomdir":
            self._file_set(study, encoded)
        else:
            for series, instance, data in encoded:
                relpath = _layout(study, series, instance)
                self.put(relpath, data, _record(relpath, series, instance))

    def _zip(self, study: _Study, encoded) -> None:
        relpath = f"zip_exports/{study.accession}.zip"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for series, instance, data in encoded:
                member = _layout(study, series, instance)
                info = zipfile.ZipInfo(member, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, data)
                self.files.append(_record(relpath, series, instance, member))
        self.put(relpath, buffer.getvalue(), None)

    def _file_set(self, study: _Study, encoded) -> None:
        """A CD-style export: DICOMDIR and PT*/ST*/SE*/IM* files written by pydicom's FileSet."""
        file_set = FileSet()
        file_set.ID = "HLIPSYNTH"
        file_set.UID = study.uid_for("fileset")
        for _, _, data in encoded:
            file_set.add(pydicom.dcmread(io.BytesIO(data)))
        folder = self.root / f"cd_export_{study.index}"
        file_set.write(folder)
        self.files.append(SynthFile(f"{folder.name}/DICOMDIR", "dicomdir", study_uid=study.uid))
        written = {instance.SOPInstanceUID: Path(instance.path) for instance in file_set}
        for series, instance, _ in encoded:
            relpath = written[instance.SOPInstanceUID].relative_to(self.root).as_posix()
            self.files.append(_record(relpath, series, instance))


def _record(path: str, series: _Series, instance: Dataset, member: str = "") -> SynthFile:
    return SynthFile(
        path,
        series.kind,
        member,
        series.template.StudyInstanceUID,
        series.uid,
        instance.SOPInstanceUID,
        str(series.transfer_syntax),
    )


def _broken_files(writer: _Writer, first: SynthFile, rng: np.random.Generator) -> None:
    """Clutter: a duplicate instance, a truncated one, an empty file, text and binary junk."""
    data = (writer.root / first.path).read_bytes()
    dup = SynthFile(**{**asdict(first), "path": f"duplicates/{Path(first.path).name}", "kind": "duplicate"})
    writer.put(dup.path, data, dup)
    cut = SynthFile(**{**asdict(first), "path": "incoming/partial_transfer.dcm", "kind": "truncated"})
    writer.put(cut.path, data[: int(len(data) * 0.6)], cut)
    writer.put("incoming/EMPTY", b"", SynthFile("incoming/EMPTY", "empty"))
    readme = "Export from PACS. Do not distribute.\nContact the imaging department for questions.\n"
    writer.put("README.txt", readme.encode(), SynthFile("README.txt", "not_dicom"))
    writer.put("incoming/Thumbs.db", rng.bytes(512), SynthFile("incoming/Thumbs.db", "not_dicom"))


def _assign_syntaxes(series_list: list[_Series], counter: int, cycle: Sequence[UID]) -> int:
    """Series take the syntaxes of ``cycle`` in turn (SR documents: an uncompressed one)."""
    for series in series_list:
        series.transfer_syntax = cycle[counter % len(cycle)]
        if series.kind == "sr_report" and series.transfer_syntax.is_compressed:
            series.transfer_syntax = ExplicitVRLittleEndian
        counter += 1
    return counter


def _syntax_cycle(transfer_syntaxes: Sequence[str] | None) -> list[UID]:
    available = available_transfer_syntaxes()
    if transfer_syntaxes is None:
        return [uid for uid in TRANSFER_SYNTAX_CYCLE if uid in available]
    cycle = [UID(uid) for uid in transfer_syntaxes]
    missing = [uid.name for uid in cycle if uid not in available]
    if missing or not cycle:
        raise ValueError(
            f"cannot encode {missing or 'an empty list'}; available: {[u.name for u in available]}"
        )
    return cycle


def _write_reports_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = ["StudyInstanceUID", "AccessionNumber", "report", *FINDINGS]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _packaging(index: int, n_studies: int) -> str:
    if n_studies >= 4 and index == n_studies - 1:
        return "zip"
    if n_studies >= 4 and index == n_studies - 2:
        return "dicomdir"
    return "loose"


def make_archive(
    out_dir: str | Path,
    n_studies: int = 12,
    seed: int = 0,
    *,
    modalities: Sequence[str] = ("CT", "MR"),
    sizes: Sizes | None = None,
    ct_matrix: int | None = None,
    transfer_syntaxes: Sequence[str] | None = None,
) -> SynthArchive:
    """Write a synthetic uncurated archive of ``n_studies`` studies into ``out_dir`` (which
    must be empty or absent) and ``out_dir/reports.csv``; the same arguments give the same bytes.

    Studies take ``modalities`` in turn. Features rotate over studies, so any archive of
    4 or more studies (2 of each modality) has every kind of file in :data:`KINDS`: every third
    study carries its report in an SR, the last study is a zip export, the one before it a
    DICOMDIR file set; both SR classes (Basic Text, Enhanced) appear from 6 studies on.
    ``ct_matrix`` is a shortcut for ``Sizes(ct_matrix=...)``. Image series take the
    ``transfer_syntaxes`` in turn (default: :data:`TRANSFER_SYNTAX_CYCLE`, where encodable);
    ``[ExplicitVRLittleEndian]`` gives an uncompressed archive.
    """
    root = Path(out_dir).absolute()  # files are written, and recorded, relative to it
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; a synthetic archive needs an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    sizes = sizes or Sizes()
    if ct_matrix is not None:
        sizes = Sizes(**{**asdict(sizes), "ct_matrix": ct_matrix})
    cycle = _syntax_cycle(transfer_syntaxes)
    studies, rows, phi, counter = [], [], [], 0
    with tempfile.TemporaryDirectory(prefix="hlip-synth-") as scratch:
        writer = _Writer(root, Path(scratch))
        for index in range(n_studies):
            study = _plan_study(index, seed, modalities[index % len(modalities)], sizes)
            series_list = _ct_series(study, sizes) if study.modality == "CT" else _mr_series(study, sizes)
            sections = _report_sections(study)
            text = _report_text(sections, capitals=study.index % 4 < 2)
            if study.report_in_sr:
                series_list.append(_sr_report(study, sections))
                text = sr_text(series_list[-1].template)
            counter = _assign_syntaxes(series_list, counter, cycle)
            writer.write_study(study, series_list, _packaging(index, n_studies))
            studies.append(_summary(study, series_list, text))
            rows.append(_csv_row(study, "" if study.report_in_sr else text))
            phi += [v for v in _phi_variants(study) if v not in phi]
        if writer.files:
            first = next(f for f in writer.files if f.kind in SCAN_KINDS and not f.member)
            _broken_files(writer, first, np.random.default_rng([seed, n_studies, 99]))
    _write_reports_csv(root / "reports.csv", rows)
    return SynthArchive(root, root / "reports.csv", studies, writer.files, phi)


def _csv_row(study: _Study, text: str) -> dict[str, Any]:
    row: dict[str, Any] = {"StudyInstanceUID": study.uid, "AccessionNumber": study.accession, "report": text}
    row.update({label: study.labels.get(label, "") for label in FINDINGS})
    return row


def _summary(study: _Study, series_list: list[_Series], text: str) -> SynthStudy:
    return SynthStudy(
        study_uid=study.uid,
        accession_number=study.accession,
        modality=study.modality,
        body_part="CHEST" if study.modality == "CT" else "HEAD",
        labels=dict(study.labels),
        report=text,
        report_in_sr=study.report_in_sr,
        phi=_phi_strings(study),
        findings={label: dict(detail) for label, detail in study.details.items()},
        series=[
            SynthSeries(s.uid, s.number, s.description, s.kind, len(s.instances), str(s.transfer_syntax))
            for s in series_list
        ],
    )
