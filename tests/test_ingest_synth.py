"""Synthetic archives: every kind of object is there and readable, pixels survive every
transfer syntax, geometry and findings are what the summary says, bytes are deterministic."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet
from pydicom.uid import (
    BasicTextSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from hlip.ingest.deid import scrub_report
from hlip.ingest.reports import load_report_table, sr_text
from hlip.synth import (
    FINDINGS,
    KINDS,
    SCAN_KINDS,
    STUDY_KINDS,
    Sizes,
    available_transfer_syntaxes,
    make_archive,
)
from hlip.synth.encoding import file_meta, series_files
from hlip.synth.findings import brain_site
from hlip.synth.reports import report_sections, report_text
from hlip.synth.series import ct_series, mr_series
from hlip.synth.studies import plan_study
from hlip.synth.volumes import BLOOD, BULLA, FLUID, MASS, NODULE

SIZES = Sizes(ct_matrix=64, mr_matrix=64, ct_coverage_mm=100)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("synth") / "archive", n_studies=6, seed=5, sizes=SIZES)


def read_bytes(archive, file) -> bytes:
    if file.member:
        with zipfile.ZipFile(archive.root / file.path) as bundle:
            return bundle.read(file.member)
    return (archive.root / file.path).read_bytes()


def read(archive, file) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(read_bytes(archive, file)))


def series_of(archive, kind):
    """{series uid: datasets sorted along the slice normal} of loose files of ``kind``."""
    groups = {}
    for file in archive.files:
        if file.kind == kind:
            groups.setdefault(file.series_uid, []).append(read(archive, file))
    for datasets in groups.values():
        normal = np.cross(*np.reshape(datasets[0].ImageOrientationPatient, (2, 3)))
        datasets.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
    return groups


def test_every_kind_of_object_is_present(archive):
    counts = Counter(f.kind for f in archive.files)
    assert set(counts) == set(KINDS)
    used = {f.transfer_syntax for f in archive.files if f.kind in SCAN_KINDS}
    assert {str(uid) for uid in available_transfer_syntaxes()} <= used
    assert {read(archive, f).SOPClassUID for f in archive.files_of("sr_report")} == {
        BasicTextSRStorage,
        EnhancedSRStorage,
    }
    paths = [Path(f.path) for f in archive.files]
    assert any(f.member for f in archive.files)  # a zip export
    assert any(p.suffix == "" for p in paths) and any(p.suffix.lower() == ".dcm" for p in paths)
    assert max(len(p.parts) for p in paths) >= 4  # nested folders
    assert (archive.root / "reports.csv").is_file()
    assert (
        json.loads(json.dumps(archive.to_dict()))["studies"][0]["study_uid"] == archive.studies[0].study_uid
    )


def test_every_dicom_object_reads_and_decodes(archive):
    for file in archive.files:
        if file.kind in ("empty", "not_dicom", "truncated", "dicomdir"):
            continue
        ds = read(archive, file)
        assert ds.SOPInstanceUID == file.sop_instance_uid
        assert ds.file_meta.TransferSyntaxUID == file.transfer_syntax
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        if "PixelData" in ds:
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        if file.kind in SCAN_KINDS:
            assert ds.Modality in ("CT", "MR")
            assert ("RescaleSlope" in ds) == (ds.Modality == "CT")


def test_object_kinds_carry_their_markers(archive):
    for file in archive.files_of("localizer"):
        ds = read(archive, file)
        assert "LOCALIZER" in ds.ImageType or ds.SeriesDescription == "3-plane loc"
    for file in archive.files_of("ct_reformat"):
        ds = read(archive, file)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "REFORMATTED"]
        assert ds.ImageOrientationPatient[3:] == [0, 0, -1]
    for file in archive.files_of("dose_report"):
        ds = read(archive, file)
        assert (ds.SOPClassUID, list(ds.ImageType), ds.SeriesDescription) == (
            SecondaryCaptureImageStorage,
            ["DERIVED", "SECONDARY"],
            "Dose Report",
        )
        assert ds.BurnedInAnnotation == "YES" and ds.pixel_array.max() > 0
    planes = [
        {tuple(read(archive, f).ImageOrientationPatient) for f in files}
        for files in _by_series(archive, "localizer")
    ]
    assert max(len(p) for p in planes) == 3  # a 3-plane localizer in one series


def _by_series(archive, kind):
    groups = {}
    for file in archive.files_of(kind):
        groups.setdefault(file.series_uid, []).append(file)
    return list(groups.values())


def test_ct_values_and_geometry(archive):
    for datasets in series_of(archive, "ct_axial_thin").values():
        hu = np.stack(
            [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
        )
        middle = hu[len(hu) // 2]
        assert abs(middle[0, 0] + 1000) < 60  # air
        assert abs(middle[32, 32] - 40) < 60  # soft tissue between the lungs
        assert (hu < -800).mean() > 0.1  # lungs
        steps = np.diff([ds.ImagePositionPatient[2] for ds in datasets])
        assert np.allclose(steps, float(datasets[0].SliceThickness))
        numbers = [ds.InstanceNumber for ds in datasets]
        assert sorted(numbers) == list(range(1, len(datasets) + 1))


def test_gantry_tilt_shears_the_stack(archive):
    tilted = series_of(archive, "ct_axial_tilted")
    assert tilted
    for datasets in tilted.values():
        assert datasets[0].GantryDetectorTilt == 15.0
        normal = np.cross(*np.reshape(datasets[0].ImageOrientationPatient, (2, 3)))
        step = np.subtract(datasets[1].ImagePositionPatient, datasets[0].ImagePositionPatient)
        angle = np.degrees(np.arccos(abs(normal @ step) / np.linalg.norm(step)))
        assert angle == pytest.approx(15.0, abs=0.01)


def test_mr_series(archive):
    orientations = set()
    for kind in ("mr_t1", "mr_t2", "mr_flair"):
        for datasets in series_of(archive, kind).values():
            assert "RescaleIntercept" not in datasets[0]
            assert datasets[0].pixel_array.dtype == (np.int16 if kind == "mr_t2" else np.uint16)
            orientations.add(tuple(np.round(datasets[0].ImageOrientationPatient, 3)))
    assert any(abs(o[4]) not in (0.0, 1.0) for o in orientations)  # an oblique axial


def test_reports_table_matches_the_summary(archive):
    by_uid = load_report_table(archive.reports_csv)
    by_accession = load_report_table(archive.reports_csv, key_column="AccessionNumber")
    assert list(by_uid) == [s.study_uid for s in archive.studies]
    for study in archive.studies:
        report = by_uid[study.study_uid]
        assert by_accession[study.accession_number] == report
        own = {
            label
            for label, f in FINDINGS.items()
            if (f.modality, f.body_part) == (study.modality, study.body_part)
        }
        assert report.labels == {label: study.labels[label] for label in own}
        if study.report_in_sr:
            assert report.text == ""
            (sr,) = [f for f in archive.files_of("sr_report") if f.study_uid == study.study_uid]
            assert sr_text(read(archive, sr)) == study.report
        else:
            assert report.text == study.report


KEYWORDS = {
    "lung_nodule": "nodule",
    "pleural_effusion": "effusion",
    "emphysema": "emphysema",
    "mass": "mass",
    "hemorrhage": "hemorrhage",
    "hydrocephalus": "hydrocephalus",
    "intracranial_hemorrhage": "hemorrhage",
}


def test_reports_state_every_finding(archive):
    for study in archive.studies:
        impression = study.report.lower().split("impression")[-1]
        for label, value in study.labels.items():
            assert (KEYWORDS[label] in impression) == bool(value), (label, study.report)
        assert set(study.findings) == {label for label, value in study.labels.items() if value}


def test_findings_are_planted_with_their_labels():
    counts = Counter()
    for index in range(120):
        kind = list(STUDY_KINDS)[index % 3]
        study = plan_study(index, seed=11, kind=kind, sizes=Sizes())
        tissues = {shape.tissue for shape in study.phantom.shapes}
        planted = {
            "lung_nodule": NODULE in tissues,
            "pleural_effusion": FLUID in tissues,
            "emphysema": BULLA in tissues,
            "mass": MASS in tissues,
            "hemorrhage": BLOOD in tissues,
            "hydrocephalus": "hydrocephalus" in study.details,
            "intracranial_hemorrhage": BLOOD in tissues,
        }
        assert set(study.labels) == {label for label, f in FINDINGS.items() if f.kind == kind}
        for label, value in study.labels.items():
            assert planted[label] == bool(value)
            counts[label] += value
    assert all(8 <= counts[label] <= 30 for label in FINDINGS), counts  # ~45% of 40 studies


def test_head_ct_hemorrhages_vary_in_size_and_density():
    sizes = Sizes(ct_matrix=96, ct_coverage_mm=160)
    studies = [plan_study(index, seed=3, kind="CT-HEAD", sizes=sizes) for index in range(40)]
    style = studies[0].style
    bleeds = [s for s in studies if s.labels["intracranial_hemorrhage"]]
    diameters = [s.details["intracranial_hemorrhage"]["diameter"] for s in bleeds]
    densities = [s.details["intracranial_hemorrhage"]["density"] for s in bleeds]
    (low, high), (dense_low, dense_high) = style.lesion_mm["intracranial_hemorrhage"], style.ct_blood_hu
    assert low <= min(diameters) <= low + 4 and high - 4 <= max(diameters) <= high
    assert dense_low <= min(densities) <= dense_low + 8 and dense_high - 8 <= max(densities) <= dense_high
    study = max(bleeds, key=lambda s: s.details["intracranial_hemorrhage"]["diameter"])
    thin = next(s for s in ct_series(study, sizes) if s.kind == "ct_axial_thin")
    assert (thin.template.BodyPartExamined, thin.template.StudyDescription) == (
        "HEAD",
        "CT HEAD WITHOUT CONTRAST",
    )
    (blood,) = [shape for shape in study.phantom.shapes if shape.tissue == BLOOD]
    positions = np.array([i.ImagePositionPatient for i in thin.instances])
    k = int(np.argmin(abs(positions[:, 2] - blood.center[2])))
    spacing = thin.instances[k].PixelSpacing
    col, row = ((np.array(blood.center[:2]) - positions[k, :2]) / spacing).round().astype(int)
    window = (
        thin.pixels[k, row - 1 : row + 2, col - 1 : col + 2].astype(float) + thin.template.RescaleIntercept
    )
    density = study.details["intracranial_hemorrhage"]["density"]
    offset = style.ct_offset_hu[study.scanner[1]]  # the scanner's calibration error
    assert abs(window.mean() - density - offset) < 12  # 7-15 HU noise over 9 voxels
    assert study.hu[BLOOD] == density
    assert next(s for s in studies if s not in bleeds).hu[BLOOD] == 60  # the default table


def test_each_seed_draws_its_own_wording_sizes_intensities_and_scanners():
    """Two archives (seeds) differ in report wording, lesion size ranges, lesion contrast and
    scanner calibration; one seed's studies share its draw."""
    styles = [plan_study(0, seed, "CT", Sizes()).style for seed in (0, 1)]
    assert plan_study(5, 0, "MR", Sizes()).style is styles[0]
    assert styles[0].wording != styles[1].wording and styles[0].normal != styles[1].normal
    assert styles[0].lesion_mm != styles[1].lesion_mm and styles[0].nodule_hu != styles[1].nodule_hu
    assert styles[0].ct_offset_hu != styles[1].ct_offset_hu
    findings = []
    for seed in (0, 1):
        sentences = set()
        for index in range(0, 90, 3):
            study = plan_study(index, seed, "CT", Sizes())
            text = report_text(report_sections(study), capitals=True)
            sentences |= set(text.split("FINDINGS:\n")[1].split("\n\n")[0].splitlines())
            for diameter, _lobe in study.details.get("lung_nodule", {}).get("nodules", []):
                low, high = study.style.lesion_mm["lung_nodule"]
                assert low <= diameter <= high
        findings.append(sentences)
    shared = findings[0] & findings[1]
    assert len(shared) < 0.7 * min(map(len, findings)), shared  # most sentences are the archive's own


