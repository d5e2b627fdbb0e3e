"""Real DICOM from the dcm2niix, dicom2nifti and pydicom validation suites, judged in world space.

Every reference volume of ``../shared/data`` is one parametrised case whose id says how it
ends: ``match`` (same shape, affine within 1e-3 mm, identical voxels), ``rejected-<reason>``
(the reference suite expects a refusal, or our rules refuse it), or an explained
difference (``stored``, ``float32``, ``quantised``, ``reversed-mosaic``,
``broken-reference``, ``tilt``), each documented in docs/ingest.md ("Volumes and
geometry", reference results). Scans are built on their native grid.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from hlip.ingest.geometry import lps_to_ras
from hlip.ingest.index import index_sources
from hlip.ingest.mosaic import protocol_slice_centres
from hlip.ingest.plan import REASONS, Plan, PlanConfig, plan
from hlip.ingest.volume import ScanRejected, VolumeConfig, build_scan, decode_frames

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
AFFINE_TOLERANCE_MM = 1e-3
D2N = "dicom2nifti/tests/data"


def shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        raise FileNotFoundError(f"shared test data missing: {path} (clone shared/ beside the repository)")
    return path


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One reference volume (or expected refusal) and the scans of ours it is judged against.

    ``scans`` are scan names in the order of the reference's volumes (None: every scan of
    the plan, by series and volume). ``subset`` restricts a refusal to files under a path.
    """

    id: str
    source: str
    outcome: str
    reference: str | None = None
    scans: tuple[str, ...] | None = None
    reason: str = ""
    subset: str = ""
    min_slices: int = 2


def _dcm_qa_cases() -> list[Case]:
    cases = [
        Case(f"dcm_qa_ts/{n}", "dcm_qa_ts/In", "match", f"dcm_qa_ts/Ref/{n}.nii", (str(n),), min_slices=5)
        for n in range(1, 10)
    ]
    cases += [
        Case(
            f"dcm_qa_nih/GE/{n}",
            "dcm_qa_nih/In/20180918GE",
            "match",
            f"dcm_qa_nih/Ref/DCM2NIIX_regression_test_{n}.nii",
            tuple(f"{n}_t{t}" for t in range(10)),
            min_slices=5,
        )
        for n in (4, 5, 6, 7)
    ]
    cases += [
        Case(
            f"dcm_qa_nih/Siemens/{n}",
            "dcm_qa_nih/In/20180918Si",
            "match",
            f"dcm_qa_nih/Ref/EPI_PE={pe}_{n}.nii",
            (f"{n}_t0", f"{n}_t1"),
            min_slices=5,
        )
        for n, pe in ((3, "AP"), (4, "PA"), (5, "RL"), (6, "LR"))
    ]
    for exam, laser in ((1486, 794), (1487, 711)):
        source = f"dcm_qa_table/In/GE/Exam{exam}_Laser{laser}mm"
        cases += [
            Case(
                f"dcm_qa_table/GE/{exam}/{n}",
                source,
                "match",
                f"dcm_qa_table/Ref/GE_{exam}_{n}_Ax_fMRI.nii",
                tuple(f"{n}_t{t}" for t in range(5)),
                min_slices=5,
            )
            for n in (2, 3, 4, 6, 7, 8)
        ]
        cases += [
            Case(
                f"dcm_qa_table/GE/{exam}/{n}",
                source,
                "rejected",
                reason="localizer",
                subset=folder,
                min_slices=5,
            )
            for n, folder in ((1, "01_3_Plane_Localizer_FF"), (5, "05_3_Plane_Localizer_HF"))
        ]
    philips = {1301: "Dual-echo_iso", 2201: "Dual-echo_FH-60_table_moved"}
    cases += [
        Case(
            f"dcm_qa_table/Philips/{n}_e{echo}{part}",
            "dcm_qa_table/In/Ph",
            "stored",
            f"dcm_qa_table/Ref/Ph_727468159_{n}_{name}_e{echo}{part}.nii",
            (f"{n}_e{echo}{part}",),
            min_slices=5,
        )
        for n, name in philips.items()
        for echo in (1, 2)
        for part in ("", "_ph")
    ]
    return cases


