"""The ingest pipeline end to end: accounting, de-identification, determinism, resume.

Runs on a small synthetic archive (4 studies: CT and MR, an SR report, a zip export, a
DICOMDIR, broken files, fake PHI) and on a few real public series from ../shared/data.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlip.ingest import deid, pipeline
from hlip.ingest.config import IngestConfig
from hlip.ingest.index import iter_source_files
from hlip.ingest.plan import Reject
from hlip.ingest.volume import ScanRejected
from hlip.shards.reader import ShardDataset
from hlip.synth import Sizes, make_archive

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SMALL = Sizes(ct_matrix=64, mr_matrix=64, ct_coverage_mm=80.0)
"""Small images keep a 4-study archive to a few MB."""


def small_config(archive, **changes) -> IngestConfig:
    """Coarse CT spacing so test volumes stay small; a fixed secret so keys are comparable."""
    config = IngestConfig(
        target_spacing={"CT": (5.0, 4.0, 4.0)}, report_table=str(archive.reports_csv), secret="test-secret"
    )
    return replace(config, **changes)


def output_bytes(out_dir: Path) -> dict[str, bytes]:
    """Every file of a dataset outside ``_ingest/``, by relative path."""
    return {
        str(path.relative_to(out_dir)): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and pipeline.INGEST_DIR not in path.relative_to(out_dir).parts
    }


def readable_blobs(out_dir: Path):
    """``(where, bytes)`` for every output file outside ``_ingest/`` and everything inside
    it a reader could see: tar members, zarr-zip entries (JSON metadata and chunks) and
    Parquet cells (pages are compressed, so the raw file bytes are not enough)."""
    for name, data in output_bytes(out_dir).items():
        yield name, data
        if name.endswith(".parquet"):
            yield f"{name} rows", json.dumps(pq.read_table(out_dir / name).to_pylist(), default=str).encode()
        if name.endswith(".tar"):
            with tarfile.open(out_dir / name) as tar:
                for member in tar:
                    data = tar.extractfile(member).read()
                    yield f"{name}:{member.name}", data
                    if member.name.endswith(".zip"):
                        with zipfile.ZipFile(io.BytesIO(data)) as inner:
                            for entry in inner.namelist():
                                yield f"{name}:{member.name}:{entry}", inner.read(entry)


def phi_leaks(out_dir: Path, phi_values) -> list[tuple[str, str]]:
    return [
        (where, value)
        for where, data in readable_blobs(out_dir)
        for value in phi_values
        if value.lower().encode() in data.lower()
    ]


def files_table(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir / pipeline.INGEST_DIR / pipeline.FILES_FILE).sort_by("file_id").to_pylist()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("synth") / "archive", 4, seed=3, sizes=SMALL)


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    """An uninterrupted in-process run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    return out, summary


# --- configuration ------------------------------------------------------------------------


def test_config_hash_covers_content_settings_only():
    base = IngestConfig()
    assert base.config_hash() == IngestConfig().config_hash()
    assert len(base.config_hash()) == 16
    for changed in (
        IngestConfig(target_spacing={"CT": (2.0, 1.0, 1.0)}),
        IngestConfig(target_spacing={"CT": "native"}),
        IngestConfig(min_slices=base.min_slices + 1),
        IngestConfig(allow_missing_report=True),
        IngestConfig(report_text_columns=("Findings_EN", "Impressions_EN")),
        IngestConfig(report_key_column="AccessionNumber"),
        IngestConfig(label_columns=("nodule",)),
        IngestConfig(label_prefixes=("label_",)),
    ):
        assert changed.config_hash() != base.config_hash(), changed
    for same in (
        IngestConfig(secret="x"),
        IngestConfig(report_table="/a/b.csv"),
        IngestConfig(max_shard_bytes=1),
        IngestConfig(target_spacing={**base.target_spacing, "MR": "native"}),
    ):
        assert same.config_hash() == base.config_hash(), same