def test_phi_is_in_headers_and_reports_and_scrubbable(archive):
    mentioned = 0
    for study in archive.studies:
        (first, *_) = [f for f in archive.files if f.study_uid == study.study_uid and f.kind in SCAN_KINDS]
        header = read(archive, first)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            assert str(header[keyword].value) == study.phi[keyword]
        mentioned += any(value in study.report for value in archive.phi_values)
        scrubbed = scrub_report(study.report, study.phi)
        assert not [value for value in archive.phi_values if value in scrubbed]
    assert mentioned == len(archive.studies)


def test_broken_and_extra_files(archive):
    (truncated,) = archive.files_of("truncated")
    with pytest.raises(Exception):  # noqa: B017 - any decoding error will do
        read(archive, truncated).pixel_array  # noqa: B018
    (empty,) = archive.files_of("empty")
    assert (archive.root / empty.path).stat().st_size == 0
    for junk in archive.files_of("not_dicom"):
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(archive.root / junk.path)
    (duplicate,) = archive.files_of("duplicate")
    originals = [
        f for f in archive.files if f.sop_instance_uid == duplicate.sop_instance_uid and f.kind in SCAN_KINDS
    ]
    assert read_bytes(archive, duplicate) == read_bytes(archive, originals[0])
    (dicomdir,) = archive.files_of("dicomdir")
    file_set = FileSet(pydicom.dcmread(archive.root / dicomdir.path))
    folder = Path(dicomdir.path).parent.as_posix() + "/"
    members = {
        f.sop_instance_uid for f in archive.files if f.path.startswith(folder) and f.kind != "dicomdir"
    }
    assert {instance.SOPInstanceUID for instance in file_set} == members


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path, monkeypatch):
    small = Sizes(ct_matrix=32, mr_matrix=32, ct_coverage_mm=80)
    first = tree_digest(make_archive(tmp_path / "a", n_studies=4, seed=1, sizes=small).root)
    second = tree_digest(make_archive(tmp_path / "b", n_studies=4, seed=1, sizes=small).root)
    assert first == second
    monkeypatch.chdir(tmp_path)  # a relative output directory writes the same archive
    assert tree_digest(make_archive("relative", n_studies=4, seed=1, sizes=small).root) == first
    parallel = make_archive(tmp_path / "workers", n_studies=4, seed=1, sizes=small, workers=2)
    assert tree_digest(parallel.root) == first  # studies written by two processes: the same archive
    other = make_archive(tmp_path / "c", n_studies=1, seed=2, sizes=small).reports_csv.read_text()
    assert (tmp_path / "a" / "reports.csv").read_text().splitlines()[1] != other.splitlines()[1]
    with pytest.raises(FileExistsError):
        make_archive(tmp_path / "a", n_studies=1)


