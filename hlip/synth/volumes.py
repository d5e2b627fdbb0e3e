"""Analytic phantoms and the image grids that sample them.

A phantom is a list of tissue ellipsoids in patient coordinates (LPS, mm), painted in order;
a grid is a stack of DICOM images placed in that space. Sampling a phantom on any grid, whatever
its orientation or tilt, gives images of the same anatomy, so every series of a study agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

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
class Ellipsoid:
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
class Phantom:
    """Tissue shapes painted in order (later wins) over air."""

    shapes: list[Ellipsoid] = field(default_factory=list)

    def add(self, center, semi, tissue: int, posterior_of: float | None = None) -> None:
        self.shapes.append(Ellipsoid(tuple(center), tuple(semi), tissue, posterior_of))

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


@dataclass(frozen=True)
class Grid:
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


def stack(
    center, row_dir, col_dir, shape, pixel: float, n: int, step: float, thickness: float, step_dir=None
) -> Grid:
    """``n`` images of ``shape`` (rows, cols) centred on ``center``, ``step`` mm apart along
    ``step_dir`` (default: the slice normal; a tilted CT steps along the table instead)."""
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    step_dir = np.cross(row_dir, col_dir) if step_dir is None else np.asarray(step_dir, float)
    rows, cols = shape
    corner = np.asarray(center, float) - (cols - 1) / 2 * pixel * row_dir - (rows - 1) / 2 * pixel * col_dir
    positions = np.array([corner + (k - (n - 1) / 2) * step * step_dir for k in range(n)])
    return Grid(np.round(positions, 4), row_dir, col_dir, rows, cols, (pixel, pixel), thickness)


AXIAL, CORONAL, SAGITTAL = ((1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, 0, -1)), ((0, 1, 0), (0, 0, -1))


def tilted(degrees: float):
    t = np.deg2rad(degrees)
    return (1, 0, 0), (0, np.cos(t), -np.sin(t))


def sample(phantom: Phantom, grid: Grid, table: np.ndarray, max_points: int = 1 << 21) -> np.ndarray:
    """``table[tissue]`` at every pixel centre of ``grid``: (n, rows, cols), in slabs of slices."""
    n = len(grid.positions)
    out = np.empty((n, grid.rows, grid.cols), np.float32)
    step = max(1, max_points // (grid.rows * grid.cols))
    for k in range(0, n, step):
        out[k : k + step] = table[phantom.labels(grid.coordinates(k, min(n, k + step)))]
    return out
