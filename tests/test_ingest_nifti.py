"""NIfTI collections: RAS -> LPS and [i, j, k] -> [d, h, w] keep every voxel's world position;
tables group volumes into studies (CT-RATE layout included) with reports, labels and HU."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hlip.ingest.deid import study_key
from hlip.ingest.nifti import (
    CT_RATE_LABELS,
    CT_RATE_SPEC,
    NiftiError,
    NiftiTableSpec,
    ct_rate_study_id,
    ct_rate_table,
    iter_nifti_studies,
    nifti_to_dhw_lps,
    plan_nifti_studies,
)

SECRET = b"nifti-test"


def rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rx @ rz @ ry


affines = st.builds(
    lambda perm, signs, angles, spacing, origin: _affine(perm, signs, angles, spacing, origin),
    st.permutations([0, 1, 2]),
    st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3),
    st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
    st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3),
    st.lists(st.floats(-300, 300), min_size=3, max_size=3),
)


def _affine(perm, signs, angles, spacing, origin) -> np.ndarray:
    """A voxel -> RAS affine: axes permuted and flipped, then rotated up to ~30 degrees."""
    axes = np.eye(3)[:, perm] * signs * spacing
    affine = np.eye(4)
    affine[:3, :3] = rotation(angles) @ axes
    affine[:3, 3] = origin
    return affine


@settings(max_examples=80, deadline=None)
@given(affine=affines, data=arrays(np.int16, st.tuples(*[st.integers(1, 5)] * 3), unique=False))
def test_every_voxel_keeps_its_world_position(affine, data):
    array, lps_affine = nifti_to_dhw_lps(data, affine)
    assert array.shape == tuple(data.shape[::-1])
    assert np.allclose(
        np.linalg.norm(lps_affine[:3, :3], axis=0), np.linalg.norm(affine[:3, [2, 1, 0]], axis=0)
    )
    inverse = np.linalg.inv(lps_affine)
    for ijk in np.ndindex(data.shape):
        lps = np.diag([-1, -1, 1, 1]) @ affine @ np.array([*ijk, 1.0])
        dhw = inverse @ lps
        index = tuple(int(v) for v in np.rint(dhw[:3]))
        assert np.allclose(dhw[:3], index, atol=1e-6)
        assert array[index] == data[ijk]
    for axis in range(3):  # each axis runs towards L, P or S
        column = lps_affine[:3, axis]
        assert column[np.argmax(np.abs(column))] > 0


def test_axial_volume_reads_like_dicom():
    # dcm2niix-style axial: i -> left (RAS -x), j -> anterior, k -> superior
    affine = np.diag([-0.8, 0.8, 2.0, 1.0])
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    array, lps = nifti_to_dhw_lps(data, affine)
    assert array.shape == (6, 5, 4)
    expected = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, -3.2], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(lps, expected)  # rows run anterior -> posterior, like DICOM
    assert array[0, 0, 0] == data[0, 4, 0]


def write_volume(path, data, affine, slope=None, inter=None):
    image = nib.Nifti1Image(data, affine)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def world(affine, index):
    return (affine @ np.array([*index, 1.0]))[:3]


def test_collection_round_trip_csv(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 3000, (6, 7, 5)).astype(np.int16)
    affine = _affine([1, 0, 2], [1.0, -1.0, 1.0], [0.1, -0.2, 0.05], [0.7, 0.9, 2.5], [10.0, -20.0, 30.0])
    write_volume(tmp_path / "vol" / "a1.nii.gz", raw, affine, slope=2.0, inter=-100.0)
    write_volume(tmp_path / "vol" / "a2.nii.gz", raw[::-1].copy(), np.diag([1.0, 1.0, 1.0, 1.0]))
    write_volume(tmp_path / "vol" / "b.nii", raw, np.diag([-1.0, -1.0, 3.0, 1.0]))
    rows = [
        {"study_id": "a", "volumes": "vol/a1.nii.gz;vol/a2.nii.gz", "report": "Nodule.", "RescaleSlope": "1;1", "RescaleIntercept": "-1024;0", "nodule": 1},
        {"study_id": "b", "volumes": "vol/b.nii", "report": "Normal.", "RescaleSlope": "1", "RescaleIntercept": None, "nodule": 0},
    ]  # fmt: skip
    pa_csv.write_csv(pa.Table.from_pylist(rows), tmp_path / "collection.csv")
    studies = list(iter_nifti_studies(tmp_path / "collection.csv", secret=SECRET, config_hash="abc"))
    assert [s.key for s in studies] == [study_key("a", SECRET), study_key("b", SECRET)]
    a, b = studies
    assert (a.report, a.labels, a.modality, a.config_hash) == ("Nodule.", {"nodule": 1}, "CT", "abc")
    assert [scan.name for scan in a.scans] == ["1", "2"]
    first = a.scans[0]
    assert first.array.dtype == np.int16 and first.intensity_unit == "HU"
    expected_hu = raw * 2.0 - 100.0 - 1024.0  # NIfTI scaling, then the table's intercept
    inverse = np.linalg.inv(first.affine)
    for ijk in [(0, 0, 0), (5, 6, 4), (2, 3, 1)]:
        lps = np.diag([-1, -1, 1]) @ world(affine, ijk)
        dhw = tuple(int(v) for v in np.rint((inverse @ np.array([*lps, 1.0]))[:3]))
        assert first.array[dhw] == expected_hu[ijk]
    assert np.allclose(first.spacing, [2.5, 0.9, 0.7])
    assert np.array_equal(b.scans[0].array, raw.transpose(2, 1, 0))  # already L, P, S after RAS -> LPS
    assert b.scans[0].name == "volume0"


def test_collection_parquet_with_lists_and_mr_scaling(tmp_path):
    values = np.linspace(0, 2.5, 60, dtype=np.float32).reshape(3, 4, 5)
    write_volume(tmp_path / "m.nii.gz", values, np.eye(4))
    rows = [{"study_id": "m", "volumes": ["m.nii.gz"], "report": "ok", "modality": "MR", "score": 0.5}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (study,) = iter_nifti_studies(
        tmp_path / "c.parquet", NiftiTableSpec(label_columns=["score"]), secret=SECRET
    )
    scan = study.scans[0]
    assert scan.modality == "MR" and scan.intensity_unit == ""
    np.testing.assert_allclose(
        scan.array * scan.intensity_slope, values.transpose(2, 1, 0)[:, ::-1, ::-1], atol=scan.intensity_slope
    )
    assert study.labels == {"score": 0.5}


def test_ct_rate_layout(tmp_path):
    root = tmp_path / "dataset" / "train_fixed"
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for name in ("train_1_a_1", "train_1_a_2", "train_2_a_1"):
        write_volume(
            root / name.rsplit("_", 2)[0] / name[: -len("_1")] / f"{name}.nii.gz",
            raw,
            np.diag([-0.7, -0.7, 1.5, 1.0]),
        )
    reports = [
        {"VolumeName": f"{n}.nii.gz", "ClinicalInformation_EN": "Cough.", "Findings_EN": f"Findings of {n}.", "Impressions_EN": "Impression."}
        for n in ("train_1_a_1", "train_1_a_2", "train_2_a_1", "train_3_a_1")
    ]  # fmt: skip
    labels = [
        {"VolumeName": f"{n}.nii.gz", **{c: 0 for c in CT_RATE_LABELS}}
        for n in ("train_1_a_1", "train_1_a_2", "train_2_a_1")
    ]
    labels[1]["Lung nodule"] = 1
    metadata = [
        {"VolumeName": f"{n}.nii.gz", "RescaleSlope": 1.0, "RescaleIntercept": -1024.0}
        for n in ("train_1_a_1", "train_1_a_2", "train_2_a_1")
    ]
    for name, table in (("reports", reports), ("labels", labels), ("metadata", metadata)):
        pa_csv.write_csv(pa.Table.from_pylist(table), tmp_path / f"{name}.csv")
    table = ct_rate_table(
        tmp_path / "reports.csv", tmp_path / "dataset", tmp_path / "labels.csv", tmp_path / "metadata.csv"
    )
    assert table.num_rows == 3  # train_3_a_1 has no volume
    plans = plan_nifti_studies(table, CT_RATE_SPEC)
    assert [(p.study_id, len(p.volumes)) for p in plans] == [("train_1_a", 2), ("train_2_a", 1)]
    assert plans[0].report == "Findings:\nFindings of train_1_a_1.\n\nImpression:\nImpression."
    assert plans[0].labels["Lung nodule"] == 1 and plans[1].labels["Lung nodule"] == 0
    assert set(plans[0].labels) == set(CT_RATE_LABELS)
    (study, _) = iter_nifti_studies(table, CT_RATE_SPEC, secret=SECRET)
    assert study.body_part == "CHEST"
    assert [s.name for s in study.scans] == ["1", "2"]
    assert study.scans[0].array.min() == -1024
    assert ct_rate_study_id("valid_12_b_3.nii.gz") == "valid_12_b"


def test_errors_are_clear(tmp_path):
    missing = pa.Table.from_pylist([{"study_id": "x", "volumes": "nope.nii.gz", "report": ""}])
    with pytest.raises(NiftiError, match="nope.nii.gz"):
        list(iter_nifti_studies(missing, secret=SECRET))
    write_volume(tmp_path / "v.nii.gz", np.zeros((2, 2, 2, 3), np.int16), np.eye(4))
    four_d = pa.Table.from_pylist([{"study_id": "x", "volumes": str(tmp_path / "v.nii.gz"), "report": ""}])
    with pytest.raises(NiftiError, match="3-D"):
        list(iter_nifti_studies(four_d, secret=SECRET))
    mismatch = pa.Table.from_pylist(
        [{"study_id": "x", "volumes": "a;b", "report": "", "RescaleSlope": "1;2;3"}]
    )
    with pytest.raises(NiftiError, match="3 values for 2 volumes"):
        plan_nifti_studies(mismatch)
    spec = NiftiTableSpec(text_columns=("Findings_EN",))
    with pytest.raises(ValueError, match="Findings_EN"):
        plan_nifti_studies(missing, spec)
    assert json.dumps(plan_nifti_studies(missing)[0].labels) == "{}"
