"""Build stage: decode the slices of one planned scan into an int16 volume with an exact affine.

Steps, in order (documented in docs/ingest.md, "Volumes and geometry"):

1. decode every file of the scan once (pydicom with the pylibjpeg / gdcm plugins: JPEG
   lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE, big endian, deflate), cut mosaics into tiles
   and pick the planned frames;
2. store intensities as int16 with the scale recorded (:func:`encode_intensity`): CT in
   Hounsfield units, other modalities losslessly whenever the stored values allow it;
3. build the voxel -> patient (LPS) affine from ImagePositionPatient,
   ImageOrientationPatient and PixelSpacing of the slices sorted along the normal; a
   gantry-tilted stack is first shifted onto the orthogonal grid of its image planes;
4. resample to the target spacing of the modality (trilinear, same field of view), unless
   the configuration keeps the native grid;
5. reorder and flip axes to the canonical orientation
   (:func:`hlip.ingest.geometry.canonical_transform`).
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom import uid
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder

from hlip.ingest import geometry
from hlip.ingest.index import declared_pixel_bytes, open_source
from hlip.ingest.mosaic import untile
from hlip.ingest.plan import ScanPlan
from hlip.shards.format import Scan

INT16_MIN, INT16_MAX = -32768, 32767
NATIVE = "native"
DEFAULT_TARGET_SPACING: dict[str, tuple[float | None, float | None, float | None]] = {"CT": (3.0, 1.0, 1.0)}
"""Per-modality (d, h, w) spacing in mm: CT as in the HLIP paper (3 x 1 x 1 mm). Other
modalities keep their native grid by default (MR slice thickness varies by design)."""


DECODE_BYTES_PER_VOXEL = 16
"""Peak memory of building a scan per decoded voxel, rounded up from bench/decode_memory.py:
a study's voxel budget is a worker's memory divided by this."""

MAX_COMPRESSION_RATIO = 100
"""Declared pixel bytes over bytes on disk above which a large file is a decompression bomb:
lossless codecs give 2-4x on CT and MR; 8192^2 Deflate-compressed zeros give about 1000x."""

LARGE_FILE_BYTES = 64 << 20
"""Files declaring fewer pixel bytes than this are never refused for their compression ratio
(a blank 512^2 slice compresses enormously and costs nothing to decode)."""


class ScanRejected(Exception):
    """A planned scan that cannot be built; ``reason`` is a code of ``plan.REASONS``."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


SpacingSpec = tuple[float | None, float | None, float | None] | str


@dataclass
class VolumeConfig:
    """Output grid per modality: a (d, h, w) spacing in mm (None keeps that axis) or "native"."""

    target_spacing: dict[str, SpacingSpec] = field(default_factory=lambda: dict(DEFAULT_TARGET_SPACING))
    default_spacing: SpacingSpec = NATIVE
    canonical_orientation: bool = True
    antialias: bool = True
    """Average (tent-weighted) instead of point-sampling along axes that are downsampled."""
    max_voxels: int = 1 << 30

    @classmethod
    def native(cls, **kwargs: Any) -> VolumeConfig:
        """Keep every scan on its source grid (no resampling): what the reference tests use."""
        return cls(target_spacing={}, default_spacing=NATIVE, **kwargs)

    def spacing_for(self, modality: str) -> tuple[float | None, float | None, float | None] | None:
        spec = self.target_spacing.get(modality, self.default_spacing)
        if spec == NATIVE or spec is None:
            return None
        return tuple(None if v is None else float(v) for v in spec)


# --------------------------------------------------------------------------- size bounds


def declared_study_voxels(scan_plans: Sequence[ScanPlan], rows: Mapping[str, Mapping[str, Any]]) -> int:
    """Pixels that decoding the files of ``scan_plans`` produces (each file once, all its
    frames: a decoder yields a whole file), from the index alone."""
    files = {file_id for scan_plan in scan_plans for file_id in scan_plan.files}
    return sum(
        (rows[f].get("Rows") or 0)
        * (rows[f].get("Columns") or 0)
        * max(1, rows[f].get("NumberOfFrames") or 1)
        for f in files
        if f in rows
    )


