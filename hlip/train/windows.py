"""CT windows chosen per body region, so one recipe serves a mixed head + chest archive.

A single window cannot serve both: HLIP's chest window [-1150, 350] HU spreads 1500 HU over
[0, 1], so grey matter (about 35 HU) and fresh blood (about 60 HU) land 0.017 apart, below
what a small model resolves; the brain window [0, 80] puts them 0.3 apart. HLIP's head-CT
recipe feeds brain, subdural and bone windows. Each CT scan therefore gets the windows of its
region, read from the scan's metadata:

1. the study's ``BodyPartExamined`` (the only header field of the region that de-identification
   keeps, docs/ingest.md);
2. else words of the scan's series description ("HEAD", "BRAIN", "CHEST", "THORAX", ...);
3. else ``ct_region`` of the config, for an archive that records neither;
4. else the config's ``ct_windows`` (the chest window by default).

The windows per region are the config's ``ct_region_windows`` table (defaults in
:data:`REGION_WINDOWS`); a region not in it also falls back to ``ct_windows``.
"""

from __future__ import annotations

import re

REGION_WINDOWS: dict[str, list[list[float]]] = {
    "head": [
        [0.0, 80.0],
        [-20.0, 180.0],
        [-800.0, 2000.0],
    ],  # brain W80/L40, subdural W200/L80, bone W2800/L600
    "chest": [[-1150.0, 350.0]],  # HLIP's CT-RATE window
}
"""Default ``ct_region_windows``: [low, high] HU windows of each body region."""

REGION_WORDS = {
    "head": ("HEAD", "BRAIN", "SKULL", "CRANIUM", "CRANIAL", "CEREBRAL", "NEURO", "CEREBRUM"),
    "chest": ("CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "PULMONARY", "THX"),
}
"""Words of BodyPartExamined or a series description that name a region (upper case)."""


def body_region(body_part: str, series_description: str = "", fallback: str = "") -> str:
    """The region (a key of :data:`REGION_WORDS`) of a scan, or ``fallback`` when nothing names one."""
    for text in (body_part, series_description):
        words = set(re.split(r"[^A-Z]+", text.upper()))
        for region, names in REGION_WORDS.items():
            if words & set(names):
                return region
    return fallback


def region_windows(
    region: str, table: dict[str, list[list[float]]], default: list[list[float]]
) -> list[list[float]]:
    """The windows of ``region`` in ``table``, else ``default``."""
    return [list(map(float, w)) for w in table.get(region, default)]