@pytest.mark.parametrize(
    "changes",
    [
        {"report_key_column": "PatientID"},
        {"target_spacing": {"CT": (3.0, 0.0, 1.0)}},
        {"target_spacing": {"CT": (1.0,)}},
    ],
)
def test_config_rejects_invalid_settings(changes):
    with pytest.raises(ValueError):
        IngestConfig(**changes)


# --- accounting ---------------------------------------------------------------------------


def _index(*file_ids: str) -> pa.Table:
    return pa.table({"file_id": list(file_ids)})


def test_account_gives_every_file_exactly_one_outcome():
    outcomes = [
        pipeline.StudyOutcome(
            "k1",
            True,
            [
                pipeline.FileOutcome("b", pipeline.SCAN, "k1", "2"),
                pipeline.FileOutcome("c", pipeline.REPORT, "k1"),
            ],
        )
    ]
    table = pipeline.account(_index("a", "b", "c", "d"), [Reject("a", "localizer", "scout")], outcomes)
    rows = table.to_pylist()
    assert [row["file_id"] for row in rows] == ["a", "b", "c", "d"]
    assert [row["outcome"] for row in rows] == ["rejected", "scan", "report", "rejected"]
    assert rows[0]["reason"] == "localizer" and rows[3]["reason"] == "not_planned"
    assert table.schema == pipeline.FILES_SCHEMA


def test_account_refuses_double_and_unknown_outcomes():
    twice = [pipeline.StudyOutcome("k", True, [pipeline.FileOutcome("a", pipeline.SCAN, "k", "2")])]
    with pytest.raises(ValueError, match="two outcomes"):
        pipeline.account(_index("a"), [Reject("a", "localizer")], twice)
    with pytest.raises(ValueError, match="not indexed"):
        pipeline.account(_index("a"), [Reject("zz", "localizer")], [])


# --- a whole run --------------------------------------------------------------------------


def test_every_input_file_is_accounted_once(archive, reference):
    out, summary = reference
    rows = files_table(out)
    listed = sorted(source.file_id for source in iter_source_files([str(archive.root.resolve())]))
    assert [row["file_id"] for row in rows] == listed
    assert summary.files == len(listed) and sum(summary.outcomes.values()) == len(listed)
    by_id = {row["file_id"]: row for row in rows}
    root = archive.root.resolve()
    for synth_file in archive.files:
        path = str(root / synth_file.path)
        row = by_id[f"{path}::{synth_file.member}" if synth_file.member else path]
        if synth_file.kind in ("localizer", "dicomdir", "empty", "truncated", "not_dicom", "duplicate"):
            assert row["outcome"] == pipeline.REJECTED and row["reason"], row
        if synth_file.kind == "sr_report":
            assert row["outcome"] == pipeline.REPORT, row
        if row["outcome"] == pipeline.REJECTED:
            assert row["reason"] in pipeline.REASONS, row


def test_staged_studies_match_the_archive(archive, reference):
    out, summary = reference
    dataset = ShardDataset(out)
    secret = b"test-secret"
    assert sorted(dataset.keys()) == sorted(deid.study_key(s.study_uid, secret) for s in archive.studies)
    assert summary.studies_staged == len(archive.studies) and summary.studies_rejected == 0
    scan_files = {}
    for row in files_table(out):
        if row["outcome"] == pipeline.SCAN:
            for name in row["scan"].split(","):
                scan_files[(row["study_key"], name)] = scan_files.get((row["study_key"], name), 0) + 1
    scans = pq.read_table(out / "scans.parquet").to_pylist()
    assert {(s["key"], s["scan"]): s["source_file_count"] for s in scans} == scan_files
    for synth_study in archive.studies:
        study = dataset.open(deid.study_key(synth_study.study_uid, secret))
        assert study.labels == synth_study.labels
        assert study.report.strip() and study.modality == synth_study.modality
        assert study.config_hash == small_config(archive).config_hash()


