"""Normal anatomy of the two study types (supine chest, head) with their findings planted."""

from __future__ import annotations

import numpy as np

from hlip.synth.findings import (
    plant_bullae,
    plant_ct_hemorrhage,
    plant_effusion,
    plant_hematoma,
    plant_mass,
    plant_nodules,
)
from hlip.synth.style import ArchiveStyle
from hlip.synth.volumes import (
    BONE,
    CSF,
    EMPHYSEMA,
    ENHANCED,
    FAT,
    GRAY,
    INF,
    LUNG,
    SOFT,
    VESSEL,
    WHITE,
    Phantom,
)


def chest_phantom(
    rng: np.random.Generator,
    z0: float,
    labels: dict[str, int],
    contrast: bool,
    half_z: float,
    scale: float,
    style: ArchiveStyle,
):
    """A supine chest (LPS: +x patient left, +y posterior) centred on z = ``z0``, with findings
    planted within ``half_z`` mm of it (the scanned range); returns the phantom and the details
    of its findings, for the report. A finding that finds no room is set to 0 in ``labels``."""
    ph, details = Phantom(), {}
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
        details["emphysema"] = plant_bullae(rng, ph, lungs, window, scale)
    if labels.get("pleural_effusion"):
        details["pleural_effusion"] = plant_effusion(rng, ph, lungs)
    ph.add((22, -28, z0 - 40), (55, 45, 48), SOFT)  # heart
    ph.add((8, 45, 0), (11, 11, INF), ENHANCED if contrast else VESSEL)  # descending aorta
    ph.add((0, ay - 38, 0), (17, 15, INF), BONE)  # vertebral bodies
    ph.add((0, -(ay - 20), 0), (11, 5, INF), BONE)  # sternum
    if labels.get("lung_nodule"):
        details["lung_nodule"] = plant_nodules(rng, ph, lungs, window, scale, style.lesion_mm["lung_nodule"])
    labels.update({label: int(bool(details.get(label))) for label in labels})
    return ph, details


def brain_phantom(
    rng: np.random.Generator, z0: float, labels: dict[str, int], scale: float, style: ArchiveStyle
):
    """A head centred on (0, 0, z0): scalp fat, skull, CSF, grey and white matter, lateral
    ventricles; returns the phantom and the details of its findings."""
    ph, details = Phantom(), {}
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
    if labels.get("mass"):
        details["mass"] = plant_mass(rng, ph, z0, s, scale, style.lesion_mm["mass"])
    if labels.get("hemorrhage"):
        details["hemorrhage"] = plant_hematoma(rng, ph, z0, s, scale, style.lesion_mm["hemorrhage"])
    if labels.get("intracranial_hemorrhage"):
        mm, hu = style.lesion_mm["intracranial_hemorrhage"], style.ct_blood_hu
        details["intracranial_hemorrhage"] = plant_ct_hemorrhage(rng, ph, z0, s, scale, mm, hu)
    return ph, details