@pytest.mark.parametrize("syntax", available_transfer_syntaxes(), ids=lambda uid: uid.name)
def test_series_files_decode_exactly_and_match_pydicom(tmp_path, syntax):
    for index, modality in ((0, "CT"), (1, "CT"), (3, "MR")):  # unsigned and signed CT, MR
        study = plan_study(index, seed=0, kind=modality, sizes=SIZES)
        build = ct_series if modality == "CT" else mr_series
        series = build(study, SIZES)[2 if modality == "CT" else 2]
        series.transfer_syntax = syntax
        files = series_files(series, tmp_path)
        for i in (0, len(files) - 1):
            ds = pydicom.dcmread(io.BytesIO(files[i]))
            np.testing.assert_array_equal(ds.pixel_array, series.pixels[i])
            if not syntax.is_compressed:
                assert files[i] == _pydicom_bytes(series, i)


def _pydicom_bytes(series, i: int) -> bytes:
    """The same instance written by pydicom's own writer from one full data set."""
    ds = pydicom.Dataset()
    ds.update(series.template)
    ds.update(series.instances[i])
    ds.PixelData = series.pixels[i].astype(series.pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, series.transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_transfer_syntaxes_can_be_chosen(tmp_path):
    small = Sizes(ct_matrix=32, mr_matrix=32, ct_coverage_mm=80)
    archive = make_archive(
        tmp_path / "plain", n_studies=2, sizes=small, transfer_syntaxes=[ExplicitVRLittleEndian]
    )
    assert {f.transfer_syntax for f in archive.files if f.transfer_syntax} == {ExplicitVRLittleEndian}
    with pytest.raises(ValueError, match="cannot encode"):
        make_archive(tmp_path / "none", n_studies=1, transfer_syntaxes=[])


def test_lesion_scale_scales_planted_lesions_and_reports():
    diameters = {}
    for scale in (1.0, 2.0):
        sizes = Sizes(lesion_scale=scale, ct_coverage_mm=200)
        study = next(s for i in range(0, 40, 2) if (s := plan_study(i, 0, "CT", sizes)).labels["lung_nodule"])
        diameters[scale] = study.details["lung_nodule"]["nodules"][0][0]
        semi = max(shape.semi[0] for shape in study.phantom.shapes if shape.tissue == NODULE)
        assert semi * 2 == diameters[scale]
    assert diameters[2.0] == pytest.approx(2 * diameters[1.0], abs=1)
    with pytest.raises(ValueError, match="lesion_scale"):
        Sizes(lesion_scale=3.0, ct_coverage_mm=400)


@pytest.mark.parametrize("radius", [7.5, 17.0, 34.0])  # smallest hematoma .. largest mass at scale 2
def test_brain_sites_exist_for_every_lesion_size(radius):
    rng = np.random.default_rng(0)
    for _ in range(50):
        point, side, _lobe = brain_site(rng, 0.0, 0.94, radius)
        assert abs(point[0]) > min(radius * 0.5 + 22, 0.75 * (47 - radius * 0.6)) - 1e-9
        assert side == ("left" if point[0] > 0 else "right")
