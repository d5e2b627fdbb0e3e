"""Index stage: source walking, header-only rows, broken files, enhanced frames, mosaics."""

from __future__ import annotations

import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hlip.ingest import index as index_module
from hlip.ingest.index import (
    INDEX_SCHEMA,
    SourceFile,
    index_file,
    index_sources,
    iter_source_files,
    rows_to_table,
    split_file_id,
)
from hlip.ingest.mosaic import csa_mosaic_info, parse_csa_header, untile
from hlip.synth import make_archive

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        raise FileNotFoundError(f"shared test data missing: {path} (clone shared/ beside the repository)")
    return path


def pydicom_file(name: str) -> Path:
    """A file shipped inside the pydicom wheel (never one it would download)."""
    return Path(get_testdata_file(name))


def index_path(path: Path) -> dict:
    return index_file(SourceFile(str(path), "", path.stat().st_size))


# --------------------------------------------------------------------------- sources


def test_folders_are_walked_recursively_in_sorted_order(tmp_path):
    for name in ("b/2", "a/z.dcm", "a/sub/x", "c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [Path(f.path).relative_to(tmp_path).as_posix() for f in iter_source_files(tmp_path)]
    # A folder's own files first, then its sub-folders, each level sorted by name.
    assert found == ["c", "a/z.dcm", "a/sub/x", "b/2"]


def test_zip_members_and_list_files_and_missing_paths(tmp_path):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(pydicom_file("CT_small.dcm"), "study/ct")
        zf.writestr("study/", "")
    single = tmp_path / "one.dcm"
    shutil.copy(pydicom_file("MR_small.dcm"), single)
    listing = tmp_path / "sources.txt"
    listing.write_text(f"# comment\n\n{archive.name}\n{single}\nmissing.dcm\n")
    files = list(iter_source_files([listing]))
    assert [f.file_id for f in files] == [
        f"{archive}::study/ct",
        str(single),
        str(tmp_path / "missing.dcm"),
    ]
    assert split_file_id(files[0].file_id) == (str(archive), "study/ct")
    rows = index_sources([listing]).to_pylist()
    by_id = {r["file_id"]: r for r in rows}
    assert by_id[f"{archive}::study/ct"]["Modality"] == "CT"
    assert by_id[f"{archive}::study/ct"]["member"] == "study/ct"
    assert by_id[str(tmp_path / "missing.dcm")]["error"].startswith("unreadable:")


def test_a_file_named_by_two_sources_is_indexed_once(tmp_path):
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct")
    assert index_sources([tmp_path, tmp_path / "ct"]).num_rows == 1


def test_zip_member_row_equals_file_row(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(pydicom_file("CT_small.dcm"), "ct")
    from_zip = index_sources(archive).to_pylist()[0]
    from_file = rows_to_table([index_path(pydicom_file("CT_small.dcm"))]).to_pylist()[0]
    skip = {"file_id", "path", "member", "mtime_ns"}  # a member carries its archive's time
    assert {k: v for k, v in from_zip.items() if k not in skip} == {
        k: v for k, v in from_file.items() if k not in skip
    }


# --------------------------------------------------------------------------- header rows


def test_classic_ct_row_holds_identity_geometry_and_phi_fields():
    row = index_path(pydicom_file("CT_small.dcm"))
    assert row["error"] is None and row["HasPixelData"]
    assert row["Modality"] == "CT" and row["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert row["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert row["ImagePositionPatient"] == pytest.approx([-158.135803, -179.035797, -75.699997])
    assert row["ImageOrientationPatient"] == pytest.approx([1, 0, 0, 0, 1, 0])
    assert (row["Rows"], row["Columns"], row["RescaleIntercept"]) == (128, 128, -1024.0)
    assert row["PatientName"] == "CompressedSamples^CT1" and row["StudyDate"] == "20040119"
    assert row["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert not row["IsEnhanced"] and not row["IsMosaic"] and not row["IsDICOMDIR"]
    rows_to_table([row]).validate(full=True)


def test_identifying_fields_are_kept_for_scrubbing(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.OperatorsName = ["Doe^Jane", "Roe^Rick"]
    ds.InstitutionAddress = "1 Main Street"
    ds.save_as(tmp_path / "ct.dcm")
    row = index_path(tmp_path / "ct.dcm")
    assert row["OperatorsName"] == "Doe^Jane\\Roe^Rick" and row["InstitutionAddress"] == "1 Main Street"


def test_dicomdir_is_flagged():
    row = index_path(pydicom_file("DICOMDIR"))
    assert row["IsDICOMDIR"] and row["error"] is None


def test_file_without_meta_gets_its_transfer_syntax_from_the_encoding():
    row = index_path(pydicom_file("ExplVR_LitEndNoMeta.dcm"))
    assert row["error"] is None and row["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty"),
        (b"hello, this is a report\n" * 20, "not_dicom"),
        (b"\0" * 128 + b"DICM" + b"\xff" * 64, "unreadable"),
    ],
)
def test_broken_files_get_an_error_and_never_raise(tmp_path, content, code):
    path = tmp_path / "f"
    path.write_bytes(content)
    row = index_path(path)
    assert row["error"].split(":")[0] in {code, "not_dicom", "unreadable"}
    if code != "unreadable":
        assert row["error"].startswith(code)


@pytest.mark.parametrize(
    ("name", "cut"), [("MR_small.dcm", 2000), ("MR_small.dcm", 5000), ("JPEG2000.dcm", -100)]
)
def test_truncated_pixel_data_is_detected(tmp_path, name, cut):
    data = pydicom_file(name).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    assert index_path(path)["error"].startswith("truncated:")


def test_pydicom_truncated_sample_is_detected():
    assert index_path(pydicom_file("MR_truncated.dcm"))["error"].startswith("truncated:")


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_index_file_never_raises_on_random_bytes(tmp_path_factory, payload, with_prefix):
    path = tmp_path_factory.mktemp("random") / "f"
    path.write_bytes((b"\0" * 128 + b"DICM" if with_prefix else b"") + payload)
    row = index_path(path)
    assert row["error"] is None or row["error"].split(":")[0] in {
        "empty",
        "not_dicom",
        "truncated",
        "unreadable",
    }


# --------------------------------------------------------------------------- enhanced frames


def write_enhanced(path: Path, positions: list[tuple[float, float, float]], per_frame_slope: bool) -> None:
    """A small Enhanced MR object: orientation/spacing shared, position per frame."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.ImageType = "MR", 3, ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows = ds.Columns = 4
    ds.NumberOfFrames = len(positions)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.9]
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = 0
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i, position in enumerate(positions):
        frame = Dataset()
        frame.PlanePositionSequence = Sequence([Dataset()])
        frame.PlanePositionSequence[0].ImagePositionPatient = list(position)
        frame.FrameContentSequence = Sequence([Dataset()])
        frame.FrameContentSequence[0].StackID = "1"
        frame.FrameContentSequence[0].InStackPositionNumber = i + 1
        frame.FrameContentSequence[0].DimensionIndexValues = [1, i + 1]
        if per_frame_slope:
            frame.PixelValueTransformationSequence = Sequence([Dataset()])
            frame.PixelValueTransformationSequence[0].RescaleSlope = i + 1
            frame.PixelValueTransformationSequence[0].RescaleIntercept = -i
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.arange(16 * len(positions), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_frames_are_flattened_with_per_frame_precedence(tmp_path):
    positions = [(0.0, 0.0, 3.0), (0.0, 0.0, 1.0), (0.0, 0.0, 2.0)]
    write_enhanced(tmp_path / "e.dcm", positions, per_frame_slope=True)
    row = index_path(tmp_path / "e.dcm")
    assert row["IsEnhanced"] and row["NumberOfFrames"] == 3 and row["HasPixelData"]
    assert row["FramePositions"] == [list(p) for p in positions]
    assert row["FrameOrientations"] == [[1, 0, 0, 0, 1, 0]] * 3
    assert row["FramePixelSpacing"] == [[0.8, 0.9]] * 3
    assert row["FrameRescaleSlope"] == [1.0, 2.0, 3.0]
    assert row["FrameRescaleIntercept"] == [0.0, -1.0, -2.0]
    assert row["FrameInStackPosition"] == [1, 2, 3]
    assert row["FrameDimensionIndex"] == [[1, 1], [1, 2], [1, 3]]
    assert row["FrameStackID"] == ["1", "1", "1"]


def test_shared_rescale_applies_to_every_frame(tmp_path):
    write_enhanced(tmp_path / "e.dcm", [(0.0, 0.0, 1.0), (0.0, 0.0, 2.0)], per_frame_slope=False)
    assert index_path(tmp_path / "e.dcm")["FrameRescaleSlope"] == [2.0, 2.0]


def test_real_enhanced_mr_frames():
    row = index_path(shared("dicom2nifti/tests/data/philips_enhanced/fmri/001/IM-0001-9600-0001.dcm"))
    assert row["NumberOfFrames"] == 32 and len(row["FramePositions"]) == 32
    assert row["FrameComplexComponent"] == ["MAGNITUDE"] * 32


# --------------------------------------------------------------------------- mosaics


def csa_blob(entries: dict[str, list[str]]) -> bytes:
    """Encode a Siemens SV10 CSA header (the inverse of parse_csa_header)."""
    out = bytearray(b"SV10\4\3\2\1" + struct.pack("<II", len(entries), 77))
    for name, values in entries.items():
        out += name.encode().ljust(64, b"\0") + struct.pack("<i", len(values)) + b"DS\0\0"
        out += struct.pack("<iii", 3, len(values), 77)
        for value in values:
            data = value.encode() + b"\0"
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data.ljust((len(data) + 3) // 4 * 4, b"\0")
    return bytes(out)


def test_csa_header_round_trip():
    entries = {"NumberOfImagesInMosaic": ["35"], "SliceNormalVector": ["0.0", "0.1", "0.99"], "Empty": []}
    assert parse_csa_header(csa_blob(entries)) == entries


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_csa_parser_never_raises(raw):
    assert isinstance(parse_csa_header(b"SV10\4\3\2\1" + raw), dict)


def test_mosaic_info_from_csa_image_header():
    row = index_path(shared("dcm_qa_ts/In/1.dcm"))
    assert row["IsMosaic"] and row["NumberOfImagesInMosaic"] == 35
    assert row["SliceNormalVector"] == pytest.approx([0.0, 0.10799944, 0.99415095], abs=1e-6)


def test_mosaic_info_from_the_protocol_when_the_image_header_is_gone():
    """This anonymised mosaic keeps only the series header; its images are numbered from
    head to feet, so the tiles run against the protocol's sNormal."""
    ds = pydicom.dcmread(
        shared("dicom2nifti/tests/data/siemens/fmri/001/IM-0001-0001.dcm"), stop_before_pixels=True
    )
    info = csa_mosaic_info(ds)
    assert info.n_images == 50
    assert info.slice_spacing == pytest.approx(3.08, abs=1e-6)
    assert info.slice_normal == pytest.approx([-0.00044, -0.18738, -0.98229], abs=1e-4)


def test_untile_reads_tiles_row_by_row():
    mosaic = np.arange(36).reshape(6, 6)
    tiles = untile(mosaic, 7)
    assert tiles.shape == (7, 2, 2)
    assert tiles[1].tolist() == [[2, 3], [8, 9]] and tiles[3].tolist() == [[12, 13], [18, 19]]


# --------------------------------------------------------------------------- many files


class RecordingClient:
    """The two dask.distributed Client methods index_sources uses, run in process."""

    def __init__(self):
        self.batches = []

    def map(self, function, batches):
        self.batches = list(batches)
        return [function(batch) for batch in self.batches]

    def gather(self, futures):
        return futures


def test_index_sources_with_a_client_matches_local(tmp_path):
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]):
        shutil.copy(pydicom_file(name), tmp_path / f"f{i}")
    (tmp_path / "empty").write_bytes(b"")
    client = RecordingClient()
    distributed = index_sources(tmp_path, client=client, batch_size=2)
    assert len(client.batches) == 2
    assert distributed.equals(index_sources(tmp_path))
    assert distributed.schema == INDEX_SCHEMA
    assert distributed.column("file_id").to_pylist() == sorted(distributed.column("file_id").to_pylist())


def test_index_sources_with_a_dask_client(tmp_path):
    distributed = pytest.importorskip("distributed")
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct")
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        table = index_sources(tmp_path, client=client)
    assert table.num_rows == 1 and table.column("Modality").to_pylist() == ["CT"]


def test_rows_to_table_fills_missing_columns_with_nulls():
    table = rows_to_table([{"file_id": "a", "path": "a", "member": "", "size": 0, "error": "empty: x"}])
    assert isinstance(table, pa.Table) and table.column("Rows").to_pylist() == [None]


# --------------------------------------------------------------------------- raw field conversion


def _reference_fields(path: Path) -> dict | None:
    """Every plain header field as pydicom converts it, from a parse of the whole header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    fields = {name: index_module._value(ds, name, kind) for name, _, kind in index_module._HEADER_FIELDS}
    meta = ds.file_meta
    fields["SOPClassUID"] = fields["SOPClassUID"] or index_module._text(meta.get("MediaStorageSOPClassUID"))
    fields["SOPInstanceUID"] = fields["SOPInstanceUID"] or index_module._text(
        meta.get("MediaStorageSOPInstanceUID")
    )
    return fields


def _sample_files() -> list[Path]:
    """Files of every real set (every 7th of the large fMRI sets) and pydicom's own test
    files, which cover other character sets, big endian and odd encodings."""
    sets = [shared("dicom2nifti"), shared("pydicom_data"), shared("dcm_qa_ts")]
    files = [p for root in sets for p in sorted(root.rglob("*")) if p.is_file()]
    for fmri in ("dcm_qa_nih", "dcm_qa_table"):
        files += [p for p in sorted(shared(fmri).rglob("*")) if p.is_file()][::7]
    files += [Path(p) for p in get_testdata_files() if p.endswith(".dcm")]
    return files


def test_fields_read_from_raw_bytes_equal_pydicom_conversion():
    """The index converts plain values itself; every field must equal pydicom's value."""
    compared = 0
    for path in _sample_files():
        row = index_path(path)
        reference = _reference_fields(path)
        if row["error"] is not None or reference is None:
            continue
        assert {name: row[name] for name in reference} == reference, path
        compared += 1
    assert compared > 500


def test_plain_headers_read_without_pydicom_give_pydicom_rows(monkeypatch, tmp_path):
    """Files the index reads on its own (plain headers) get the row pydicom's parse gives,
    every column included; a synthetic archive makes sure many files take that path."""
    make_archive(tmp_path / "archive", 2, seed=3)
    sources = [SourceFile(str(p), "", p.stat().st_size) for p in _sample_files()]
    sources += list(iter_source_files(tmp_path / "archive"))
    plain_rows = [index_file(source) for source in sources]
    taken = sum(1 for row in plain_rows if row["error"] is None) - _count_pydicom_reads(sources, monkeypatch)
    monkeypatch.setattr(index_module, "_plain_header", lambda fp, size: None)
    for source, row in zip(sources, plain_rows, strict=True):
        assert row == index_file(source), source.file_id
    assert taken > 300


def _count_pydicom_reads(sources: list[SourceFile], monkeypatch) -> int:
    """How many of ``sources`` the index hands to pydicom."""
    calls = []
    original = pydicom.dcmread
    with monkeypatch.context() as patch:
        patch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(1) or original(*a, **k))
        for source in sources:
            index_file(source)
    return len(calls)