def test_no_fake_phi_outside_ingest_dir(archive, reference):
    out, _ = reference
    assert archive.phi_values
    assert phi_leaks(out, archive.phi_values) == []


def hospital_export(archive, path: Path) -> tuple[Path, list[str]]:
    """The archive's report table as a hospital exports it: the findings beside an MRN with
    leading zeros, the patient's name, birth date, exam date, phone and address; with
    every PHI value (and the forms it could take: no leading zeros, DICOM dates)."""
    with archive.reports_csv.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    phi = []
    for i, row in enumerate(rows):
        extra = {
            "MRN": f"00{731942 + i}",
            "patient_name": f"QUIXOTE^ALONSO{'ABCD'[i]}",
            "DOB": f"19{41 + i}-07-23",
            "exam_date": f"2023-11-{17 + i}",
            "phone": f"555-0{173 + i}-9921",
            "address": f"{17 + i} Rocinante Lane, La Mancha",
        }
        row.update(extra)
        phi += [*extra.values(), str(731942 + i), f"19{41 + i}0723", f"202311{17 + i}", f"ALONSO{'ABCD'[i]}"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path, phi


def test_phi_columns_of_a_hospital_export_never_reach_the_dataset(archive, tmp_path):
    table, phi = hospital_export(archive, tmp_path / "export.csv")
    out = tmp_path / "out"
    pipeline.run_ingest([archive.root], out, small_config(archive, report_table=str(table)), workers=0)
    assert phi_leaks(out, phi) == []
    dataset = ShardDataset(out)
    secret = deid.resolve_secret("test-secret", out)
    for synth_study in archive.studies:
        assert dataset.open(deid.study_key(synth_study.study_uid, secret)).labels == synth_study.labels
    with pytest.raises(ValueError, match=r"refusing label column\(s\) 'MRN' \(identifying name\)"):
        pipeline.run_ingest(
            [archive.root],
            tmp_path / "asked",
            small_config(archive, report_table=str(table), label_columns=("MRN",)),
        )
    assert not (tmp_path / "asked").exists()


def write_deflate_bomb(folder: Path, n: int = 5, side: int = 8192) -> list[Path]:
    """``n`` CT slices of ``side``² zeros in Deflated Explicit VR Little Endian: a few hundred
    KB on disk that decode to ``n`` x 128 MiB (and several times that while building)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, paths = generate_uid(), generate_uid(), []
    pixels = bytes(side * side * 2)
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.SeriesNumber, ds.InstanceNumber, ds.ImageType = 1, k + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 5.0 * k], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.Rows, ds.Columns = [0.05, 0.05], side, side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = pixels
        paths.append(folder / f"bomb{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_a_decompression_bomb_is_a_recorded_reject_and_the_archive_goes_on(archive, reference, tmp_path):
    bomb = write_deflate_bomb(tmp_path / "bomb")
    assert sum(path.stat().st_size for path in bomb) < 2 << 20
    out = tmp_path / "out"
    config = small_config(archive, allow_missing_report=True)
    summary = pipeline.run_ingest([archive.root, tmp_path / "bomb"], out, config, workers=0)
    outcomes = {row["file_id"]: row for row in files_table(out)}
    for path in bomb:
        row = outcomes[str(path)]
        assert (row["outcome"], row["reason"]) == ("rejected", "too_large")
        assert "compression x" in row["message"] and "not decoded" in row["message"]
    assert summary.studies_staged >= reference[1].studies_staged


def test_a_study_over_the_voxel_budget_is_refused_before_decoding(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_scan", lambda *a: pytest.fail("decoded a study over its budget"))
    out = tmp_path / "out"
    summary = pipeline.run_ingest(
        [archive.root], out, small_config(archive, max_study_voxels=1000), workers=0
    )
    assert summary.studies_staged == 0
    refused = [row for row in files_table(out) if row["reason"] == "too_large"]
    assert refused and all("per-study budget of 1000" in row["message"] for row in refused)
    assert pipeline.study_voxel_budget(small_config(archive)) == pipeline.worker_memory_bytes() // 16


def test_output_bytes_do_not_depend_on_worker_count(archive, reference, tmp_path):
    """1 and 2 workers (the second reached by scheduler address, as ``--scheduler`` does)
    write the bytes of the serial run."""
    from distributed import Client, LocalCluster

    expected = output_bytes(reference[0])
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        with LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster:
            if workers == 1:
                with Client(cluster) as client:
                    pipeline.run_ingest([archive.root], out, small_config(archive), client=client)
            else:
                pipeline.run_ingest([archive.root], out, small_config(archive), cluster.scheduler_address)
        assert output_bytes(out) == expected, workers
        assert files_table(out) == files_table(reference[0])


# --- rejections at build time --------------------------------------------------------------


def test_scans_refused_at_build_time_reject_their_files(archive, tmp_path, monkeypatch):
    """A refused scan rejects its files with its reason; a study left without scans rejects
    its report files as no_usable_scan and is not written. Series descriptions (typed by
    operators, sometimes with the patient's name) are scrubbed like reports."""
    real_build_scan = pipeline.build_scan
    mr_uid = next(s.study_uid for s in archive.studies if s.modality == "MR")
    names = {s.study_uid: s.phi["PatientName"] for s in archive.studies}

    def refuse_some(scan_plan, rows, config):
        if scan_plan.study_uid == mr_uid or scan_plan.name == "2":
            raise ScanRejected("decode_error", "refused by the test")
        scan = real_build_scan(scan_plan, rows, config)
        scan.series_description = f"{names[scan_plan.study_uid]} {scan.series_description}"
        return scan

    monkeypatch.setattr(pipeline, "build_scan", refuse_some)
    summary = pipeline.run_ingest([archive.root], tmp_path / "out", small_config(archive), workers=0)
    mr_key = deid.study_key(mr_uid, b"test-secret")
    rows = files_table(tmp_path / "out")
    dataset = ShardDataset(tmp_path / "out")
    assert mr_key not in dataset
    assert summary.studies_rejected == 1
    mr_rows = [row for row in rows if row["study_key"] == mr_key]
    assert mr_rows and all(row["outcome"] == pipeline.REJECTED for row in mr_rows)
    assert {row["reason"] for row in mr_rows} <= {"decode_error", "no_usable_scan"}
    assert not [row for row in rows if row["outcome"] == pipeline.SCAN and "2" in row["scan"].split(",")]
    assert [row for row in rows if row["reason"] == "decode_error" and row["study_key"] != mr_key]
    descriptions = [
        scan.series_description for key in sorted(dataset.keys()) for scan in dataset.open(key).scans
    ]
    assert descriptions and all(d.startswith("[NAME] ") for d in descriptions), descriptions


def test_studies_without_report(archive, tmp_path):
    """A study missing from the report table (and without SR) is rejected as no_report,
    unless allow_missing_report keeps it with an empty report."""
    missing = next(s for s in archive.studies if not s.report_in_sr)
    with open(archive.reports_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    partial = tmp_path / "partial.csv"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["StudyInstanceUID"] != missing.study_uid)
    key = deid.study_key(missing.study_uid, b"test-secret")

    strict = small_config(archive, report_table=str(partial))
    summary = pipeline.run_ingest([archive.root], tmp_path / "strict", strict, workers=0)
    reasons = [row["reason"] for row in files_table(tmp_path / "strict") if row["study_key"] == key]
    assert reasons and set(reasons) == {"no_report"} and summary.reasons["no_report"] == len(reasons)
    assert key not in ShardDataset(tmp_path / "strict")

    lenient = small_config(archive, report_table=str(partial), allow_missing_report=True)
    pipeline.run_ingest([archive.root], tmp_path / "lenient", lenient, workers=0)
    assert ShardDataset(tmp_path / "lenient").open(key).report == ""


# --- resume -------------------------------------------------------------------------------


def test_interrupted_run_resumes_without_rebuilding(archive, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    built = []
    real_build_study = pipeline.build_study

    def crash_after_two(task, config):
        if len(built) == 2:
            raise KeyboardInterrupt("killed")
        built.append(task.key)
        return real_build_study(task, config)

    monkeypatch.setattr(pipeline, "build_study", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    assert not list(out.glob("*.tar")) and not (out / "manifest.parquet").exists()

    def counting(task, config):
        built.append(task.key)
        return real_build_study(task, config)

    monkeypatch.setattr(pipeline, "build_study", counting)
    pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    assert len(built) == len(archive.studies) and len(set(built)) == len(built)
    assert output_bytes(out) == output_bytes(reference[0])

    pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    assert len(built) == len(archive.studies), "a finished dataset is not rebuilt"
    assert output_bytes(out) == output_bytes(reference[0])


def test_output_inside_a_source_is_not_an_input(archive, reference, tmp_path):
    """Re-running with ``--out`` inside the archive neither indexes the shards nor ``_ingest``."""
    source = tmp_path / "archive"
    shutil.copytree(archive.root, source)
    for _ in range(2):
        summary = pipeline.run_ingest([source], source / "shards", small_config(archive), workers=0)
        assert summary.files == reference[1].files


def test_resume_refuses_a_different_config(archive, reference, tmp_path):
    out = tmp_path / "out"
    pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    with pytest.raises(ValueError, match="another min_slices"):
        pipeline.run_ingest([archive.root], out, small_config(archive, min_slices=3), workers=0)
    with pytest.raises(ValueError, match="another secret_check"):
        pipeline.run_ingest([archive.root], out, small_config(archive, secret="other"), workers=0)


def test_resume_accepts_a_config_recorded_before_the_codec_was_a_setting(archive, reference, tmp_path):
    out = tmp_path / "out"
    pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    config_file = out / pipeline.INGEST_DIR / pipeline.CONFIG_FILE
    recorded = json.loads(config_file.read_text())
    del recorded["codec"]
    config_file.write_text(json.dumps(recorded))
    pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    with pytest.raises(ValueError, match="another codec"):
        pipeline.run_ingest([archive.root], out, small_config(archive, codec="lz4hc"), workers=0)


# --- real data ----------------------------------------------------------------------------


def test_real_series_are_accounted(tmp_path):
    """Real MR mosaics in nine transfer syntaxes, GE MR, and a series with a slice-count
    mismatch (plus the reference NIfTI files beside them, which are not DICOM)."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"real test data missing: {SHARED_DATA}")
    sources = [
        SHARED_DATA / "dcm_qa_ts" / "In",
        SHARED_DATA / "dicom2nifti" / "tests" / "data" / "ge" / "anatomical",
        SHARED_DATA / "dicom2nifti" / "tests" / "data" / "failing" / "slicecount",
    ]
    config = IngestConfig(allow_missing_report=True, secret="s", min_slices=4)
    summary = pipeline.run_ingest(sources, tmp_path / "out", config, workers=0)
    rows = files_table(tmp_path / "out")
    listed = iter_source_files([str(source.resolve()) for source in sources])
    assert [row["file_id"] for row in rows] == sorted(source.file_id for source in listed)
    assert summary.studies_staged >= 2
    assert summary.reasons.get("not_dicom", 0) >= 1
    dataset = ShardDataset(tmp_path / "out")
    mosaic = [row for row in rows if row["file_id"].startswith(str((SHARED_DATA / "dcm_qa_ts").resolve()))]
    assert {row["outcome"] for row in mosaic} == {pipeline.SCAN}
    assert len(dataset) == summary.studies_staged
