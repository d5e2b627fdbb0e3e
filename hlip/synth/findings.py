"""The findings synthetic studies can carry, and how each is planted in a phantom.

:data:`FINDINGS` is the label set of ``reports.csv``; the planting functions add a finding's
tissue to a phantom and return its details (size, side, lobe) for the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hlip.synth.volumes import BLOOD, BULLA, EDEMA, EMPHYSEMA, FLUID, INF, LUNG, MASS, NODULE, Phantom


@dataclass(frozen=True)
class Finding:
    """A finding the phantom can carry: where, what it looks like, and how reports say it.

    The prompts are plain clinical phrases, as a user writes them for zero-shot classification,
    each negative the negation of its positive: not the wording of the synthetic reports, which
    varies from archive to archive (:mod:`hlip.synth.style`).
    """

    label: str
    modality: str
    body_part: str
    description: str
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]

    @property
    def kind(self) -> str:
        """The study kind (:data:`STUDY_KINDS`) that carries this finding."""
        return next(k for k, where in STUDY_KINDS.items() if where == (self.modality, self.body_part))


STUDY_KINDS = {"CT": ("CT", "CHEST"), "MR": ("MR", "HEAD"), "CT-HEAD": ("CT", "HEAD")}
"""The kinds of study an archive holds (``make_archive(modalities=...)``), by (modality, body part):
chest CT, brain MR and head CT."""

FINDINGS: dict[str, Finding] = {
    f.label: f
    for f in (
        Finding(
            "lung_nodule",
            "CT",
            "CHEST",
            "1-3 solid spheres of soft tissue (20-60 HU), 8-28 mm, inside a lung (-850 HU).",
            ("Pulmonary nodule.", "Lung nodule.", "Nodule in the lung."),
            ("No pulmonary nodules.", "No lung nodule.", "No nodule in the lungs."),
        ),
        Finding(
            "pleural_effusion",
            "CT",
            "CHEST",
            "Fluid (15 HU) filling the dependent (posterior) 25-55% of one or both pleural spaces.",
            ("Pleural effusion.", "Fluid in the pleural space.", "Effusion of the pleura."),
            ("No pleural effusion.", "No fluid in the pleural space.", "No effusion of the pleura."),
        ),
        Finding(
            "emphysema",
            "CT",
            "CHEST",
            "Lungs of lower attenuation (-930 HU) with 20-40 bullae (-990 HU, 10-24 mm), upper-lobe predominant.",
            ("Emphysema.", "Emphysema of the lungs.", "Emphysematous lungs."),
            ("No emphysema.", "No emphysema of the lungs.", "No emphysematous change."),
        ),
        Finding(
            "mass",
            "MR",
            "HEAD",
            "A 14-38 mm mass in a cerebral hemisphere, bright on T2 and FLAIR, dark on T1, with a halo of edema.",
            ("Brain mass.", "Intracranial mass.", "Mass in the brain."),
            ("No brain mass.", "No intracranial mass.", "No mass in the brain."),
        ),
        Finding(
            "hemorrhage",
            "MR",
            "HEAD",
            "A 11-34 mm intraparenchymal hematoma, bright on T1 and FLAIR, dark on T2.",
            ("Brain hemorrhage.", "Intracranial hemorrhage.", "Hematoma in the brain."),
            ("No brain hemorrhage.", "No intracranial hemorrhage.", "No hematoma in the brain."),
        ),
        Finding(
            "hydrocephalus",
            "MR",
            "HEAD",
            "Lateral ventricles (CSF) about twice their normal width and length.",
            ("Hydrocephalus.", "Enlarged ventricles.", "Dilated ventricles of the brain."),
            ("No hydrocephalus.", "Normal-sized ventricles.", "No dilated ventricles of the brain."),
        ),
        Finding(
            "intracranial_hemorrhage",
            "CT",
            "HEAD",
            "A 5-33 mm intraparenchymal hemorrhage, hyperdense (45-93 HU) against grey (35 HU) and white (28 HU) matter.",
            ("Intracranial hemorrhage.", "Brain hemorrhage.", "Hematoma in the brain."),
            ("No intracranial hemorrhage.", "No brain hemorrhage.", "No hematoma in the brain."),
        ),
    )
}
PREVALENCE = 0.45
"""Probability that a finding is planted in a study of its kind, independently per finding."""


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


def plant_bullae(rng, ph: Phantom, lungs, z_window, scale: float) -> dict:
    count = int(rng.integers(20, 41))
    for _ in range(count):
        center, semi = lungs["right" if rng.random() < 0.5 else "left"]
        point = _point_in(rng, center, semi, 12, z_window)
        while point[2] < center[2] - 0.3 * semi[2] and rng.random() < 0.6:  # upper-lobe predominant
            point = _point_in(rng, center, semi, 12, z_window)
        ph.add(point, (rng.uniform(5, 12) * scale,) * 3, BULLA)
    return {"severity": "moderate" if count < 30 else "severe"}


def plant_effusion(rng, ph: Phantom, lungs) -> dict:
    side = str(rng.choice(["left", "right", "bilateral"]))
    size, fraction = [("small", 0.25), ("moderate", 0.4), ("large", 0.55)][int(rng.integers(3))]
    for name, (center, semi) in lungs.items():
        if side in (name, "bilateral"):
            ph.add(center, semi, FLUID, posterior_of=center[1] + semi[1] * (1 - 2 * fraction))
    return {"side": side, "size": size}


def _diameter(rng, mm: tuple[int, int], scale: float) -> int:
    """A lesion diameter (mm) drawn from the archive's range ``mm``, times ``scale``."""
    return int(round(rng.integers(mm[0], mm[1] + 1) * scale))