_D2N_OUTCOMES = {
    "ge/anatomical/001_single_slice": ("rejected", "too_few_slices"),
    "generic/rgb/001": ("rejected", "secondary_capture"),
    "generic/anatomical/002_non_isotropic": ("quantised", ""),
    "philips_enhanced/anatomical/001": ("float32", ""),
    "philips_enhanced/anatomical/001_implicit": ("float32", ""),
    "philips_enhanced/fmri/001": ("float32", ""),
    "philips_enhanced/fmri/001_implicit": ("float32", ""),
    "philips_enhanced/dti/001": ("broken-reference", ""),
    "philips_enhanced/dti/001_implicit": ("broken-reference", ""),
    "siemens/dti/001": ("reversed-mosaic", ""),
    "siemens/dti/001_implicit": ("reversed-mosaic", ""),
    "siemens/fmri/001": ("reversed-mosaic", ""),
    "siemens/fmri/001_implicit": ("reversed-mosaic", ""),
    "failing/sliceincrement/002": ("rejected", "missing_slices"),
}
_D2N_FAILING = {
    "failing/sliceincrement/001": "missing_slices",
    "failing/notavolume/001": "not_a_volume",
    "failing/slicecount/001": "too_few_slices",
    "failing/sliceorientation/001": "too_few_slices",
}
D2N_WITHOUT_DICOM = {
    "sirona_multiframe/anatomical/001": "the DICOM file is over 4 MiB and absent from shared/"
}


def _dicom2nifti_cases() -> list[Case]:
    cases = []
    for truth in sorted(shared(D2N).rglob("*_ground_truth.nii.gz")):
        folder = truth.relative_to(shared(D2N)).as_posix().removesuffix("_ground_truth.nii.gz")
        if folder in D2N_WITHOUT_DICOM:
            continue
        outcome, reason = _D2N_OUTCOMES.get(folder, ("match", ""))
        cases.append(
            Case(
                f"dicom2nifti/{folder}",
                f"{D2N}/{folder}",
                outcome,
                truth.relative_to(SHARED).as_posix(),
                reason=reason,
            )
        )
    # The failing/ series a converter must refuse, judged with the default rules (min_slices=5).
    cases += [
        Case(
            f"dicom2nifti/{folder}/default-rules", f"{D2N}/{folder}", "rejected", reason=reason, min_slices=5
        )
        for folder, reason in _D2N_FAILING.items()
    ]
    cases.append(Case("dicom2nifti/failing/gantrytilting/001", f"{D2N}/failing/gantrytilting/001", "tilt"))
    return cases


CASES = _dcm_qa_cases() + _dicom2nifti_cases()


def case_id(case: Case) -> str:
    return f"{case.id}:{case.outcome}{'-' + case.reason if case.reason else ''}"


@functools.lru_cache(maxsize=8)
def planned(source: str, min_slices: int) -> tuple[Plan, dict[str, dict]]:
    """Index and plan one source folder (cached per process; tests only read the result)."""
    table = index_sources(shared(source))
    return plan(table, PlanConfig(min_slices=min_slices)), {r["file_id"]: r for r in table.to_pylist()}


def selected_scans(case: Case) -> list:
    result, _ = planned(case.source, case.min_slices)
    scans = [scan for study in result.studies for scan in study.scans]
    if case.scans is None:
        return sorted(scans, key=lambda s: (s.series_number or 0, s.volume_index))
    by_name = {scan.name: scan for scan in scans}
    missing = [name for name in case.scans if name not in by_name]
    assert not missing, f"planned scans {sorted(by_name)} lack {missing}; rejects: {result.rejects[:5]}"
    return [by_name[name] for name in case.scans]


def built(case: Case) -> list:
    _, rows = planned(case.source, case.min_slices)
    return [build_scan(scan, rows, VolumeConfig.native()) for scan in selected_scans(case)]


# --------------------------------------------------------------------------- comparison


