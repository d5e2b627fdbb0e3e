"""Synthetic CT studies for tests, benchmarks and demos of the shard format.

The phantom is an axial body cross-section repeated along the slices: a body ellipse
of soft tissue (~40 HU) with two lungs (~-850 HU) and a vertebra (~700 HU) in air
(-1000 HU), plus Gaussian noise (sigma 10 HU) inside the body. It compresses like a real
CT scan because, as in one, most of the entropy is the noise of the patient's tissue.
"""

from __future__ import annotations

import numpy as np

from hlip.shards.format import Scan, Study

AIR_HU, TISSUE_HU, LUNG_HU, BONE_HU = -1000, 40, -850, 700


def phantom_ct(
    shape: tuple[int, int, int], seed: int = 0, noise_hu: float = 10.0, noise_everywhere: bool = False
) -> np.ndarray:
    """An int16 ``[d, h, w]`` CT volume in HU; ``noise_everywhere`` also adds noise to the air."""
    depth, height, width = shape
    y, x = np.ogrid[:height, :width]
    body = ((y - height / 2) / (0.42 * height)) ** 2 + ((x - width / 2) / (0.47 * width)) ** 2 <= 1
    section = np.where(body, TISSUE_HU, AIR_HU).astype(np.float32)
    for center in (0.3, 0.7):
        lung = ((y - 0.45 * height) / (0.25 * height)) ** 2 + (
            (x - center * width) / (0.15 * width)
        ) ** 2 <= 1
        section[lung] = LUNG_HU
    section[(y - 0.7 * height) ** 2 + (x - width / 2) ** 2 <= (0.06 * height) ** 2] = BONE_HU
    noise = np.random.default_rng(seed).normal(0.0, noise_hu, shape).astype(np.float32)
    volume = section + noise * (1.0 if noise_everywhere else body)
    return np.round(volume).astype(np.int16)


def axial_affine(spacing: tuple[float, float, float], origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """LPS affine of an axial stack: w -> x (left), h -> y (posterior), d -> z (superior)."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, spacing[2]], [0, spacing[1], 0], [spacing[0], 0, 0]], dtype=float)
    affine[:3, 3] = origin
    return affine


def synthetic_study(
    key: str,
    n_scans: int = 3,
    shape: tuple[int, int, int] = (100, 350, 350),
    spacing: tuple[float, float, float] = (1.5, 0.8, 0.8),
    seed: int = 0,
    noise_everywhere: bool = False,
) -> Study:
    """A CT study of ``n_scans`` phantom scans with a short report and one label."""
    scans = [
        Scan(
            name=f"scan{i}",
            array=phantom_ct(shape, seed=seed * 1000 + i, noise_everywhere=noise_everywhere),
            spacing=spacing,
            affine=axial_affine(
                spacing, origin=(-0.5 * shape[2] * spacing[2], -0.5 * shape[1] * spacing[1], -100.0)
            ),
            modality="CT",
            series_number=i + 1,
            series_description=f"phantom {i}",
            source_file_count=shape[0],
        )
        for i in range(n_scans)
    ]
    report = f"Synthetic phantom study {key}. No acute findings."
    return Study(
        key=key, modality="CT", scans=scans, report=report, labels={"normal": True}, body_part="CHEST"
    )
