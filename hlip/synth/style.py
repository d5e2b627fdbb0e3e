"""What one archive's seed fixes for all of its studies: the house style of its reports, the
size range of each lesion, the lesions' intensities and each scanner's calibration.

A model trained on one draw and evaluated on another (another seed) meets other report
wording, other lesion sizes, other contrasts and other scanners, as when a model moves from
one hospital to the next; a recipe tuned to one draw shows it on the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from hlip.synth.volumes import BLOOD, EDEMA, HU, MASS, MR_SIGNAL, NODULE

STYLE_STREAM = 0x57E1E
"""Second word of the style generator's seed, [seed, STYLE_STREAM]: apart from every study's."""

LESION_MM = {
    "lung_nodule": ((8, 14), (8, 14)),
    "mass": ((14, 22), (10, 16)),
    "hemorrhage": ((11, 18), (10, 16)),
    "intracranial_hemorrhage": ((5, 9), (16, 24)),
}
"""Per focal finding: the draw of the smallest diameter (mm, at lesion scale 1) and of the
width of the range above it, so that each archive has its own size range."""


@dataclass(frozen=True)
class ArchiveStyle:
    """The draw of one archive: wording choices, lesion sizes, lesion intensities, scanners.

    ``wording`` maps a label to the indices of the positive forms, the impression form and the
    negative sentences this archive's radiologists use (:mod:`hlip.synth.reports` holds the
    pools); ``normal`` maps a study kind to its normal sentences' indices."""

    wording: dict[str, tuple[tuple[int, ...], int, tuple[int, ...]]]
    normal: dict[str, tuple[int, ...]]
    lesion_mm: dict[str, tuple[int, int]]
    nodule_hu: float
    ct_blood_hu: tuple[int, int]
    mr_lesion_factor: dict[str, np.ndarray]
    ct_offset_hu: dict[str, float]
    ct_noise_hu: dict[str, float]
    mr_noise: dict[str, float]

    def hu(self, blood: float | None = None) -> np.ndarray:
        """The CT number table of a study of this archive (its hemorrhage at ``blood`` HU)."""
        table = HU.copy()
        table[NODULE] = self.nodule_hu
        if blood is not None:
            table[BLOOD] = blood
        return table

    def mr_signal(self, weighting: str) -> np.ndarray:
        return MR_SIGNAL[weighting] * self.mr_lesion_factor[weighting]


@cache
def archive_style(seed: int) -> ArchiveStyle:
    """The style of the archive of ``seed`` (the same seed, the same style)."""
    from hlip.synth.reports import NEGATIVE_SENTENCES, NORMAL_SENTENCES, POSITIVE_FORMS
    from hlip.synth.studies import CT_SCANNERS, MR_SCANNERS

    rng = np.random.default_rng([seed, STYLE_STREAM])

    def some(pool_size: int, k: int) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in rng.choice(pool_size, size=min(k, pool_size), replace=False)))

    wording = {
        label: (some(len(forms.findings), 3), int(rng.integers(len(forms.impressions))), some(len(NEGATIVE_SENTENCES[label]), 3))
        for label, forms in POSITIVE_FORMS.items()
    }  # fmt: skip
    normal = {kind: some(len(pool), 5) for kind, pool in NORMAL_SENTENCES.items()}
    lesion_mm = {}
    for label, ((lo_min, lo_max), (width_min, width_max)) in LESION_MM.items():
        low = int(rng.integers(lo_min, lo_max + 1))
        lesion_mm[label] = (low, low + int(rng.integers(width_min, width_max + 1)))
    blood_low = int(rng.integers(45, 59))
    factor = {}
    for weighting in MR_SIGNAL:
        row = np.ones(len(HU), np.float32)
        row[[BLOOD, MASS, EDEMA]] = rng.uniform(0.85, 1.15, 3)
        factor[weighting] = row
    return ArchiveStyle(
        wording=wording,
        normal=normal,
        lesion_mm=lesion_mm,
        nodule_hu=float(rng.uniform(20, 60)),
        ct_blood_hu=(blood_low, min(blood_low + int(rng.integers(22, 36)), 95)),
        mr_lesion_factor=factor,
        ct_offset_hu={model: float(rng.uniform(-10, 10)) for _, model, _ in CT_SCANNERS},
        ct_noise_hu={model: float(rng.uniform(7, 15)) for _, model, _ in CT_SCANNERS},
        mr_noise={model: float(rng.uniform(0.7, 1.4)) for _, model, _ in MR_SCANNERS},
    )