def in_reference_frame(scan, reference_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our physical values and RAS affine, with axes permuted/flipped to the reference's."""
    affine = lps_to_ras(scan.affine)
    physical = np.asarray(scan.array, dtype=np.float64) * scan.intensity_slope + scan.intensity_intercept
    transform = ornt_transform(io_orientation(affine), io_orientation(reference_affine))
    return apply_orientation(physical, transform), affine @ inv_ornt_aff(transform, physical.shape)


def reference_volumes(
    path: Path, n_volumes: int, unscaled: bool = False
) -> tuple[list[np.ndarray], np.ndarray]:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj.get_unscaled() if unscaled else image.dataobj).astype(np.float64)
    if data.ndim == 3:
        data = data[..., None]
    assert data.shape[3] == n_volumes, f"reference has {data.shape[3]} volumes, we planned {n_volumes}"
    return [data[..., t] for t in range(n_volumes)], image.affine


def assert_same_grid(
    ours: np.ndarray, affine: np.ndarray, reference: np.ndarray, reference_affine: np.ndarray
):
    assert ours.shape == reference.shape
    assert np.abs(affine - reference_affine).max() < AFFINE_TOLERANCE_MM


# --------------------------------------------------------------------------- reference cases


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.outcome in ("match", "stored", "float32", "quantised")], ids=case_id
)
def test_rebuilt_scans_match_their_reference(case):
    scans = built(case)
    _, rows = planned(case.source, case.min_slices)
    references, reference_affine = reference_volumes(
        shared(case.reference), len(scans), case.outcome == "stored"
    )
    for scan, plan_scan, reference in zip(scans, selected_scans(case), references, strict=True):
        ours, affine = in_reference_frame(scan, reference_affine)
        assert_same_grid(ours, affine, reference, reference_affine)
        if case.outcome == "stored":
            # dcm2niix keeps Philips stored values with the private floating-point scale;
            # the DICOM RescaleSlope/Intercept of the same stored values give ours.
            header = rows[plan_scan.files[0]]
            reference = reference * header["RescaleSlope"] + header["RescaleIntercept"]
            np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-9)
        elif case.outcome == "float32":
            np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
        elif case.outcome == "quantised":
            assert not scan.extra["lossless_intensity"]
            assert np.abs(ours - reference).max() <= scan.intensity_slope / 2 * 1.0001
        else:
            assert np.array_equal(ours, reference)


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "reversed-mosaic"], ids=case_id)
def test_mosaics_numbered_head_to_feet_lie_where_the_protocol_puts_them(case):
    """These anonymised mosaics lost their CSA image header; the protocol numbers the
    images head to feet (sSliceArray.ucImageNumbTra), so tile 0 is the top slice, at the
    mosaic's ImagePositionPatient, and the tiles run down. dicom2nifti (like dcm2niix)
    stacks the same tiles upwards from that position, so its volume is ours moved by the
    slab length. We check the voxels against it, and our slab against the protocol."""
    scans = built(case)
    references, reference_affine = reference_volumes(shared(case.reference), len(scans))
    shifted = reference_affine.copy()
    shifted[:3, 3] -= (references[0].shape[2] - 1) * reference_affine[:3, 2]
    for scan, reference in zip(scans, references, strict=True):
        ours, affine = in_reference_frame(scan, shifted)
        assert_same_grid(ours, affine, reference, shifted)
        assert np.array_equal(ours, reference)
    plan_scan = selected_scans(case)[0]
    header = pydicom.dcmread(plan_scan.files[0], stop_before_pixels=True)
    prescribed = protocol_slice_centres(header, len(plan_scan.slices))
    normal = scans[0].affine[:3, 0] / np.linalg.norm(scans[0].affine[:3, 0])
    centre = (np.array(scans[0].shape[1:]) - 1) / 2
    ends = [scans[0].affine @ [d, *centre, 1] for d in (0, scans[0].shape[0] - 1)]
    ours_along = sorted(float(end[:3] @ normal) for end in ends)
    assert ours_along == pytest.approx(sorted(float(c @ normal) for c in prescribed), abs=0.5)


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "broken-reference"], ids=case_id)
def test_broken_reference_volume_still_matches_where_it_holds_data(case):
    """dicom2nifti's ground truth for this 32-frame excerpt holds one non-zero volume (the
    last frame of each slice position, our volume 3) and three all-zero volumes."""
    scans = built(case)
    references, reference_affine = reference_volumes(shared(case.reference), len(scans))
    assert all(not reference.any() for reference in references[1:])
    ours, affine = in_reference_frame(scans[3], reference_affine)
    assert_same_grid(ours, affine, references[0], reference_affine)
    np.testing.assert_allclose(ours, references[0], rtol=1e-6, atol=1e-6)
    assert all(in_reference_frame(scan, reference_affine)[0].any() for scan in scans)


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "rejected"], ids=case_id)
def test_refused_series_are_rejected_with_the_expected_reason(case):
    result, rows = planned(case.source, case.min_slices)
    root = os.path.abspath(shared(case.source) / case.subset)
    images = {
        f for f, r in rows.items() if f.startswith(root) and not (r["error"] or "").startswith("not_dicom")
    }
    scanned = {f for study in result.studies for scan in study.scans for f in scan.files}
    assert images and not images & scanned
    assert {r.reason for r in result.rejects if r.file_id in images} == {case.reason}


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "tilt"], ids=case_id)
def test_gantry_tilt_matches_dcm2niix_tilt_correction(case, tmp_path):
    """dicom2nifti refuses this tilted CT; we correct it like dcm2niix's ``_Tilt_1`` output.
    Same grid and voxels, except that where an output row falls less than one pixel past
    the last input row dcm2niix repeats that row and we write the fill value (air)."""
    dcm2niix = shutil.which(
        "dcm2niix", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if dcm2niix is None:
        pytest.skip("dcm2niix (a dev dependency) is not installed")
    subprocess.run(
        [dcm2niix, "-z", "n", "-f", "tilt", "-o", str(tmp_path), str(shared(case.source))],
        check=True,
        capture_output=True,
    )
    (reference,), reference_affine = reference_volumes(tmp_path / "tilt_Tilt_1.nii", 1)
    (scan,) = built(case)
    assert scan.extra["tilt_corrected"]
    ours, affine = in_reference_frame(scan, reference_affine)
    assert_same_grid(ours, affine, reference, reference_affine)
    differ = ours != reference
    fill = ours.min()
    assert np.all(ours[differ] == fill)
    # At most one row per slice differs (the row just past the last input row).
    rows_per_slice = [np.unique(np.nonzero(differ[..., k])[1]).size for k in range(differ.shape[2])]
    assert max(rows_per_slice) <= 1 and np.array_equal(ours[~differ], reference[~differ])


def test_every_reference_volume_has_a_case():
    used = {case.reference for case in CASES if case.reference}
    references = {p.relative_to(SHARED).as_posix() for p in SHARED.glob("dcm_qa_*/Ref/*.nii")}
    references |= {p.relative_to(SHARED).as_posix() for p in shared(D2N).rglob("*_ground_truth.nii.gz")}
    uncovered = references - used
    absent = {f"{D2N}/{folder}_ground_truth.nii.gz" for folder in D2N_WITHOUT_DICOM}
    assert uncovered == absent


# --------------------------------------------------------------------------- codecs


PYDICOM_DATA = "pydicom_data/data_store/data"
CODEC_PAIRS = [
    *[
        ("emri_small.dcm", f"emri_small_{v}.dcm")
        for v in ("RLE", "big_endian", "jpeg_2k_lossless", "jpeg_ls_lossless")
    ],
    ("liver.dcm", "liver_expb.dcm"),
    ("liver.dcm", "liver_j2k.dcm"),
    ("liver_nonbyte_aligned.dcm", "liver_nonbyte_aligned_j2k.dcm"),
    ("693_UNCR.dcm", "693_J2KR.dcm"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    *[("OBXXXX1A.dcm", f"OBXXXX1A_{v}.dcm") for v in ("expb", "rle")],
    *[("OBXXXX1A_2frame.dcm", f"OBXXXX1A_{v}_2frame.dcm") for v in ("expb", "rle")],
]
PYDICOM_WHEEL_PAIRS = [
    ("MR_small.dcm", f"MR_small_{v}.dcm")
    for v in ("RLE", "bigendian", "expb", "implicit", "jp2klossless", "jpeg_ls_lossless", "padded")
]


def pydicom_wheel_file(name: str) -> Path:
    return Path(pydicom.data.get_testdata_file(name))


def decoded(path: Path) -> np.ndarray:
    (row,) = index_sources(path).to_pylist()
    assert row["error"] is None, row["error"]
    return decode_frames(row)


@pytest.mark.parametrize(("reference", "other"), CODEC_PAIRS, ids=lambda n: n)
def test_transfer_syntaxes_decode_to_the_same_pixels(reference, other):
    expected = decoded(shared(f"{PYDICOM_DATA}/{reference}"))
    assert np.array_equal(decoded(shared(f"{PYDICOM_DATA}/{other}")), expected)


@pytest.mark.parametrize(("reference", "other"), PYDICOM_WHEEL_PAIRS, ids=lambda n: n)
def test_pydicom_sample_syntaxes_decode_to_the_same_pixels(reference, other):
    assert np.array_equal(decoded(pydicom_wheel_file(other)), decoded(pydicom_wheel_file(reference)))


def test_deflated_transfer_syntax_is_indexed_and_decoded(tmp_path):
    source = pydicom_wheel_file("CT_small.dcm")
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert np.array_equal(decoded(tmp_path / "deflated.dcm"), decoded(source))


# --------------------------------------------------------------------------- broken inputs


def broken_files(folder: Path) -> Path:
    """Zero-byte, non-DICOM, truncated and random files, loose and inside a zip."""
    ct = pydicom_wheel_file("CT_small.dcm").read_bytes()
    jpeg = pydicom_wheel_file("JPEG2000.dcm").read_bytes()
    rng = np.random.default_rng(0)
    contents = {
        "empty": b"",
        "notes.txt": b"not an image\n",
        "random": rng.bytes(3000),
        "random_with_prefix": b"\0" * 128 + b"DICM" + rng.bytes(3000),
        **{f"ct_cut_{n}": ct[:n] for n in (200, 700, 3000, 10000, len(ct) - 5000)},
        **{f"jpeg_cut_{n}": jpeg[:n] for n in (1000, len(jpeg) - 50)},
    }
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    with zipfile.ZipFile(folder / "export.zip", "w") as zf:
        for name, data in contents.items():
            zf.writestr(f"inner/{name}", data)
    return folder


def test_broken_and_unusual_files_end_in_a_reason_never_an_exception(tmp_path):
    sources = [
        shared(PYDICOM_DATA),
        pydicom_wheel_file("CT_small.dcm").parent,
        shared(f"{D2N}/failing"),
        broken_files(tmp_path / "broken"),
    ]
    table = index_sources(sources)
    result = plan(table, PlanConfig(min_slices=1))
    outcomes = result.outcomes()
    assert set(outcomes) == set(table.column("file_id").to_pylist())
    assert all(detail in REASONS for kind, detail in outcomes.values() if kind == "rejected")
    rows = {r["file_id"]: r for r in table.to_pylist()}
    built_count, refused = 0, {}
    for study in result.studies:
        for scan in study.scans:
            for config in (VolumeConfig.native(), VolumeConfig()):
                try:
                    build_scan(scan, rows, config)
                    built_count += 1
                except ScanRejected as exc:
                    assert exc.reason in REASONS
                    refused[scan.name] = exc.reason
    assert built_count > 10
    broken = {f: o for f, o in outcomes.items() if "/broken/" in f}
    assert all(kind == "rejected" for kind, _ in broken.values())
    expected = {"empty", "not_dicom", "truncated", "unreadable", "no_pixel_data", "duplicate_instance"}
    assert {detail for _, detail in broken.values()} <= expected
