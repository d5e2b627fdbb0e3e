"""Index stage: a header-only parse of every file under the sources, one table row per file.

The index is the only stage that opens every input file, so it is cheap (no pixel data is
decoded), never raises (a file that cannot be read gets a row with ``error`` set) and its
output is a plain :mod:`pyarrow` table (:data:`INDEX_SCHEMA`) from which the plan is a pure
function. The index keeps identifying header fields (PatientName, AccessionNumber, ...)
because de-identification needs them; it lives in ``_ingest/`` and is never shipped.

Sources are folders (walked recursively; files with or without extension), zip archives
(members are indexed as ``archive.zip::member/path``), text files listing one source per
line (``.txt``, ``.lst``, ``.list``; relative lines are relative to the list file), or a
Python list of any of these.

Enhanced multi-frame objects carry their geometry per frame in functional groups, which
precede the pixel data; the index flattens them into ``Frame*`` list columns (one entry per
frame). Siemens mosaics get ``NumberOfImagesInMosaic`` and ``SliceNormalVector`` from the
CSA image header (private element (0029,1010)) or from (0019,100A).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from hlip.ingest.mosaic import (
    CSA_IMAGE_HEADER_TAG,
    CSA_SERIES_HEADER_TAG,
    NUMBER_OF_IMAGES_IN_MOSAIC_TAG,
    csa_mosaic_info,
)

LIST_SUFFIXES = (".txt", ".lst", ".list")
ZIP_SEPARATOR = "::"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_DATA_TAGS = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_ITEM_DELIMITER = 0xFFFEE00D
_PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"UN"}
_DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian
_PLAUSIBLE_FIRST_GROUPS = {0x0000, 0x0002, 0x0008}
"""A DICOM stream without the 128-byte preamble starts with one of these groups."""


@dataclass(frozen=True)
class SourceFile:
    """One input file: a path on disk, or a member of the zip archive at ``path``."""

    path: str
    member: str = ""
    size: int = 0
    mtime_ns: int = 0
    """Modification time of the file (of the archive, for a zip member): with ``size``, what
    tells a re-run that a file indexed before is unchanged."""

    @property
    def file_id(self) -> str:
        return f"{self.path}{ZIP_SEPARATOR}{self.member}" if self.member else self.path


def _list_type(kind: pa.DataType) -> pa.DataType:
    return pa.list_(kind)


_STR, _INT, _FLOAT, _BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
_FLOATS, _STRS, _INTS = _list_type(_FLOAT), _list_type(_STR), _list_type(_INT)
_FLOAT_ROWS = _list_type(_FLOATS)

# (keyword, arrow type, value kind) for plain top-level attributes.
_HEADER_FIELDS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("SOPClassUID", _STR, "str"),
    ("SOPInstanceUID", _STR, "str"),
    ("StudyInstanceUID", _STR, "str"),
    ("SeriesInstanceUID", _STR, "str"),
    ("FrameOfReferenceUID", _STR, "str"),
    ("Modality", _STR, "str"),
    ("Manufacturer", _STR, "str"),
    ("ManufacturerModelName", _STR, "str"),
    ("ImageType", _STRS, "strs"),
    ("SeriesNumber", _INT, "int"),
    ("InstanceNumber", _INT, "int"),
    ("AcquisitionNumber", _INT, "int"),
    ("SeriesDescription", _STR, "str"),
    ("ProtocolName", _STR, "str"),
    ("StudyDescription", _STR, "str"),
    ("BodyPartExamined", _STR, "str"),
    ("AccessionNumber", _STR, "str"),
    ("StudyID", _STR, "str"),
    ("StudyDate", _STR, "str"),
    ("StudyTime", _STR, "str"),
    ("SeriesDate", _STR, "str"),
    ("SeriesTime", _STR, "str"),
    ("AcquisitionTime", _STR, "str"),
    ("ContentTime", _STR, "str"),
    # Identifying fields: kept so that de-identification can scrub them from report text.
    ("AcquisitionDate", _STR, "str"),
    ("ContentDate", _STR, "str"),
    ("PatientName", _STR, "str"),
    ("OtherPatientNames", _STR, "str"),
    ("PatientBirthName", _STR, "str"),
    ("PatientMotherBirthName", _STR, "str"),
    ("PatientID", _STR, "str"),
    ("OtherPatientIDs", _STR, "str"),
    ("PatientBirthDate", _STR, "str"),
    ("PatientSex", _STR, "str"),
    ("PatientAge", _STR, "str"),
    ("InstitutionName", _STR, "str"),
    ("InstitutionAddress", _STR, "str"),
    ("InstitutionalDepartmentName", _STR, "str"),
    ("ReferringPhysicianName", _STR, "str"),
    ("PerformingPhysicianName", _STR, "str"),
    ("NameOfPhysiciansReadingStudy", _STR, "str"),
    ("PhysiciansOfRecord", _STR, "str"),
    ("RequestingPhysician", _STR, "str"),
    ("OperatorsName", _STR, "str"),
    ("PatientPosition", _STR, "str"),
    ("Rows", _INT, "int"),
    ("Columns", _INT, "int"),
    ("SamplesPerPixel", _INT, "int"),
    ("PhotometricInterpretation", _STR, "str"),
    ("BitsAllocated", _INT, "int"),
    ("BitsStored", _INT, "int"),
    ("PixelRepresentation", _INT, "int"),
    ("NumberOfFrames", _INT, "int"),
    ("ImagePositionPatient", _FLOATS, "floats"),
    ("ImageOrientationPatient", _FLOATS, "floats"),
    ("PixelSpacing", _FLOATS, "floats"),
    ("SliceThickness", _FLOAT, "float"),
    ("SpacingBetweenSlices", _FLOAT, "float"),
    ("SliceLocation", _FLOAT, "float"),
    ("GantryDetectorTilt", _FLOAT, "float"),
    ("RescaleSlope", _FLOAT, "float"),
    ("RescaleIntercept", _FLOAT, "float"),
    ("RescaleType", _STR, "str"),
    ("EchoNumbers", _INT, "int"),
    ("EchoTime", _FLOAT, "float"),
    ("TemporalPositionIdentifier", _INT, "int"),
    ("NumberOfTemporalPositions", _INT, "int"),
    ("TriggerTime", _FLOAT, "float"),
    ("DiffusionBValue", _FLOAT, "float"),
    ("BurnedInAnnotation", _STR, "str"),
    ("ConversionType", _STR, "str"),
)

# Per-frame columns of enhanced multi-frame objects: one list entry per frame.
_FRAME_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("FramePositions", _FLOAT_ROWS),
    ("FrameOrientations", _FLOAT_ROWS),
    ("FramePixelSpacing", _FLOAT_ROWS),
    ("FrameRescaleSlope", _FLOATS),
    ("FrameRescaleIntercept", _FLOATS),
    ("FrameStackID", _STRS),
    ("FrameInStackPosition", _INTS),
    ("FrameTemporalPosition", _INTS),
    ("FrameAcquisitionNumber", _INTS),
    ("FrameEchoTime", _FLOATS),
    ("FrameBValue", _FLOATS),
    ("FrameComplexComponent", _STRS),
    ("FrameType", _STRS),
    ("FrameDimensionIndex", _list_type(_INTS)),
)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("file_id", _STR, nullable=False),
        pa.field("path", _STR, nullable=False),
        pa.field("member", _STR, nullable=False),
        pa.field("size", _INT, nullable=False),
        pa.field("mtime_ns", _INT),
        pa.field("error", _STR),
        pa.field("TransferSyntaxUID", _STR),
        *(pa.field(name, kind) for name, kind, _ in _HEADER_FIELDS),
        pa.field("HasPixelData", _BOOL),
        pa.field("PixelDataOffset", _INT),
        pa.field("PixelDataLength", _INT),
        pa.field("IsDICOMDIR", _BOOL),
        pa.field("IsEnhanced", _BOOL),
        pa.field("IsMosaic", _BOOL),
        pa.field("NumberOfImagesInMosaic", _INT),
        pa.field("SliceNormalVector", _FLOATS),
        pa.field("MosaicSliceSpacing", _FLOAT),
        pa.field("ReferencedSOPInstanceUIDs", _STRS),
        *(pa.field(name, kind) for name, kind in _FRAME_FIELDS),
    ]
)
"""One row per input file. ``error`` is ``"<code>: <message>"`` with code one of
``empty``, ``not_dicom``, ``truncated``, ``unreadable``; other columns are null then.
``PixelDataOffset`` / ``PixelDataLength``: where the value of a native (uncompressed,
little endian, not deflated) Pixel Data element lies in the file, so that the build reads
those pixels directly instead of parsing the header a second time."""

ERROR_CODES = ("empty", "not_dicom", "truncated", "unreadable")


class IndexError_(Exception):
    """A file that cannot be indexed; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


