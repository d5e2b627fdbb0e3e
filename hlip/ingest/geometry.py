"""Voxel geometry: DICOM patient coordinates, exact affines, reorientation and resampling.

Conventions (shared with :mod:`hlip.shards.format`): a volume is an array indexed
``[d, h, w]`` (slice, row, column) and its affine maps ``(d, h, w, 1)`` to DICOM patient
coordinates in mm, LPS (x to the patient's left, y posterior, z superior).

DICOM names used as the standard names them: ``ImageOrientationPatient`` (IOP) holds the
row direction (the way the column index grows) then the column direction (the way the
row index grows); ``PixelSpacing`` is (distance between rows, distance between columns);
``ImagePositionPatient`` (IPP) is the centre of the first transmitted pixel of a slice.
So pixel ``(r, c)`` of a slice lies at ``IPP + r * PixelSpacing[0] * col_dir +
c * PixelSpacing[1] * row_dir``.

Every operation here that moves voxels (flips, transposes, shear removal, resampling)
returns the affine of its output grid computed from the same index mapping it used, so
the affine stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between two IOP components that still counts as one orientation."""


# --------------------------------------------------------------------------- directions


def split_orientation(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit row and column direction vectors of an ImageOrientationPatient."""
    values = np.asarray(iop, dtype=np.float64)
    row, col = values[:3], values[3:6]
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal ``row x col`` of the image plane."""
    row, col = split_orientation(iop)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def is_valid_orientation(iop: Sequence[float] | None, tolerance: float = 1e-2) -> bool:
    """Six finite numbers forming two (nearly) unit, (nearly) orthogonal vectors."""
    if iop is None or len(iop) != 6 or not np.all(np.isfinite(iop)):
        return False
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return (
        abs(np.linalg.norm(row) - 1) < tolerance
        and abs(np.linalg.norm(col) - 1) < tolerance
        and abs(float(row @ col)) < tolerance
    )


def is_valid_spacing(spacing: Sequence[float] | None) -> bool:
    return spacing is not None and len(spacing) == 2 and all(np.isfinite(spacing)) and min(spacing) > 0


# --------------------------------------------------------------------------- affines


def stack_affine(
    iop: Sequence[float], pixel_spacing: Sequence[float], origin: Sequence[float], slice_step: Sequence[float]
) -> np.ndarray:
    """Affine of a slice stack: ``(d, h, w, 1) -> LPS`` with slice ``d`` at ``origin + d * slice_step``."""
    row, col = split_orientation(iop)
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(slice_step, dtype=np.float64)
    affine[:3, 1] = col * float(pixel_spacing[0])
    affine[:3, 2] = row * float(pixel_spacing[1])
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing ``(d, h, w)`` in mm: the norms of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """The same affine in RAS+ world coordinates (NIfTI): x and y change sign."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


# --------------------------------------------------------------------------- mosaics


def mosaic_slice_positions(
    ipp: Sequence[float],
    iop: Sequence[float],
    pixel_spacing: Sequence[float],
    mosaic_shape: tuple[int, int],
    grid: int,
    n_images: int,
    normal: Sequence[float],
    slice_spacing: float,
) -> np.ndarray:
    """ImagePositionPatient of each tile of a Siemens mosaic, ``[n_images, 3]``.

    The mosaic's IPP is that of a virtual image as large as the whole mosaic centred on
    the first slice, so the first tile is shifted by half the size difference along the
    row and column directions (the correction dcm2niix applies); the tiles then advance
    by ``slice_spacing`` along the slice normal the CSA header gives.
    """
    row, col = split_orientation(iop)
    rows, cols = mosaic_shape
    shift_rows = (rows - rows / grid) / 2.0
    shift_cols = (cols - cols / grid) / 2.0
    first = (
        np.asarray(ipp, dtype=np.float64)
        + shift_rows * float(pixel_spacing[0]) * col
        + shift_cols * float(pixel_spacing[1]) * row
    )
    step = np.asarray(normal, dtype=np.float64) * float(slice_spacing)
    return first + np.arange(n_images)[:, None] * step


# --------------------------------------------------------------------------- slice analysis


MIN_REGIME_STEPS = 2
"""Steps (three slices) a run of constant spacing needs to count as a spacing regime rather
than an isolated gap."""
MAX_REGIMES = 3
"""More runs than this are uneven spacing, not a few protocol regions."""


@dataclass(frozen=True)
class StackGeometry:
    """How the slices of one stack sit along the slice normal.

    ``offsets`` are the slice positions along the normal relative to the first slice (mm,
    increasing); ``inplane_drift`` is the in-plane displacement of each slice relative to
    the first, in pixels (rows, columns): zero for an orthogonal stack, growing linearly
    with the slice index for a gantry tilt.
    """

    offsets: np.ndarray
    inplane_drift: np.ndarray

    @property
    def steps(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def median_step(self) -> float:
        return float(np.median(self.steps)) if len(self.offsets) > 1 else 0.0

    def has_gap(self, gap_factor: float) -> bool:
        """A step larger than ``gap_factor`` times the median step: a missing slice."""
        return len(self.offsets) > 2 and bool(np.max(self.steps) > gap_factor * self.median_step)

    def is_uneven(self, tolerance: float) -> bool:
        """Slices off an even grid by more than ``tolerance`` x the mean step."""
        n = len(self.offsets)
        if n < 3:
            return False
        even = np.linspace(self.offsets[0], self.offsets[-1], n)
        mean_step = (self.offsets[-1] - self.offsets[0]) / (n - 1)
        return bool(np.max(np.abs(self.offsets - even)) > tolerance * mean_step)

    def step_runs(self, tolerance: float) -> list[tuple[int, int]]:
        """Maximal runs ``[start, stop)`` of consecutive steps equal within ``tolerance`` x
        the smaller of two neighbours."""
        runs, start = [], 0
        steps = self.steps
        for i in range(1, len(steps)):
            if abs(steps[i] - steps[i - 1]) > tolerance * min(steps[i], steps[i - 1]):
                runs.append((start, i))
                start = i
        return [*runs, (start, len(steps))] if len(steps) else []

    def spacing_rule(self, gap_factor: float, tolerance: float) -> str:
        """How the slices are spaced, which decides what the build does with them:

        * ``"regimes"``: two or three runs of constant step, each of at least
          :data:`MIN_REGIME_STEPS` steps (a GE sequential head CT: 4 mm through the
          posterior fossa, then 7 mm): a change of protocol, no slice missing;
        * ``"gap"``: a step larger than ``gap_factor`` x the median that is not a regime of
          its own (an isolated step of about k x its neighbours): missing files;
        * ``"uneven"``: off an even grid by more than ``tolerance`` x the mean step otherwise;
        * ``"even"``.
        """
        runs = self.step_runs(tolerance)
        if 1 < len(runs) <= MAX_REGIMES and all(stop - start >= MIN_REGIME_STEPS for start, stop in runs):
            return "regimes"
        if self.has_gap(gap_factor):
            return "gap"
        return "uneven" if self.is_uneven(tolerance) else "even"

    def is_tilted(self, tolerance_px: float) -> bool:
        """Slices shifted in-plane (gantry tilt) by more than ``tolerance_px`` pixels overall."""
        return bool(np.max(np.abs(self.inplane_drift), initial=0.0) > tolerance_px)


def stack_geometry(
    positions: np.ndarray, iop: Sequence[float], pixel_spacing: Sequence[float]
) -> StackGeometry:
    """Decompose slice positions (sorted along the normal) into normal and in-plane parts."""
    row, col = split_orientation(iop)
    normal = slice_normal(iop)
    delta = np.asarray(positions, dtype=np.float64) - positions[0]
    drift = np.stack([delta @ col / float(pixel_spacing[0]), delta @ row / float(pixel_spacing[1])], axis=1)
    return StackGeometry(offsets=delta @ normal, inplane_drift=drift)


# --------------------------------------------------------------------------- gantry tilt


def remove_shear(
    volume: np.ndarray,
    positions: np.ndarray,
    iop: Sequence[float],
    pixel_spacing: Sequence[float],
    fill: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a gantry-tilted stack onto the orthogonal grid of its image planes.

    A tilted acquisition moves each slice along the table axis, which is not the slice
    normal, so consecutive slices are also shifted within their plane. Each slice is
    shifted back in-plane (bilinear interpolation within the slice, as dcm2niix does) onto
    one grid whose third axis is the slice normal; the grid grows by the largest shift so
    that no voxel is lost, and new voxels are ``fill``. Returns the float32 volume and the
    exact affine of its grid.
    """
    geometry = stack_geometry(positions, iop, pixel_spacing)
    drift = geometry.inplane_drift
    low = np.floor(drift.min(axis=0) + 1e-6)
    extent = np.ceil(drift.max(axis=0) - low - 1e-6).astype(int)
    n, rows, cols = volume.shape
    out = np.full((n, rows + extent[0], cols + extent[1]), fill, dtype=np.float32)
    for k in range(n):
        # Output pixel (r, c) sits at input pixel (r + low - drift_k) of slice k.
        shift = low - drift[k]
        out[k] = _shift_plane(volume[k].astype(np.float32), shift, out.shape[1:], fill)
    row, col = split_orientation(iop)
    origin = positions[0] + low[0] * float(pixel_spacing[0]) * col + low[1] * float(pixel_spacing[1]) * row
    step = slice_normal(iop) * _mean_step(geometry.offsets)
    return out, stack_affine(iop, pixel_spacing, origin, step)


def _mean_step(offsets: np.ndarray) -> float:
    return float((offsets[-1] - offsets[0]) / (len(offsets) - 1)) if len(offsets) > 1 else 1.0


def _shift_plane(plane: np.ndarray, shift: np.ndarray, shape: tuple[int, int], fill: float) -> np.ndarray:
    """``out[r, c] = plane[r + shift[0], c + shift[1]]`` with bilinear weights, ``fill`` outside."""
    rows = _linear_weights(np.arange(shape[0]) + shift[0], plane.shape[0])
    cols = _linear_weights(np.arange(shape[1]) + shift[1], plane.shape[1])
    out = _apply_weights(_apply_weights(plane, rows, axis=0), cols, axis=1)
    inside = rows.inside[:, None] & cols.inside[None, :]
    return np.where(inside, out, np.float32(fill))


# --------------------------------------------------------------------------- interpolation


@dataclass(frozen=True)
class _Weights:
    """Linear interpolation of samples at fractional indices: ``lo``, ``hi``, weight of ``hi``."""

    lo: np.ndarray
    hi: np.ndarray
    frac: np.ndarray
    inside: np.ndarray


def _linear_weights(coords: np.ndarray, size: int, tolerance: float = 1e-6) -> _Weights:
    inside = (coords >= -tolerance) & (coords <= size - 1 + tolerance)
    clipped = np.clip(coords, 0, size - 1)
    lo = np.floor(clipped).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    frac = (clipped - lo).astype(np.float32)
    return _Weights(lo, hi, frac, inside)


def _apply_weights(array: np.ndarray, weights: _Weights, axis: int) -> np.ndarray:
    lo = np.take(array, weights.lo, axis=axis)
    hi = np.take(array, weights.hi, axis=axis)
    shape = [1] * array.ndim
    shape[axis] = -1
    frac = weights.frac.reshape(shape)
    return lo + (hi - lo) * frac


# --------------------------------------------------------------------------- reorientation


def canonical_transform(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Axis order and flips that bring a volume to the canonical orientation.

    The slice axis ``d`` stays the slice axis (through-plane resolution is usually the
    coarse one and the slices stay the acquired images). The in-plane axes are ordered
    and flipped as a head-first supine acquisition shows them: axial ``w`` to the
    patient's left and ``h`` posterior; coronal ``w`` left and ``h`` inferior; sagittal
    ``w`` posterior and ``h`` inferior. ``d`` then runs along ``w x h`` (a right-handed
    grid): superior for axial, posterior for coronal, right for sagittal slices. The
    plane type is the patient axis closest to the slice axis.
    Returns ``(perm, flips)`` for :func:`reorient`.
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    plane = int(np.argmax(np.abs(directions[:, 0])))
    target_w, target_h = _INPLANE_TARGETS[plane]
    u_h, u_w = directions[:, 1], directions[:, 2]
    keep = abs(u_w @ target_w) + abs(u_h @ target_h)
    swap = abs(u_h @ target_w) + abs(u_w @ target_h)
    perm = (0, 1, 2) if keep >= swap else (0, 2, 1)
    new_h, new_w = directions[:, perm[1]], directions[:, perm[2]]
    flip_h = bool(new_h @ target_h < 0)
    flip_w = bool(new_w @ target_w < 0)
    final_h = -new_h if flip_h else new_h
    final_w = -new_w if flip_w else new_w
    flip_d = bool(directions[:, 0] @ np.cross(final_w, final_h) < 0)
    return perm, (flip_d, flip_h, flip_w)


_X, _Y, _Z = np.eye(3)
_INPLANE_TARGETS = {
    0: (_Y, -_Z),  # sagittal slices (normal ~ x): w posterior, h inferior
    1: (_X, -_Z),  # coronal slices (normal ~ y): w left, h inferior
    2: (_X, _Y),  # axial slices (normal ~ z): w left, h posterior
}


def reorient(
    array: np.ndarray, affine: np.ndarray, perm: Sequence[int], flips: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Transpose then flip ``array``: new axis ``k`` is old axis ``perm[k]``, reversed if
    ``flips[k]``. The affine is updated for exactly that index mapping."""
    out = np.transpose(array, perm)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, list(perm)]
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
            new_affine[:3, 3] += (out.shape[axis] - 1) * new_affine[:3, axis]
            new_affine[:3, axis] *= -1
    return np.ascontiguousarray(out), new_affine


# --------------------------------------------------------------------------- resampling


_SparseWeights = scipy.sparse.csr_matrix
"""``[outputs, inputs]`` float32 weights of one axis."""


def resample(
    array: np.ndarray,
    affine: np.ndarray,
    target_spacing: Sequence[float | None],
    slice_offsets: np.ndarray | None = None,
    antialias: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resampling to ``target_spacing`` (d, h, w) mm; None keeps an axis as is.

    The new grid covers the same field of view, centred on it: ``n' = round(n * s / s')``
    samples per axis. Along an axis that is upsampled (or with ``antialias=False``) each
    output voxel interpolates its two neighbours linearly. Along an axis that is
    downsampled, plain linear interpolation would skip most input voxels (0.6 mm slices
    to 3 mm use 2 of every 5), so with ``antialias`` each output voxel is the average of
    the inputs within one output step, weighted by a tent of that half-width: linear
    interpolation widened to the output spacing, as image libraries antialias. ``slice_offsets``
    (mm along the slice axis, for uneven slice spacing) place the input slices where they
    really are; the ``d`` column of ``affine`` then only gives the direction. An axis whose
    spacing already matches is left untouched, so native grids stay bit-exact. Returns
    float32 data and the exact affine of the new grid.

    Each axis is one sparse weight matrix (a few non-zeros per output sample) applied where
    its axis leads the memory layout: the in-plane axes slice by slice (a slice stays in
    cache), the slice axis on the whole volume, first when it shrinks the volume more than
    the in-plane axes do, else last.
    """
    new_affine = affine.copy()
    spacing = affine_spacing(affine)
    weights: list[_SparseWeights | None] = [None, None, None]
    for axis in range(3):
        positions = _axis_positions(array.shape[axis], spacing[axis], slice_offsets if axis == 0 else None)
        target = target_spacing[axis]
        even = _is_even(positions)
        if target is None and not even:
            target = float((positions[-1] - positions[0]) / (len(positions) - 1))
        elif target is None or (even and np.isclose(spacing[axis], target, rtol=1e-6, atol=0)):
            continue
        new_positions = _new_positions(positions, float(target))
        weights[axis] = _axis_weights(positions, new_positions, float(target), antialias)
        direction = affine[:3, axis] / np.linalg.norm(affine[:3, axis])
        new_affine[:3, 3] += direction * new_positions[0]
        new_affine[:3, axis] = direction * float(target)
    # The products take the stored integers as they are (converting one slice at a time).
    out, slices = array, weights[0]
    if slices is not None and _shrinks(slices) < _shrinks(weights[1]) * _shrinks(weights[2]):
        out, slices = _apply_leading(slices, out), None
    out, swapped = _apply_in_plane(out, weights[1], weights[2])
    if slices is not None:
        out = _apply_leading(slices, out)
    # In-plane results are stored as [d, w, h]; the view puts them back in [d, h, w] order
    # (the reorientation that follows makes the array contiguous in its final order).
    out = out.transpose(0, 2, 1) if swapped else out
    return out.astype(np.float32, copy=False), new_affine


def _axis_weights(source: np.ndarray, target: np.ndarray, support: float, antialias: bool) -> _SparseWeights:
    """Weights of the inputs at ``source`` (mm) in each output at ``target``.

    Downsampling with ``antialias``: a tent, input ``i`` weighs
    ``max(0, 1 - |source_i - target_j| / support)`` in output ``j`` (normalised to sum 1),
    over the inputs strictly within ``support``. Otherwise linear interpolation between
    the two nearest inputs, clamped to the first and last."""
    n_in, n_out = len(source), len(target)
    if antialias and n_in > 1 and support > np.max(np.diff(source)) * (1 + 1e-6):
        first = np.searchsorted(source, target - support, side="right")
        last = np.searchsorted(source, target + support, side="left")
        band = max(1, int(np.max(last - first)))
        index = first[:, None] + np.arange(band)[None, :]
        valid = index < n_in
        index = np.minimum(index, n_in - 1)
        values = np.where(valid, 1.0 - np.abs(source[index] - target[:, None]) / support, 0.0)
        np.clip(values, 0.0, None, out=values)
        values /= values.sum(axis=1, keepdims=True)
    else:
        linear = _linear_weights(np.interp(target, source, np.arange(n_in)), n_in)
        index = np.stack([linear.lo, linear.hi], axis=1)
        values = np.stack([1.0 - linear.frac, linear.frac], axis=1)
    rows = np.repeat(np.arange(n_out), index.shape[1])
    # Duplicate (row, column) pairs (a clamped edge) are summed.
    return scipy.sparse.csr_matrix(
        (values.astype(np.float32).ravel(), (rows, index.ravel())), shape=(n_out, n_in)
    )


def _shrinks(weights: _SparseWeights | None) -> float:
    """Outputs per input of an axis (1 for a kept axis)."""
    return 1.0 if weights is None else weights.shape[0] / weights.shape[1]


def _apply_leading(weights: _SparseWeights, array: np.ndarray) -> np.ndarray:
    """Resample along axis 0: one sparse product over the volume seen as ``[d, h * w]``."""
    flat = weights @ array.reshape(array.shape[0], -1)
    return np.asarray(flat, dtype=np.float32).reshape((weights.shape[0], *array.shape[1:]))


def _apply_in_plane(
    array: np.ndarray, rows: _SparseWeights | None, cols: _SparseWeights | None
) -> tuple[np.ndarray, bool]:
    """Resample axes 1 and 2 (either may be None: kept) one slice at a time.

    Returns the result and whether it is stored ``[d, w, h]``: resampling the columns
    needs each slice transposed, and its result is kept that way rather than transposed
    back, a copy the final reorientation makes anyway."""
    if cols is None:
        if rows is None:
            return array, False
        out = np.empty((array.shape[0], rows.shape[0], array.shape[2]), dtype=np.float32)
        for k, plane in enumerate(array):
            out[k] = rows @ plane
        return out, False
    height = array.shape[1] if rows is None else rows.shape[0]
    out = np.empty((array.shape[0], cols.shape[0], height), dtype=np.float32)
    for k, plane in enumerate(array):
        if rows is not None:
            plane = rows @ plane
        out[k] = cols @ np.ascontiguousarray(plane.T)
    return out, True


def _axis_positions(n: int, spacing: float, offsets: np.ndarray | None) -> np.ndarray:
    """Sample positions along an axis in mm, relative to index 0."""
    if offsets is not None:
        return np.asarray(offsets, dtype=np.float64) - offsets[0]
    return np.arange(n) * spacing


def _is_even(positions: np.ndarray) -> bool:
    if len(positions) < 3:
        return True
    steps = np.diff(positions)
    return bool(np.allclose(steps, steps.mean(), rtol=1e-6, atol=1e-9))


def _new_positions(positions: np.ndarray, target: float) -> np.ndarray:
    """Evenly spaced samples at ``target`` mm covering the field of view of ``positions``."""
    n = len(positions)
    extent = (positions[-1] - positions[0]) * n / (n - 1) if n > 1 else target
    count = max(1, int(round(extent / target)))
    centre = (positions[0] + positions[-1]) / 2.0
    return centre + (np.arange(count) - (count - 1) / 2.0) * target
