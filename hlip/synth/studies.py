"""Study plans: everything decided about a study (people, dates, scanner, labels, phantom)
before any pixel is made, drawn from one generator per (seed, study index)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from hlip.synth.anatomy import brain_phantom, chest_phantom
from hlip.synth.findings import FINDINGS, PREVALENCE, STUDY_KINDS
from hlip.synth.style import ArchiveStyle, archive_style
from hlip.synth.volumes import Phantom

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


@dataclass
class Person:
    family: str
    given: str

    @property
    def pn(self) -> str:
        return f"{self.family.upper()}^{self.given.upper()}"

    @property
    def plain(self) -> str:
        return f"{self.given} {self.family}"


@dataclass
class Study:
    """Everything decided about one study before any pixel is made."""

    index: int
    kind: str
    style: ArchiveStyle
    """What the archive's seed fixes: report wording, lesion sizes and intensities, scanners."""
    modality: str
    body_part: str
    hu: np.ndarray
    """CT number of each tissue code in this study (a hemorrhage's density varies)."""
    rng: np.random.Generator
    uid: str
    frame_uid: str
    accession: str
    patient: Person
    patient_id: str
    sex: str
    birth_date: str
    study_date: str
    study_time: str
    referring: Person
    reader: Person
    institution: str
    scanner: tuple
    labels: dict[str, int]
    details: dict[str, dict]
    phantom: Phantom
    z0: float
    variant: int
    contrast: bool = False
    report_in_sr: bool = False

    def uid_for(self, *parts: Any) -> str:
        return _uid(self.uid, *parts)


def plan_study(index: int, seed: int, kind: str, sizes: Sizes) -> Study:
    """The plan of study ``index`` of kind ``kind`` (a key of :data:`STUDY_KINDS`)."""
    if kind not in STUDY_KINDS:
        raise ValueError(f"unknown study kind {kind!r}; known: {list(STUDY_KINDS)}")
    modality, body_part = STUDY_KINDS[kind]
    rng = np.random.default_rng([seed, index])
    uid = _uid("hlip-synth", seed, index)
    labels = {name: int(rng.random() < PREVALENCE) for name, f in FINDINGS.items() if f.kind == kind}
    age_days = int(rng.integers(25 * 365, 89 * 365))
    study_day = np.datetime64("2019-01-01") + int(rng.integers(0, 6 * 365))
    z0 = float(rng.uniform(-160, -100)) if body_part == "CHEST" else float(rng.uniform(40, 80))
    contrast = kind == "CT" and rng.random() < 0.35
    style = archive_style(seed)
    if kind == "CT":
        phantom, details = chest_phantom(
            rng, z0, labels, contrast, sizes.ct_coverage_mm / 2, sizes.lesion_scale, style
        )
    else:
        phantom, details = brain_phantom(rng, z0, labels, sizes.lesion_scale, style)
    hu = style.hu(details.get("intracranial_hemorrhage", {}).get("density"))
    scanners = CT_SCANNERS if modality == "CT" else MR_SCANNERS
    return Study(
        index=index,
        kind=kind,
        style=style,
        modality=modality,
        body_part=body_part,
        hu=hu,
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


def _person(rng) -> Person:
    return Person(str(rng.choice(FAMILY_NAMES)), str(rng.choice(GIVEN_NAMES)))


def _da(day: np.datetime64) -> str:
    return str(day).replace("-", "")


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