def default_study_voxels(memory_bytes: int) -> int:
    """The per-study voxel budget of a worker with ``memory_bytes``."""
    return memory_bytes // DECODE_BYTES_PER_VOXEL


def check_decoded_size(
    scan_plans: Sequence[ScanPlan], rows: Mapping[str, Mapping[str, Any]], max_study_voxels: int | None
) -> None:
    """Refuse, before any pixel is decoded, a study whose files declare more than the budget
    or a large file compressed beyond :data:`MAX_COMPRESSION_RATIO` (both ``too_large``):
    a few small hostile files must not take the worker's memory, and with it the run."""
    files = sorted({file_id for scan_plan in scan_plans for file_id in scan_plan.files})
    for file_id in files:
        row = rows.get(file_id) or {}
        declared, on_disk = declared_pixel_bytes(row), max(1, row.get("size") or 0)
        if declared > LARGE_FILE_BYTES and declared > MAX_COMPRESSION_RATIO * on_disk:
            raise ScanRejected(
                "too_large",
                f"{file_id}: declares {declared / 2**20:.0f} MiB of pixels in {on_disk / 2**10:.0f} KiB "
                f"(compression x{declared / on_disk:.0f} > x{MAX_COMPRESSION_RATIO}); not decoded",
            )
    voxels = declared_study_voxels(scan_plans, rows)
    if max_study_voxels is not None and voxels > max_study_voxels:
        raise ScanRejected(
            "too_large",
            f"the study's files declare {voxels} voxels > the per-study budget of {max_study_voxels} "
            f"(max_study_voxels; by default the worker memory / {DECODE_BYTES_PER_VOXEL} bytes); not decoded",
        )


# --------------------------------------------------------------------------- entry point


def build_scan(
    scan_plan: ScanPlan,
    index_rows: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    config: VolumeConfig | None = None,
) -> Scan:
    """Decode, scale, place and resample one planned scan. Raises only :class:`ScanRejected`.

    ``index_rows`` are the index rows of the scan's files (a sequence, or a mapping by
    ``file_id``).
    """
    config = config or VolumeConfig()
    rows = index_rows if isinstance(index_rows, Mapping) else {r["file_id"]: r for r in index_rows}
    target = config.spacing_for(scan_plan.modality)
    if scan_plan.uneven_spacing and target is None:
        if scan_plan.spacing_rule != "regimes":
            raise ScanRejected("uneven_spacing", "uneven slice positions and a native grid requested")
        target = (_smallest_step(scan_plan), None, None)  # native: equalize to the finest regime
    n_voxels = len(scan_plan.slices) * scan_plan.rows * scan_plan.columns
    if n_voxels > config.max_voxels:
        raise ScanRejected("too_large", f"{n_voxels} voxels > max_voxels={config.max_voxels}")
    stored, slopes, intercepts = read_slices(scan_plan, rows)
    encoded = encode_intensity(stored, slopes, intercepts, scan_plan.modality)
    array, affine, offsets = _place(encoded.array, scan_plan)
    perm, flips = (
        geometry.canonical_transform(affine) if config.canonical_orientation else ((0, 1, 2), (False,) * 3)
    )
    resampled = False
    if target is not None or offsets is not None:
        grid = (array.shape, affine)
        array, affine = _resample(array, affine, target, perm, offsets, config)
        resampled = array.shape != grid[0] or not np.array_equal(affine, grid[1])
    array, affine = geometry.reorient(array, affine, perm, flips)
    return Scan(
        name=scan_plan.name,
        array=array,
        spacing=geometry.affine_spacing(affine),
        affine=affine,
        modality=scan_plan.modality,
        series_number=scan_plan.series_number,
        series_description=scan_plan.series_description,
        intensity_unit=encoded.unit,
        intensity_slope=encoded.slope,
        intensity_intercept=encoded.intercept,
        source_file_count=len(scan_plan.files),
        extra=_extra(scan_plan, encoded, resampled=resampled),
    )


def _smallest_step(scan_plan: ScanPlan) -> float:
    positions = np.array([ref.position for ref in scan_plan.slices], dtype=np.float64)
    steps = geometry.stack_geometry(positions, scan_plan.image_orientation, scan_plan.pixel_spacing).steps
    return float(steps.min())