def plant_nodules(rng, ph: Phantom, lungs, z_window, scale: float, mm: tuple[int, int]) -> dict:
    """1-3 nodules, each placed where the phantom is lung all around it."""
    nodules = []
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        diameter = _diameter(rng, mm, scale)
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


def brain_site(rng, z0: float, s: float, radius: float) -> tuple[np.ndarray, str, str]:
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


def plant_mass(rng, ph: Phantom, z0: float, s: float, scale: float, mm: tuple[int, int]) -> dict:
    diameter = _diameter(rng, mm, scale)
    point, side, lobe = brain_site(rng, z0, s, diameter / 2)
    ph.add(point, (diameter * 0.8,) * 3, EDEMA)
    ph.add(point, (diameter / 2,) * 3, MASS)
    return {"diameter": diameter, "side": side, "lobe": lobe}


def plant_hematoma(rng, ph: Phantom, z0: float, s: float, scale: float, mm: tuple[int, int]) -> dict:
    diameter = _diameter(rng, mm, scale)
    point, side, lobe = brain_site(rng, z0, s, diameter / 2)
    ph.add(point, (diameter / 2, diameter * 0.4, diameter * 0.35), BLOOD)
    return {"diameter": diameter, "side": side, "lobe": lobe}


def plant_ct_hemorrhage(
    rng, ph: Phantom, z0: float, s: float, scale: float, mm: tuple[int, int], hu: tuple[int, int]
) -> dict:
    """An acute intraparenchymal hemorrhage on head CT, from a few millimetres to a large
    hematoma and from faintly to clearly hyperdense (``hu``, the archive's range): the density
    (HU) goes with the detail, for the study's CT numbers."""
    diameter = _diameter(rng, mm, scale)
    density = int(rng.integers(hu[0], hu[1] + 1))
    point, side, lobe = brain_site(rng, z0, s, diameter / 2)
    ph.add(point, (diameter / 2, diameter * 0.42, diameter * 0.38), BLOOD)
    return {"diameter": diameter, "side": side, "lobe": lobe, "density": density}