# --------------------------------------------------------------------------- sources


def iter_source_files(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[SourceFile]:
    """Yield every file under ``sources`` in a deterministic order (sorted within a folder)."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    for source in sources:
        yield from _iter_one_source(Path(source), top_level=True)


def _iter_one_source(path: Path, *, top_level: bool) -> Iterator[SourceFile]:
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                yield from _iter_one_source(Path(root) / name, top_level=False)
    elif top_level and path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        yield from _iter_list_file(path)
    elif _is_zip(path):
        yield from _iter_zip(path)
    elif path.is_file():
        stat = path.stat()
        yield SourceFile(os.path.abspath(path), "", stat.st_size, stat.st_mtime_ns)
    elif top_level:
        # A missing source still gets a row, so that it is accounted for.
        yield SourceFile(os.path.abspath(path), "", 0)


def _iter_list_file(path: Path) -> Iterator[SourceFile]:
    for entry in list_file_entries(path):
        yield from _iter_one_source(entry, top_level=True)


def list_file_entries(path: Path) -> list[Path]:
    """The sources a path list names, one a line (``#`` starts a comment line); relative
    lines are relative to the list file."""
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line)
            entries.append(entry if entry.is_absolute() else path.parent / entry)
    return entries


def _is_zip(path: Path) -> bool:
    """A zip archive starts with a local file header; a DICOM file starts with a preamble."""
    try:
        with open(path, "rb") as fp:
            return fp.read(4) == b"PK\x03\x04" and zipfile.is_zipfile(path)
    except OSError:
        return False


def _iter_zip(path: Path) -> Iterator[SourceFile]:
    archive, mtime_ns = os.path.abspath(path), path.stat().st_mtime_ns
    with zipfile.ZipFile(path) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if not info.is_dir():
                yield SourceFile(archive, info.filename, info.file_size, mtime_ns)


def open_source(path: str, member: str = "") -> BinaryIO:
    """A seekable binary file object over one source file (zip members are read into memory)."""
    if member:
        stat = os.stat(path)
        return io.BytesIO(_open_zip(path, stat.st_mtime_ns, stat.st_size).read(member))
    return open(path, "rb")


@functools.lru_cache(maxsize=4)
def _open_zip(path: str, mtime_ns: int, size: int) -> zipfile.ZipFile:
    """An open zip archive, kept for its next members: reading the central directory again
    for every member cost more than the member itself. A changed archive is reopened."""
    return zipfile.ZipFile(path)


def split_file_id(file_id: str) -> tuple[str, str]:
    """Inverse of :attr:`SourceFile.file_id`: ``(path, member)``."""
    path, _, member = file_id.partition(ZIP_SEPARATOR)
    return path, member


# --------------------------------------------------------------------------- one file


def index_file(source_file: SourceFile) -> dict[str, Any]:
    """Header-only parse of one file into one :data:`INDEX_SCHEMA` row. Never raises."""
    row: dict[str, Any] = {
        "file_id": source_file.file_id,
        "path": source_file.path,
        "member": source_file.member,
        "size": int(source_file.size),
        "mtime_ns": int(source_file.mtime_ns),
        "error": None,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_header(source_file) as (fp, size):
                row["size"] = size
                row.update(_read_header(fp, size))
    except IndexError_ as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a broken file must never stop the index
        row["error"] = f"unreadable: {type(exc).__name__}: {exc}"
    return row


@contextlib.contextmanager
def _open_header(source_file: SourceFile) -> Iterator[tuple[BinaryIO, int]]:
    """The file and its size. A zip member is decompressed as far as it is read, which for
    the header is a small part of it."""
    if not source_file.member:
        with open(source_file.path, "rb") as fp:
            yield fp, os.fstat(fp.fileno()).st_size
        return
    stat = os.stat(source_file.path)
    archive = _open_zip(source_file.path, stat.st_mtime_ns, stat.st_size)
    with archive.open(source_file.member) as fp:
        yield fp, archive.getinfo(source_file.member).file_size


def _read_header(fp: BinaryIO, size: int) -> dict[str, Any]:
    if size == 0:
        raise IndexError_("empty", "zero-byte file")
    _sniff_dicom(fp)
    row = _plain_header(fp, size)
    if row is not None:
        row.update(_pixel_data_fields(fp, size, row, little=True))
        return row
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True, specific_tags=_SPECIFIC_TAGS)
    except EOFError as exc:
        raise IndexError_("truncated", f"header ends early: {exc}") from exc
    if not _looks_like_dicom(ds):
        raise IndexError_("not_dicom", "no DICOM attributes found")
    row = _header_fields(ds)
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    row.update(_pixel_data_fields(fp, size, row, little))
    row.update(_frame_fields(ds))
    row.update(_mosaic_fields(ds, row))
    return row


def _sniff_dicom(fp: BinaryIO) -> None:
    """Refuse non-DICOM bytes before pydicom's forced parse turns them into nonsense."""
    head = fp.read(132)
    fp.seek(0)
    if head[128:132] == b"DICM":
        return
    if len(head) >= 4:
        little, big = struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]
        if little in _PLAUSIBLE_FIRST_GROUPS or big in _PLAUSIBLE_FIRST_GROUPS:
            return
    raise IndexError_("not_dicom", "no DICM prefix and no DICOM element at the start")


def _looks_like_dicom(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    has_meta_class = meta is not None and "MediaStorageSOPClassUID" in meta
    return has_meta_class or any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID"))


def _header_fields(ds: Dataset) -> dict[str, Any]:
    meta = getattr(ds, "file_meta", None) or Dataset()
    row = {name: _field_value(ds, tag, name, vr, kind) for tag, name, vr, kind in _FIELD_TAGS}
    row["TransferSyntaxUID"] = _text(meta.get("TransferSyntaxUID")) or _implied_transfer_syntax(ds)
    row["SOPClassUID"] = row["SOPClassUID"] or _text(meta.get("MediaStorageSOPClassUID"))
    row["SOPInstanceUID"] = row["SOPInstanceUID"] or _text(meta.get("MediaStorageSOPInstanceUID"))
    row["IsDICOMDIR"] = row["SOPClassUID"] == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds
    row["ReferencedSOPInstanceUIDs"] = _source_references(ds)
    return row


def _implied_transfer_syntax(ds: Dataset) -> str | None:
    """Transfer syntax of a file without file meta, from the encoding pydicom detected."""
    encoding = getattr(ds, "original_encoding", None)
    if not encoding or encoding[0] is None:
        return None
    implicit, little = encoding
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _value(ds: Dataset, keyword: str, kind: str) -> Any:
    """Attribute ``keyword`` converted to ``kind``; None when absent or malformed."""
    try:
        element = ds.get(keyword)
        if element is None:
            return None
        return _convert(element, kind)
    except Exception:
        return None


# (tag, keyword, dictionary VR, kind) of every plain header field.
_FIELD_TAGS = tuple(
    (Tag(tag_for_keyword(name)), name, dictionary_VR(tag_for_keyword(name)), kind)
    for name, _, kind in _HEADER_FIELDS
)
_SPECIFIC_TAGS = [
    *(tag for tag, _, _, _ in _FIELD_TAGS),
    *(
        Tag(tag_for_keyword(name))
        for name in (
            "SpecificCharacterSet",
            "DirectoryRecordSequence",
            "SourceImageSequence",
            "SharedFunctionalGroupsSequence",
            "PerFrameFunctionalGroupsSequence",
        )
    ),
    *(Tag(*tag) for tag in (CSA_IMAGE_HEADER_TAG, CSA_SERIES_HEADER_TAG, NUMBER_OF_IMAGES_IN_MOSAIC_TAG)),
]
"""The elements the index reads: ``dcmread`` skips the values of all others (GE and
Philips headers carry hundreds of private elements)."""
_STRING_VRS = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "LO", "SH", "UC", "PN", "ST", "LT", "UT"}
_BINARY_FORMATS = {"US": "H", "FD": "d"}


def _field_value(ds: Dataset, tag: Tag, keyword: str, vr: str, kind: str) -> Any:
    """Field ``keyword`` of the header as :func:`_value` gives it, converted from the raw
    bytes where that is plain: pydicom's element conversion costs more than the parse of
    the whole header. Anything else (a VR other than the dictionary's, sequences, values
    :func:`_raw_value` refuses) goes through pydicom."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if not isinstance(raw, RawDataElement) or raw.VR not in (None, vr) or raw.value is None:
        return _value(ds, keyword, kind)
    try:
        return _raw_value(raw.value, vr, kind, raw.is_little_endian)
    except _NotPlain:
        return _value(ds, keyword, kind)


def _convert_text(text: str, kind: str) -> Any:
    """:func:`_convert` of a decoded single-valued string, or of a multi-valued one of a
    kind other than ``str`` (trailing padding removed), without pydicom's value objects."""
    if kind == "str":
        return _text(text)
    values = text.split("\\")
    if kind == "strs":
        return [_text(v) or "" for v in values] if text else []
    if len(values) > 1 and kind != "floats":
        return None
    try:
        if kind == "int":
            return _int_string(text)
        if kind == "float":
            return float(text) if text else None
        return [float(v) for v in values] if text else None
    except ValueError:
        return None


def _int_string(text: str) -> int | None:
    """An Integer String as pydicom reads it: a float spelling is accepted when integral."""
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        number = float(text)
        return int(number) if number.is_integer() else None


def _convert(value: Any, kind: str) -> Any:
    if kind == "str":
        values = _as_list(value)
        return _text("\\".join(str(v) for v in values) if len(values) > 1 else value)
    if kind == "strs":
        return [_text(v) or "" for v in _as_list(value)]
    if kind == "int":
        return None if value == "" else int(value)
    if kind == "float":
        return None if value == "" else float(value)
    if kind == "floats":
        values = [float(v) for v in _as_list(value)]
        return values or None
    raise ValueError(kind)


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    text = str(value).strip().strip("\x00")
    return text or None


def _source_references(ds: Dataset) -> list[str] | None:
    """SOP instances an enhanced object was derived or converted from (classic copies)."""
    refs: list[str] = []
    for item in _functional_group_items(ds):
        for deriv in item.get("DerivationImageSequence", None) or []:
            refs.extend(_referenced_uids(deriv.get("SourceImageSequence", None)))
    refs.extend(_referenced_uids(ds.get("SourceImageSequence", None)))
    return sorted(set(refs)) or None


def _referenced_uids(sequence: Any) -> list[str]:
    return [uid for item in sequence or [] if (uid := _text(item.get("ReferencedSOPInstanceUID")))]


# --------------------------------------------------------------------------- plain headers

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_META_FIELDS = {
    0x00020002: "MediaStorageSOPClassUID",
    0x00020003: "MediaStorageSOPInstanceUID",
    0x00020010: "TransferSyntaxUID",
}
_FIELD_BY_TAG = {int(tag): (name, vr, kind) for tag, name, vr, kind in _FIELD_TAGS}
_NOT_PLAIN = {int(tag) for tag in _SPECIFIC_TAGS} - set(_FIELD_BY_TAG) - {0x00080005}
"""Sequences, DICOMDIR records and Siemens private headers: pydicom reads those files."""
_PIXEL_TAG_VALUES = {int(tag) for tag in PIXEL_DATA_TAGS}


class _NotPlain(Exception):
    """The header needs pydicom (a reason not to take the plain path)."""


def _plain_header(fp: BinaryIO, size: int) -> dict[str, Any] | None:
    """The index row of a plain file, read without pydicom, or None for pydicom to read.

    Plain: a preamble and file meta, a little endian transfer syntax that is not deflated
    (the native ones and every compressed one), a header within the first 64 KiB, no
    sequence or private header the index reads, one value per text field and only ASCII
    text: nearly every classic CT or MR slice. Walking the elements and converting a few
    dozen values costs a fraction of building pydicom's dataset. A file that ends before
    its pixel data (no pixels, or truncated) is left to pydicom. Leaves ``fp`` at the
    pixel data element."""
    for limit in _PLAIN_HEADER_READS:
        fp.seek(0)
        data = fp.read(limit)
        try:
            found = _plain_row(data)
        except (_NotPlain, UnicodeDecodeError, ValueError):
            return None
        if found is not None:
            fp.seek(found[1])
            return found[0]
        if len(data) >= size:
            return None
    return None


_PLAIN_HEADER_READS = (1 << 15, 1 << 16)
"""Bytes read for a header: most fit the first, long private headers the second."""


def _plain_row(data: bytes) -> tuple[dict[str, Any], int] | None:
    """The row of the plain header in ``data`` and the position of its pixel data; None
    when ``data`` ends first. Raises :class:`_NotPlain` for pydicom's files."""
    if data[128:132] != b"DICM":
        raise _NotPlain("no preamble")
    try:
        meta, position = _plain_elements(data, 132, explicit=True, meta=True)
        syntax = pydicom.uid.UID(_text(meta.get(0x00020010, (None, b""))[1].decode("ascii")) or "")
        if not syntax.is_transfer_syntax or not syntax.is_little_endian or syntax.is_deflated:
            raise _NotPlain(f"transfer syntax {syntax}")
        elements, position = _plain_elements(data, position, explicit=not syntax.is_implicit_VR)
    except struct.error:
        return None  # an element header runs past the data
    if position is None:
        return None
    return _plain_fields(meta, elements, str(syntax)), position


def _plain_elements(
    data: bytes, position: int, *, explicit: bool, meta: bool = False
) -> tuple[dict[int, tuple[bytes | None, bytes]], int | None]:
    """``{tag: (VR or None, value)}`` of the elements the index reads, from ``position``
    to the pixel data (its position is returned; None when the data ends first), or to
    the end of group 0002 with ``meta``. Sequences nobody reads are skipped."""
    wanted = _META_FIELDS if meta else _FIELD_BY_TAG
    found: dict[int, tuple[bytes | None, bytes]] = {}
    while position + 8 <= len(data):
        tag = _tag_at(data, position)
        if (meta and tag >> 16 != 0x0002) or tag in _PIXEL_TAG_VALUES:
            return found, position
        if tag in _NOT_PLAIN:
            raise _NotPlain(f"{tag:08X}")
        vr, length, position = _element_header(data, position, explicit)
        if length == 0xFFFFFFFF:
            position = _skip_sequence(data, position, explicit and vr != b"UN")
            continue
        if position + length > len(data):
            break
        if tag in wanted:
            found[tag] = (vr, data[position : position + length])
        position += length
    if meta:
        raise _NotPlain("file meta runs past the data read")
    return found, None


def _tag_at(data: bytes, position: int) -> int:
    group, element = struct.unpack_from("<HH", data, position)
    return group << 16 | element


def _element_header(data: bytes, position: int, explicit: bool) -> tuple[bytes | None, int, int]:
    """VR (None when implicit), value length and value position of the element at ``position``."""
    if not explicit:
        return None, struct.unpack_from("<I", data, position + 4)[0], position + 8
    vr = data[position + 4 : position + 6]
    if vr in _LONG_VRS:
        return vr, struct.unpack_from("<I", data, position + 8)[0], position + 12
    return vr, struct.unpack_from("<H", data, position + 6)[0], position + 8


def _skip_sequence(data: bytes, position: int, explicit: bool) -> int:
    """The position after an undefined-length sequence whose items start at ``position``
    (items of defined or undefined length, nested sequences included; the items of a UN
    sequence are implicit VR)."""
    while True:
        tag, length = _tag_at(data, position), struct.unpack_from("<I", data, position + 4)[0]
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position
        if tag != _ITEM_TAG:
            raise _NotPlain(f"{tag:08X} where a sequence item belongs")
        if length != 0xFFFFFFFF:
            position += length
            continue
        while _tag_at(data, position) != _ITEM_DELIMITER:
            vr, length, position = _element_header(data, position, explicit)
            if length == 0xFFFFFFFF:
                position = _skip_sequence(data, position, explicit and vr != b"UN")
            else:
                position += length
        position += 8


def _plain_fields(
    meta: dict[int, tuple[bytes | None, bytes]], elements: dict[int, tuple[bytes | None, bytes]], syntax: str
) -> dict[str, Any]:
    """The header columns of a plain file, as :func:`_header_fields` gives them."""
    row: dict[str, Any] = dict.fromkeys(_FIELD_NAMES)
    for tag, (vr, value) in elements.items():
        name, dictionary_vr, kind = _FIELD_BY_TAG[tag]
        if vr is not None and vr.decode("ascii") != dictionary_vr:
            raise _NotPlain(f"{name} has VR {vr!r}")
        row[name] = _raw_value(value, dictionary_vr, kind)
    meta_text = {
        name: _text(meta[tag][1].decode("ascii")) for tag, name in _META_FIELDS.items() if tag in meta
    }
    if not (meta_text.get("MediaStorageSOPClassUID") or elements.keys() & _IDENTIFYING_TAGS):
        raise _NotPlain("no DICOM attributes")
    row["TransferSyntaxUID"] = syntax
    row["SOPClassUID"] = row["SOPClassUID"] or meta_text.get("MediaStorageSOPClassUID")
    row["SOPInstanceUID"] = row["SOPInstanceUID"] or meta_text.get("MediaStorageSOPInstanceUID")
    row["IsDICOMDIR"] = row["SOPClassUID"] == DICOMDIR_SOP_CLASS
    row["ReferencedSOPInstanceUIDs"] = None
    row["IsEnhanced"] = False
    if "MOSAIC" in [v.upper() for v in row["ImageType"] or []]:
        raise _NotPlain("mosaic")
    row["IsMosaic"] = False
    return row


_FIELD_NAMES = [name for name, _, _ in _HEADER_FIELDS]
_IDENTIFYING_TAGS = {
    int(Tag(tag_for_keyword(k))) for k in ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID")
}


def _raw_value(value: bytes, vr: str, kind: str, little: bool = True) -> Any:
    """:func:`_value` of one raw value of dictionary VR ``vr``, converted directly where
    that is plain (ASCII text, one binary number); raise :class:`_NotPlain` where
    pydicom's conversion is needed (other character sets, several text values, which
    pydicom trims per VR)."""
    if vr in _BINARY_FORMATS:
        if len(value) != struct.calcsize(_BINARY_FORMATS[vr]):
            raise _NotPlain(f"{vr} of {len(value)} bytes")
        return _convert(struct.unpack(("<" if little else ">") + _BINARY_FORMATS[vr], value)[0], kind)
    plain = (vr in _STRING_VRS or vr in ("IS", "DS")) and value.isascii() and b"\x1b" not in value
    if not plain or (kind == "str" and b"\\" in value):
        raise _NotPlain("text pydicom must decode")
    return _convert_text(value.decode("ascii").rstrip(" \x00"), kind)


# --------------------------------------------------------------------------- pixel data


_NATIVE_LITTLE_ENDIAN = {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian}


def _pixel_data_fields(fp: BinaryIO, size: int, row: dict[str, Any], little: bool) -> dict[str, Any]:
    """``HasPixelData``, and where a native little endian Pixel Data value lies; raise
    ``truncated`` when the file ends inside the pixel data.

    The stream stands where the header ended, at the pixel data element, so its header
    gives the declared length (native) or the fragment items (encapsulated).
    """
    fields: dict[str, Any] = {"HasPixelData": False}
    if row["TransferSyntaxUID"] == _DEFLATED:
        fields["HasPixelData"] = True  # deflated stream: pydicom reads (and checks) it whole when decoding
        return fields
    endian = "<" if little else ">"
    start = fp.tell()
    header = fp.read(12)
    if len(header) < 8:
        if row["Rows"] is not None and row["Columns"] is not None:
            raise IndexError_("truncated", "image header without pixel data: the file ends early")
        return fields
    group, element = struct.unpack(endian + "HH", header[:4])
    if Tag(group, element) not in PIXEL_DATA_TAGS:
        return fields
    fields["HasPixelData"] = True
    # Decide explicit/implicit at the element itself: some files switch encoding mid-stream.
    if header[4:6] in _PIXEL_VRS and header[6:8] == b"\0\0":
        if len(header) < 12:
            raise IndexError_("truncated", "file ends inside the pixel data element header")
        (length,) = struct.unpack(endian + "I", header[8:12])
        value_start = start + 12
    else:
        (length,) = struct.unpack(endian + "I", header[4:8])
        value_start = start + 8
    if length == 0xFFFFFFFF:
        _check_fragments(fp, value_start, size, endian)
        return fields
    if value_start + length > size:
        raise IndexError_("truncated", f"pixel data declares {length} bytes, file has {size - value_start}")
    expected = declared_pixel_bytes(row)
    if expected and length < expected:
        raise IndexError_("truncated", f"pixel data has {length} bytes, the image needs {expected}")
    if little and element == 0x0010 and row["TransferSyntaxUID"] in _NATIVE_LITTLE_ENDIAN:
        fields.update(PixelDataOffset=value_start, PixelDataLength=length)
    return fields


def _check_fragments(fp: BinaryIO, position: int, size: int, endian: str) -> None:
    """Walk the items of encapsulated pixel data up to the sequence delimiter."""
    while True:
        fp.seek(position)
        header = fp.read(8)
        if len(header) < 8:
            raise IndexError_("truncated", "file ends inside encapsulated pixel data")
        group, element, length = struct.unpack(endian + "HHI", header)
        tag = (group << 16) | element
        if tag == _SEQUENCE_DELIMITER:
            return
        if tag != _ITEM_TAG:
            raise IndexError_("truncated", f"unexpected tag {tag:08X} inside encapsulated pixel data")
        position += 8 + length
        if position > size:
            raise IndexError_("truncated", "file ends inside a pixel data fragment")


def declared_pixel_bytes(row: Mapping[str, Any]) -> int:
    """Bytes of native pixel data the image attributes of index row ``row`` call for, which
    is also what decoding a compressed file produces (0: unknown)."""
    if not (row.get("BitsAllocated") and row.get("Rows") and row.get("Columns")):
        return 0
    samples = row.get("SamplesPerPixel") or 1
    if row.get("PhotometricInterpretation") == "YBR_FULL_422":
        samples = 2  # chroma subsampled horizontally: 2 samples per pixel on average
    pixels = row["Rows"] * row["Columns"] * samples * max(1, row.get("NumberOfFrames") or 1)
    return (pixels * row["BitsAllocated"] + 7) // 8


# --------------------------------------------------------------------------- enhanced frames


def _functional_group_items(ds: Dataset) -> list[Dataset]:
    if _SHARED_GROUPS not in ds and _PER_FRAME_GROUPS not in ds:
        return []
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    return list(shared or []) + list(per_frame or [])


_SHARED_GROUPS, _PER_FRAME_GROUPS = Tag(0x5200, 0x9229), Tag(0x5200, 0x9230)


def _frame_fields(ds: Dataset) -> dict[str, Any]:
    """Flatten the shared and per-frame functional groups into one list per attribute."""
    if _SHARED_GROUPS not in ds and _PER_FRAME_GROUPS not in ds:
        return {"IsEnhanced": False}
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    shared_seq = ds.get("SharedFunctionalGroupsSequence", None)
    if not per_frame and not shared_seq:
        return {"IsEnhanced": False}
    shared = shared_seq[0] if shared_seq else Dataset()
    n_frames = int(ds.get("NumberOfFrames", None) or len(per_frame or []) or 1)
    frames = [per_frame[i] if per_frame and i < len(per_frame) else Dataset() for i in range(n_frames)]
    columns = {name: [_frame_value(name, frame, shared) for frame in frames] for name, _ in _FRAME_FIELDS}
    return {
        "IsEnhanced": True,
        **{k: (v if any(x is not None for x in v) else None) for k, v in columns.items()},
    }


# (sequence keyword, attribute keyword, kind) per frame column; per-frame wins over shared.
_FRAME_SOURCES: dict[str, tuple[str, str, str]] = {
    "FramePositions": ("PlanePositionSequence", "ImagePositionPatient", "floats"),
    "FrameOrientations": ("PlaneOrientationSequence", "ImageOrientationPatient", "floats"),
    "FramePixelSpacing": ("PixelMeasuresSequence", "PixelSpacing", "floats"),
    "FrameRescaleSlope": ("PixelValueTransformationSequence", "RescaleSlope", "float"),
    "FrameRescaleIntercept": ("PixelValueTransformationSequence", "RescaleIntercept", "float"),
    "FrameStackID": ("FrameContentSequence", "StackID", "str"),
    "FrameInStackPosition": ("FrameContentSequence", "InStackPositionNumber", "int"),
    "FrameTemporalPosition": ("FrameContentSequence", "TemporalPositionIndex", "int"),
    "FrameAcquisitionNumber": ("FrameContentSequence", "FrameAcquisitionNumber", "int"),
    "FrameEchoTime": ("MREchoSequence", "EffectiveEchoTime", "float"),
    "FrameBValue": ("MRDiffusionSequence", "DiffusionBValue", "float"),
    "FrameDimensionIndex": ("FrameContentSequence", "DimensionIndexValues", "ints"),
}
_FRAME_TYPE_SEQUENCES = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence")


def _frame_value(name: str, frame: Dataset, shared: Dataset) -> Any:
    if name in ("FrameComplexComponent", "FrameType"):
        attribute = "ComplexImageComponent" if name == "FrameComplexComponent" else "FrameType"
        for sequence in _FRAME_TYPE_SEQUENCES:
            value = _macro_value(frame, shared, sequence, attribute, "strs")
            if value is not None:
                return "\\".join(value) if value else None
        return None
    sequence, attribute, kind = _FRAME_SOURCES[name]
    if kind == "ints":
        values = _macro_value(frame, shared, sequence, attribute, "floats")
        return [int(v) for v in values] if values else None
    return _macro_value(frame, shared, sequence, attribute, kind)


def _macro_value(frame: Dataset, shared: Dataset, sequence: str, attribute: str, kind: str) -> Any:
    for group in (frame, shared):
        items = group.get(sequence, None)
        if items:
            value = _value(items[0], attribute, kind)
            if value is not None:
                return value
    return None


# --------------------------------------------------------------------------- mosaics


def _mosaic_fields(ds: Dataset, row: dict[str, Any]) -> dict[str, Any]:
    is_mosaic = "MOSAIC" in [v.upper() for v in row.get("ImageType") or []]
    if not is_mosaic:
        return {"IsMosaic": False}
    info = csa_mosaic_info(ds)
    return {
        "IsMosaic": True,
        "NumberOfImagesInMosaic": info.n_images,
        "SliceNormalVector": info.slice_normal,
        "MosaicSliceSpacing": info.slice_spacing,
    }


# --------------------------------------------------------------------------- many files


def _index_batch(batch: Sequence[SourceFile]) -> list[dict[str, Any]]:
    return [index_file(sf) for sf in batch]


def index_sources(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    client: Any = None,
    batch_size: int = 256,
) -> pa.Table:
    """Index every file under ``sources`` into one table sorted by ``file_id``, one row per
    file even when several sources name it.

    With a ``dask.distributed`` client the files are indexed in batches on its workers;
    otherwise in this process.
    """
    unique: dict[str, SourceFile] = {}
    for source_file in iter_source_files(sources):
        unique.setdefault(source_file.file_id, source_file)
    files = list(unique.values())
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    if client is not None and batches:
        results = client.gather(client.map(_index_batch, batches))
    else:
        results = [_index_batch(batch) for batch in batches]
    rows = sorted((row for batch in results for row in batch), key=lambda r: r["file_id"])
    return rows_to_table(rows)


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows (dicts, missing keys = null) as an :data:`INDEX_SCHEMA` table."""
    names = INDEX_SCHEMA.names
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in names} for row in rows], schema=INDEX_SCHEMA
    )
