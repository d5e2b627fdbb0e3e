"""Siemens mosaics: the CSA image header and the tile layout of one mosaic image.

A Siemens mosaic stores all slices of one volume as tiles of one large 2-D image. How many
tiles are real slices (``NumberOfImagesInMosaic``) and which way the slices run
(``SliceNormalVector``) are only in the private CSA image header, element (0029,1010),
a small binary format ("SV10") that pydicom does not parse; (0019,100A) repeats the tile
count. Tiles are laid out row by row on a square grid of ``ceil(sqrt(n))`` tiles.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from hlip.ingest import geometry

CSA_IMAGE_HEADER_TAG = (0x0029, 0x1010)
CSA_SERIES_HEADER_TAG = (0x0029, 0x1020)
NUMBER_OF_IMAGES_IN_MOSAIC_TAG = (0x0019, 0x100A)


def parse_csa_header(raw: bytes) -> dict[str, list[str]]:
    """Decode a Siemens CSA header (SV10 or the older CSA1 layout) to ``name -> values``.

    Values stay text (CSA stores numbers as text); empty items are dropped. Malformed
    input yields the entries decoded before the damage.
    """
    out: dict[str, list[str]] = {}
    if not raw or len(raw) < 16:
        return out
    offset = 8 if raw[:4] == b"SV10" else 0
    try:
        (n_tags,) = struct.unpack_from("<I", raw, offset)
        offset += 8
        for _ in range(min(n_tags, 1024)):
            name = raw[offset : offset + 64].split(b"\0")[0].decode("latin-1")
            offset += 64 + 4 + 4  # name, vm, vr
            _, n_items, _ = struct.unpack_from("<iii", raw, offset)
            offset += 12
            values = []
            for _ in range(max(0, min(n_items, 4096))):
                item_length = struct.unpack_from("<4i", raw, offset)[1]
                offset += 16
                text = raw[offset : offset + item_length].split(b"\0")[0].decode("latin-1").strip()
                offset += (item_length + 3) // 4 * 4
                if text:
                    values.append(text)
            out[name] = values
    except (struct.error, ValueError):
        pass
    return out


@dataclass(frozen=True)
class MosaicInfo:
    """What the Siemens private headers say about the slices of a mosaic (None: unknown)."""

    n_images: int | None = None
    slice_normal: list[float] | None = None
    slice_spacing: float | None = None


def csa_mosaic_info(ds: Dataset) -> MosaicInfo:
    """Tile count, slice direction and slice spacing of a mosaic from the Siemens headers.

    The CSA image header (0029,1010) is preferred; anonymised files often keep only the
    series header (0029,1020), whose ASCCONV protocol lists every slice (``sSliceArray``).
    When the protocol gives the first and last slice centres, the direction is the way the
    tiles advance: from the end of the slice array nearest to tile 0 towards the other
    (the protocol's ``sNormal`` alone does not say whether the image numbering is reversed).
    """
    csa = parse_csa_header(_raw_bytes(ds.get(CSA_IMAGE_HEADER_TAG)))
    protocol = _ascconv(parse_csa_header(_raw_bytes(ds.get(CSA_SERIES_HEADER_TAG))))
    n_images = _first_int(csa.get("NumberOfImagesInMosaic"))
    if n_images is None:
        n_images = _private_us(ds.get(NUMBER_OF_IMAGES_IN_MOSAIC_TAG))
    if n_images is None:
        n_images = _first_int([protocol["sSliceArray.lSize"]] if "sSliceArray.lSize" in protocol else None)
    normal = _unit_vector(csa.get("SliceNormalVector")) or _unit_vector(
        [protocol.get(f"sSliceArray.asSlice[0].sNormal.{axis}", "0") for axis in _PCS_AXES]
    )
    centres = _slice_centres(protocol, n_images)
    if centres is None:
        return MosaicInfo(n_images, normal, None)
    first, last = centres
    spacing = float(np.linalg.norm(last - first)) / (n_images - 1)
    if normal is not None:
        normal = _along_tiles(ds, np.asarray(normal), first, last, n_images)
    return MosaicInfo(n_images, normal, spacing if spacing > 0 else None)


_PCS_AXES = ("dSag", "dCor", "dTra")
"""Siemens patient coordinate axes; they coincide with DICOM's LPS x, y, z."""


def _ascconv(csa_series: dict[str, list[str]]) -> dict[str, str]:
    """``key -> value`` of the ASCCONV block of the Siemens protocol in the CSA series header."""
    text = next(iter(csa_series.get("MrPhoenixProtocol") or csa_series.get("MrProtocol") or []), "")
    match = re.search(r"### ASCCONV BEGIN[^\n]*\n(.*?)### ASCCONV END", text, re.S)
    if not match:
        return {}
    entries = (line.split("=", 1) for line in match.group(1).splitlines() if "=" in line)
    return {key.strip(): value.split("#")[0].strip().strip('"') for key, value in entries}


def protocol_slice_centres(ds: Dataset, n_images: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Centres (LPS mm) of the first and last of ``n_images`` slices the Siemens protocol
    prescribes (``sSliceArray`` of the ASCCONV block), or None."""
    return _slice_centres(_ascconv(parse_csa_header(_raw_bytes(ds.get(CSA_SERIES_HEADER_TAG)))), n_images)


def _slice_centres(protocol: dict[str, str], n_images: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last ``sSliceArray`` centres; ASCCONV omits zero-valued entries."""
    if not n_images or n_images < 2:
        return None
    if not any(key.startswith(f"sSliceArray.asSlice[{n_images - 1}].") for key in protocol):
        return None
    try:
        first, last = (
            np.array([float(protocol.get(f"sSliceArray.asSlice[{i}].sPosition.{a}", "0")) for a in _PCS_AXES])
            for i in (0, n_images - 1)
        )
    except ValueError:
        return None
    return first, last


def _along_tiles(
    ds: Dataset, normal: np.ndarray, first: np.ndarray, last: np.ndarray, n_images: int
) -> list[float]:
    """``normal`` or its opposite: whichever points from the tile-0 slice to the others."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        spacing = [float(v) for v in ds.PixelSpacing]
        grid = mosaic_grid(n_images)
        tile0 = geometry.mosaic_slice_positions(
            [float(v) for v in ds.ImagePositionPatient],
            iop,
            spacing,
            (int(ds.Rows), int(ds.Columns)),
            grid,
            1,
            normal,
            0.0,
        )[0]
        row, col = geometry.split_orientation(iop)
        centre = (
            tile0
            + (int(ds.Rows) / grid - 1) / 2 * spacing[0] * col
            + (int(ds.Columns) / grid - 1) / 2 * spacing[1] * row
        )
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return normal.tolist()
    near, far = (
        (last, first) if abs((last - centre) @ normal) < abs((first - centre) @ normal) else (first, last)
    )
    return (normal if (far - near) @ normal >= 0 else -normal).tolist()


def _unit_vector(values: list[str] | None) -> list[float] | None:
    try:
        vector = np.array([float(v) for v in values or []])
    except ValueError:
        return None
    if vector.shape != (3,) or not 0.5 < np.linalg.norm(vector) < 1.5:
        return None
    return (vector / np.linalg.norm(vector)).tolist()


def _raw_bytes(element: Any) -> bytes:
    value = getattr(element, "value", None)
    return value if isinstance(value, bytes) else b""


def _first_int(values: list[str] | None) -> int | None:
    try:
        return int(float(values[0])) if values else None
    except ValueError:
        return None


def _private_us(element: Any) -> int | None:
    value = getattr(element, "value", None)
    if isinstance(value, bytes):
        return struct.unpack("<H", value[:2])[0] if len(value) >= 2 else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def mosaic_grid(n_images: int) -> int:
    """Tiles per row (and column) of the square mosaic grid."""
    return math.ceil(math.sqrt(n_images))


def untile(image: np.ndarray, n_images: int) -> np.ndarray:
    """Cut a 2-D mosaic image into ``[n_images, rows, cols]`` slices (tile order)."""
    grid = mosaic_grid(n_images)
    rows, cols = image.shape[0] // grid, image.shape[1] // grid
    tiles = image[: grid * rows, : grid * cols].reshape(grid, rows, grid, cols).swapaxes(1, 2)
    return tiles.reshape(grid * grid, rows, cols)[:n_images]