def _extra(scan_plan: ScanPlan, encoded: EncodedIntensity, *, resampled: bool) -> dict[str, Any]:
    """Technical provenance only (no UIDs or other identifiers)."""
    return {
        "kind": scan_plan.kind,
        "image_type": list(scan_plan.image_type),
        "complex_component": scan_plan.complex_component,
        "echo_number": scan_plan.echo_number,
        "volume_index": scan_plan.volume_index,
        "volume_count": scan_plan.volume_count,
        "tilt_corrected": scan_plan.tilted,
        "uneven_spacing": scan_plan.uneven_spacing,
        "spacing_rule": scan_plan.spacing_rule,
        "resampled": resampled,
        "lossless_intensity": encoded.lossless,
    }


# --------------------------------------------------------------------------- decoding


def read_slices(
    scan_plan: ScanPlan, rows: Mapping[str, Mapping[str, Any]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored pixel values ``[n, rows, cols]`` of the planned slices (in plan order) and the
    RescaleSlope / RescaleIntercept of each slice.

    A native single-frame file is read straight into its place in the stack; other files
    are decoded whole and their planned frames or tiles copied in."""
    n = len(scan_plan.slices)
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, ref in enumerate(scan_plan.slices):
        by_file[ref.file_id].append(i)
    stored: np.ndarray | None = None
    slopes, intercepts = np.ones(n), np.zeros(n)
    for file_id, positions in by_file.items():
        row = rows.get(file_id)
        if row is None:
            raise ScanRejected("decode_error", f"{file_id}: not in the index rows given")
        for i in positions:
            slopes[i], intercepts[i] = _rescale(row, scan_plan.slices[i].frame)
        if stored is not None and _reads_in_place(row, positions, stored):
            target = stored[positions[0] : positions[0] + 1]
            _decode(row, lambda fp, row=row, target=target: _read_native(fp, row, target))
            continue
        frames = decode_frames(row)
        for i in positions:
            ref = scan_plan.slices[i]
            image = _pick(frames, row, ref.frame, ref.tile)
            if image.shape != (scan_plan.rows, scan_plan.columns):
                raise ScanRejected(
                    "decode_error",
                    f"{file_id}: image {image.shape} in a {scan_plan.rows}x{scan_plan.columns} stack",
                )
            if stored is None:
                stored = np.empty((n, *image.shape), image.dtype)
            elif not np.can_cast(image.dtype, stored.dtype, "safe"):
                stored = stored.astype(np.result_type(stored, image))
            stored[i] = image
    return stored, slopes, intercepts


def _reads_in_place(row: Mapping[str, Any], positions: list[int], stored: np.ndarray) -> bool:
    """Whether the one slice of this file can be read straight into ``stored``."""
    return (
        len(positions) == 1
        and not row.get("IsMosaic")
        and (row.get("NumberOfFrames") or 1) == 1
        and _native_dtype(row) == stored.dtype
        and (row.get("Rows"), row.get("Columns")) == stored.shape[1:]
    )


def decode_frames(row: Mapping[str, Any]) -> np.ndarray:
    """All frames of the file of index row ``row`` as ``[frames, rows, cols]`` stored values
    (no rescale applied). Raises :class:`ScanRejected` when the pixels cannot be decoded."""
    pixels = _decode(row, lambda fp: _read_all(fp, row))
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or not np.issubdtype(pixels.dtype, np.number):
        raise ScanRejected("decode_error", f"{row['file_id']}: pixel array of shape {pixels.shape}")
    return pixels


def _decode(row: Mapping[str, Any], read: Any) -> Any:
    """``read(file)`` on the source file of ``row``, with decoder failures as
    :class:`ScanRejected`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_source(row["path"], row.get("member") or "") as fp:
                return read(fp)
    except MemoryError as exc:
        raise ScanRejected("too_large", f"{row['file_id']}: {exc}") from exc
    except Exception as exc:  # codecs and parsers raise many types for broken streams
        raise ScanRejected("decode_error", f"{row['file_id']}: {type(exc).__name__}: {exc}") from exc


def _read_all(fp: Any, row: Mapping[str, Any]) -> np.ndarray:
    dtype = _native_dtype(row)
    if dtype is None:
        return _read_pixels(fp, row.get("TransferSyntaxUID"))
    pixels = np.empty((max(1, row.get("NumberOfFrames") or 1), row["Rows"], row["Columns"]), dtype)
    _read_native(fp, row, pixels)
    return pixels


_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _native_dtype(row: Mapping[str, Any]) -> np.dtype | None:
    """The dtype of the native pixel data the index located (little endian, one sample,
    8/16/32 bits allocated), or None when the file takes pydicom's general path."""
    bits, stored = row.get("BitsAllocated"), row.get("BitsStored")
    if (
        row.get("PixelDataOffset") is None
        or bits not in (8, 16, 32)
        or not stored
        or stored > bits
        or row.get("PixelRepresentation") not in (0, 1)
        or (row.get("SamplesPerPixel") or 1) != 1
        or row.get("PhotometricInterpretation") not in _MONOCHROME
    ):
        return None
    return np.dtype(f"<{'i' if row['PixelRepresentation'] else 'u'}{bits // 8}")


def _read_native(fp: Any, row: Mapping[str, Any], out: np.ndarray) -> None:
    """Fill ``out`` (``[frames, rows, cols]`` of :func:`_native_dtype`) from the Pixel Data
    value at the offset the index recorded: what pydicom's pixel array gives, unused high
    bits masked or sign-extended included, without parsing the header again."""
    fp.seek(row["PixelDataOffset"])
    if fp.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise EOFError("the file ends inside its pixel data")
    unused = row["BitsAllocated"] - row["BitsStored"]
    if unused:  # as pydicom: the bits above BitsStored are not part of the value
        np.left_shift(out, unused, out=out)
        np.right_shift(out, unused, out=out)


_FASTEST_DECODERS = {
    uid.JPEGLSLossless: ("pyjpegls", "gdcm"),
    uid.JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    uid.RLELossless: ("pylibjpeg",),
    uid.JPEG2000Lossless: ("pylibjpeg",),
    uid.JPEG2000: ("pylibjpeg",),
}
"""Decoders by speed where pydicom's default order is slower (measured on 512x512 CT:
JPEG-LS CharLS 5.7 ms, GDCM 8.3 ms, libjpeg 19 ms; RLE pylibjpeg-rle 1.2 ms, numpy 2.3 ms;
JPEG 2000 openjpeg 28.6 ms, GDCM 31.5 ms). JPEG lossless keeps the default (GDCM 4.8 ms)."""


@functools.cache
def _decoding_plugin(transfer_syntax: str | None) -> str:
    """The fastest installed decoder of ``transfer_syntax``; "" for pydicom's own order."""
    preferred = _FASTEST_DECODERS.get(transfer_syntax, ())
    if not preferred:
        return ""
    available = get_decoder(uid.UID(transfer_syntax)).available_plugins
    return next((name for name in preferred if name in available), "")


def _read_pixels(fp: Any, transfer_syntax: str | None) -> np.ndarray:
    """Decode with pydicom's reader of just the Image Pixel module (fast), by the fastest
    installed decoder; files it cannot take (no file meta, odd encodings, a stream only
    another decoder reads) go through a full dataset read with every decoder."""
    try:
        return np.asarray(pixel_array(fp, decoding_plugin=_decoding_plugin(transfer_syntax)))
    except Exception:
        fp.seek(0)
    ds = pydicom.dcmread(fp, force=True)
    if "TransferSyntaxUID" not in ds.file_meta and transfer_syntax:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    return np.asarray(ds.pixel_array)


def _pick(frames: np.ndarray, row: Mapping[str, Any], frame: int, tile: int) -> np.ndarray:
    if frame >= len(frames):
        raise ScanRejected("decode_error", f"{row['file_id']}: frame {frame} of {len(frames)}")
    image = frames[frame]
    if row.get("IsMosaic"):
        image = untile(image, int(row["NumberOfImagesInMosaic"]))[tile]
    return image


def _rescale(row: Mapping[str, Any], frame: int) -> tuple[float, float]:
    """Modality LUT of one frame: per-frame Pixel Value Transformation, else top level."""
    slope = _frame_item(row.get("FrameRescaleSlope"), frame)
    intercept = _frame_item(row.get("FrameRescaleIntercept"), frame)
    slope = slope if slope is not None else row.get("RescaleSlope")
    intercept = intercept if intercept is not None else row.get("RescaleIntercept")
    return (float(slope) if slope not in (None, 0) else 1.0), float(intercept or 0.0)


def _frame_item(values: Sequence[Any] | None, frame: int) -> Any:
    return values[frame] if values is not None and frame < len(values) else None


# --------------------------------------------------------------------------- intensities


@dataclass
class EncodedIntensity:
    """int16 voxels with ``physical = array * slope + intercept`` in ``unit``."""

    array: np.ndarray
    slope: float
    intercept: float
    unit: str
    lossless: bool


def encode_intensity(
    stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray, modality: str
) -> EncodedIntensity:
    """Choose the int16 representation of a stack of stored values.

    CT: Hounsfield units themselves (slope 1, intercept 0), rounded and clipped to int16.
    Other modalities, in order of preference: the stored values with the common
    RescaleSlope/Intercept (shifted by a constant when they exceed int16 but span at most
    65536 values); the physical values when they are integers within int16 (per-slice
    rescale); else a linear quantisation of the physical range onto int16 (lossy).
    """
    slopes = np.asarray(slopes, dtype=np.float64)[:, None, None]
    intercepts = np.asarray(intercepts, dtype=np.float64)[:, None, None]
    if modality == "CT":
        return _encode_hounsfield(stored, slopes, intercepts)
    uniform = bool(np.all(slopes == slopes.flat[0]) and np.all(intercepts == intercepts.flat[0]))
    if uniform and np.issubdtype(stored.dtype, np.integer):
        shifted = _shift_into_int16(stored)
        if shifted is not None:
            array, offset = shifted
            slope, intercept = float(slopes.flat[0]), float(intercepts.flat[0])
            return EncodedIntensity(array, slope, intercept + offset * slope, "", True)
    physical = stored * slopes + intercepts
    if np.array_equal(np.rint(physical), physical) and _fits_int16(physical):
        return EncodedIntensity(physical.astype(np.int16), 1.0, 0.0, "", True)
    return _quantise(physical)


def _encode_hounsfield(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> EncodedIntensity:
    """HU = stored * RescaleSlope + RescaleIntercept, rounded and clipped to int16.

    Integer slopes and intercepts (the usual 1 and -1024) take an exact integer path."""
    integral = np.all(slopes == np.rint(slopes)) and np.all(intercepts == np.rint(intercepts))
    if integral and np.issubdtype(stored.dtype, np.integer) and stored.dtype.itemsize <= 2:
        exact = _int16_hounsfield(stored, slopes.astype(np.int64), intercepts.astype(np.int64))
        if exact is not None:
            return EncodedIntensity(exact, 1.0, 0.0, "HU", True)
        hounsfield = stored.astype(np.int32) * slopes.astype(np.int32) + intercepts.astype(np.int32)
        lossless = _fits_int16(hounsfield)
        return EncodedIntensity(
            np.clip(hounsfield, INT16_MIN, INT16_MAX).astype(np.int16), 1.0, 0.0, "HU", lossless
        )
    physical = stored * slopes + intercepts
    lossless = bool(np.array_equal(np.rint(physical), physical) and _fits_int16(physical))
    return EncodedIntensity(_to_int16(physical), 1.0, 0.0, "HU", lossless)


def _int16_hounsfield(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray | None:
    """``stored * slope + intercept`` computed in int16 when every result fits int16, else None.

    The extremes of each slice bound its results, so the check needs no wide copy; when
    they fit, int16 arithmetic (which wraps modulo 2**16, like the cast of uint16 values
    above 32767) gives the exact results in one array."""
    low = stored.min(axis=(1, 2), keepdims=True).astype(np.int64)
    high = stored.max(axis=(1, 2), keepdims=True).astype(np.int64)
    ends = np.concatenate([low * slopes + intercepts, high * slopes + intercepts])
    if stored.size == 0 or not _fits_int16(ends):
        return None
    out = stored.astype(np.int16)
    if np.any(slopes != 1):
        np.multiply(out, slopes.astype(np.int16), out=out)
    if np.any(intercepts != 0):
        np.add(out, intercepts.astype(np.int16), out=out)
    return out


def _fits_int16(values: np.ndarray) -> bool:
    return values.size == 0 or (float(values.min()) >= INT16_MIN and float(values.max()) <= INT16_MAX)


def _to_int16(values: np.ndarray) -> np.ndarray:
    """Round and clip float values to int16 (in place on ``values``, which must be a temporary)."""
    np.rint(values, out=values)
    np.clip(values, INT16_MIN, INT16_MAX, out=values)
    return values.astype(np.int16)


def _shift_into_int16(stored: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(stored - offset, offset)`` fitting int16 exactly, or None if the range is too wide."""
    low, high = int(stored.min()), int(stored.max())
    if low >= INT16_MIN and high <= INT16_MAX:
        return stored.astype(np.int16), 0
    if high - low > INT16_MAX - INT16_MIN:
        return None
    offset = low - INT16_MIN
    return (stored.astype(np.int64) - offset).astype(np.int16), offset


def _quantise(physical: np.ndarray) -> EncodedIntensity:
    low, high = float(physical.min()), float(physical.max())
    slope = (high - low) / (INT16_MAX - INT16_MIN) if high > low else 1.0
    intercept = low - INT16_MIN * slope
    return EncodedIntensity(_to_int16((physical - intercept) / slope), slope, intercept, "", False)


# --------------------------------------------------------------------------- geometry


def _place(array: np.ndarray, scan_plan: ScanPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Affine of the planned stack (shear removed if tilted) and, for uneven spacing, the
    slice offsets along the normal (mm) that resampling must honour."""
    positions = np.array([ref.position for ref in scan_plan.slices], dtype=np.float64)
    iop, spacing = scan_plan.image_orientation, scan_plan.pixel_spacing
    if scan_plan.tilted:
        fill = float(array.min()) if array.size else 0.0
        sheared, affine = geometry.remove_shear(array, positions, iop, spacing, fill)
        array = _to_int16(sheared)
    else:
        affine = geometry.stack_affine(iop, spacing, positions[0], _slice_step(positions, scan_plan))
    offsets = None
    if scan_plan.uneven_spacing:
        offsets = geometry.stack_geometry(positions, iop, spacing).offsets
    return array, affine, offsets


def _slice_step(positions: np.ndarray, scan_plan: ScanPlan) -> np.ndarray:
    """Mean step between slices; a single slice gets the plan's step along the normal."""
    if len(positions) > 1:
        return (positions[-1] - positions[0]) / (len(positions) - 1)
    return geometry.slice_normal(scan_plan.image_orientation) * (scan_plan.slice_step or 1.0)


def _resample(
    array: np.ndarray,
    affine: np.ndarray,
    target: tuple[float | None, ...] | None,
    perm: Sequence[int],
    offsets: np.ndarray | None,
    config: VolumeConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to ``target`` given in canonical (d, h, w) order, i.e. after ``perm``."""
    current_target: list[float | None] = [None, None, None]
    if target is not None:
        for canonical_axis, source_axis in enumerate(perm):
            current_target[source_axis] = target[canonical_axis]
    out_shape = _resampled_shape(array.shape, geometry.affine_spacing(affine), current_target)
    if int(np.prod(out_shape)) > config.max_voxels:
        raise ScanRejected("too_large", f"resampled shape {out_shape} > max_voxels={config.max_voxels}")
    resampled, new_affine = geometry.resample(
        array, affine, current_target, offsets, antialias=config.antialias
    )
    return _to_int16(resampled), new_affine


def _resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None]
) -> tuple[int, ...]:
    return tuple(
        n if t is None else max(1, int(round(n * s / t)))
        for n, s, t in zip(shape, spacing, target, strict=True)
    )
