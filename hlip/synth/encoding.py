"""DICOM file bytes of a series in its transfer syntax.

RLE Lossless is encoded by pydicom itself; JPEG Lossless (Process 14 SV1), JPEG-LS Lossless and
JPEG 2000 Lossless by GDCM (python-gdcm), as pydicom has no encoder for the first two (JPEG-LS
would need pyjpegls) and pylibjpeg-openjpeg refuses images under 32 pixels. Without GDCM, JPEG
2000 falls back to pylibjpeg-openjpeg and the other two are left out of the cycle (see
:func:`available_transfer_syntaxes`).
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels import get_encoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from hlip.synth.series import Series

TRANSFER_SYNTAX_CYCLE = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLosslessSV1,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
)
"""Image series take transfer syntaxes in this order, one after the other across the archive."""


_GDCM_SYNTAXES = (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless)
"""Encoded with GDCM when it is installed (one call per series; it also copes with images
under 32 pixels, which pylibjpeg-openjpeg's default settings refuse)."""
PIXEL_DATA = Tag(0x7FE0, 0x0010)
MEDIA_STORAGE_SOP_INSTANCE_UID = Tag(0x0002, 0x0003)


def available_transfer_syntaxes() -> list[UID]:
    """The syntaxes of :data:`TRANSFER_SYNTAX_CYCLE` this environment can encode."""
    available = []
    for uid in dict.fromkeys(TRANSFER_SYNTAX_CYCLE):
        if uid in _GDCM_SYNTAXES and _gdcm() is not None:
            ok = True
        else:
            ok = not uid.is_compressed or (uid != JPEGLosslessSV1 and get_encoder(uid).is_available)
        if ok:
            available.append(uid)
    return available


def _gdcm():
    try:
        import gdcm
    except ImportError:
        return None
    return gdcm


def _pixel_values(series: Series, scratch: Path) -> list[bytes] | None:
    """Each instance's Pixel Data value in the series' transfer syntax (encapsulated if compressed)."""
    if series.pixels is None:
        return None
    syntax = series.transfer_syntax
    if not syntax.is_compressed:
        return [np.ascontiguousarray(f, f.dtype.newbyteorder("<")).tobytes() for f in series.pixels]
    if syntax in _GDCM_SYNTAXES and _gdcm() is not None:
        frames = _gdcm_frames(series, scratch)
    else:
        ds = series.template
        descriptors = dict(rows=ds.Rows, columns=ds.Columns, samples_per_pixel=1, bits_allocated=ds.BitsAllocated,
                           bits_stored=ds.BitsStored, pixel_representation=ds.PixelRepresentation,
                           photometric_interpretation=ds.PhotometricInterpretation, number_of_frames=1)  # fmt: skip
        frames = [get_encoder(syntax).encode(frame, **descriptors) for frame in series.pixels]
    return [encapsulate([frame]) for frame in frames]


def _gdcm_frames(series: Series, scratch: Path) -> list[bytes]:
    """Compress every frame of the series with GDCM in one go, through a multi-frame scratch file."""
    gdcm = _gdcm()
    source, target = scratch / "frames.dcm", scratch / "frames-compressed.dcm"
    ds = Dataset()
    for keyword in ("SOPClassUID", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):  # fmt: skip
        setattr(ds, keyword, series.template[keyword].value)
    ds.SOPInstanceUID = series.uid
    ds.NumberOfFrames = len(series.pixels)
    ds.PixelData = np.ascontiguousarray(series.pixels, series.pixels.dtype.newbyteorder("<")).tobytes()
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds.save_as(source, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(series.transfer_syntax))))
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    if not reader.Read():
        raise RuntimeError(f"GDCM could not read {source}")
    change.SetInput(reader.GetImage())
    writer.SetFile(reader.GetFile())
    if not change.Change():
        raise RuntimeError(f"GDCM could not encode {series.transfer_syntax.name}")
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM could not write {target}")
    return list(generate_frames(pydicom.dcmread(target).PixelData, number_of_frames=len(series.pixels)))


def file_meta(sop_class: str, sop_instance: str, syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HLIP_SYNTH_1"
    meta.FileMetaInformationVersion = b"\x00\x01"
    return meta


def _encode_elements(elements: Sequence[DataElement], implicit: bool) -> bytes:
    """Elements encoded as pydicom writes them (little endian, ISO_IR 100)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    for element in elements:
        write_data_element(fp, element, ["latin_1"])
    return fp.getvalue()


def _pixel_element(value: bytes, series: Series) -> DataElement:
    if series.transfer_syntax.is_compressed:
        return DataElement(PIXEL_DATA, "OB", value, is_undefined_length=True)
    return DataElement(PIXEL_DATA, "OB" if series.template.BitsAllocated == 8 else "OW", value)


def series_files(series: Series, scratch: Path) -> list[bytes]:
    """The bytes of each instance's DICOM file (preamble, file meta, data set).

    The elements shared by every instance are encoded once per series and the few that
    differ are spliced in tag order, which gives the bytes pydicom's writer would give
    for each full data set, many times faster.
    """
    syntax = series.transfer_syntax
    values = _pixel_values(series, scratch)
    pixels = {PIXEL_DATA: [_pixel_element(v, series) for v in values]} if values else {}
    implicit = syntax == ImplicitVRLittleEndian
    bodies = _spliced(series.template, series.instances, pixels, implicit)
    meta = file_meta(series.template.SOPClassUID, "", syntax)
    del meta.MediaStorageSOPInstanceUID
    instance_uids = [
        {MEDIA_STORAGE_SOP_INSTANCE_UID: DataElement(MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", i.SOPInstanceUID)}
        for i in series.instances
    ]
    metas = _spliced(meta, instance_uids, {}, implicit=False)
    files = []
    for meta_bytes, body in zip(metas, bodies, strict=True):
        if syntax == DeflatedExplicitVRLittleEndian:
            body = _deflate(body)
        group_length = _encode_elements([DataElement(0x00020000, "UL", len(meta_bytes))], implicit=False)
        files.append(b"\x00" * 128 + b"DICM" + group_length + meta_bytes + body)
    return files


def _spliced(
    shared: Dataset, instances: Sequence[Mapping], extra: Mapping[Tag, list], implicit: bool
) -> list[bytes]:
    """Each instance's elements (``instances[i]`` and ``extra[tag][i]``) merged in tag order
    with the ``shared`` ones, which are encoded once."""
    variable = sorted(set(instances[0].keys()) | set(extra))
    runs: list[list[DataElement]] = [[] for _ in range(len(variable) + 1)]
    for tag in sorted(shared.keys()):
        runs[bisect.bisect(variable, tag)].append(shared[tag])
    encoded = [_encode_elements(run, implicit) for run in runs]
    out = []
    for i, instance in enumerate(instances):
        parts = [encoded[0]]
        for tag, after in zip(variable, encoded[1:], strict=True):
            element = extra[tag][i] if tag in extra else instance[tag]
            parts += [_encode_elements([element], implicit), after]
        out.append(b"".join(parts))
    return out


def _deflate(body: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(body) + compressor.flush()
    return deflated + b"\x00" * (len(deflated) % 2)
