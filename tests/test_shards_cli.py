"""hlip-shards CLI: ls, stats, show, verify (finds damage, names the study), export (NIfTI)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from hlip.shards.cli import app
from hlip.shards.format import Scan, Study
from hlip.shards.inspect import nifti_affine, verify_dataset
from hlip.shards.reader import ShardDataset
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import DatasetWriter, encode_study, write_dataset

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
REAL_NIFTI = SHARED / "data" / "dcm_qa_ts" / "Ref" / "5.nii"

runner = CliRunner()


def mr_study(key: str) -> Study:
    """An oblique MR scan with a stored->physical scaling, to exercise export and windowing."""
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([2.0, 0.9, 0.8])
    affine[:3, 3] = [12.5, -40.0, 71.0]
    array = np.random.default_rng(2).integers(0, 3000, (7, 10, 9)).astype(np.int16)
    scan = Scan("t1", array, (2.0, 0.9, 0.8), affine, "MR", 3, "T1 ax", "a.u.", 0.5, 10.0, 7)
    return Study(key, "MR", [scan], report="Small T1 study.", labels={"lesion": 1})


@pytest.fixture
def dataset(tmp_path) -> Path:
    studies = [synthetic_study(f"ct{i}", n_scans=1 + i, shape=(6, 20, 18), seed=i) for i in range(3)]
    write_dataset(tmp_path, [*studies, mr_study("mr0")], max_shard_bytes=20_000)
    return tmp_path


def test_ls_lists_studies_with_scans_and_shapes(dataset):
    result = runner.invoke(app, ["ls", str(dataset)])
    assert result.exit_code == 0, result.output
    for text in ("ct0", "ct2", "mr0", "MR", "scan2 6x20x18", "t1 7x10x9"):
        assert text in result.output


def test_stats_prints_counts_and_writes_png(dataset, tmp_path_factory):
    png = tmp_path_factory.mktemp("stats") / "stats.png"
    result = runner.invoke(app, ["stats", str(dataset), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "studies 4   scans 7   slices 43" in result.output
    assert "scans per study" in result.output and "report length" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_prints_metadata_and_report_and_writes_montage(dataset, tmp_path_factory):
    png = tmp_path_factory.mktemp("show") / "mr0.png"
    result = runner.invoke(app, ["show", str(dataset), "mr0", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "Small T1 study." in result.output and "lesion" in result.output and "T1 ax" in result.output
    assert "slabs of" in result.output and "zstd 1" in result.output  # the codec it was written with
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner.invoke(app, ["show", str(dataset), "nope", "--png", str(png)]).exit_code == 2


def test_verify_passes_a_clean_dataset(dataset):
    result = runner.invoke(app, ["verify", str(dataset)])
    assert result.exit_code == 0, result.output
    assert "4 studies verified" in result.output


FLIPS = {
    "arrays": lambda row: row["zarr_zip_offset"] + row["zarr_zip_size"] // 2,
    "json": lambda row: row["json_offset"] + row["json_size"] // 3,
    "report": lambda row: row["txt_offset"],
    "tar header": lambda row: row["json_offset"] - 400,
}


@pytest.mark.parametrize("where", FLIPS)
def test_verify_finds_a_flipped_byte_and_names_the_study(dataset, where):
    row = ShardDataset(dataset).row("ct1")
    position = FLIPS[where](row)
    shard = dataset / row["shard"]
    data = bytearray(shard.read_bytes())
    data[position] ^= 0x01
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(dataset)])
    assert result.exit_code == 1
    assert "ct1" in result.output and "ct0" not in result.output
    assert verify_dataset(dataset).failed_keys() == ["ct1"]


def test_export_writes_nifti_with_ras_affine_and_matching_voxels(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = runner.invoke(app, ["export", str(dataset), "mr0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    scan = mr_study("mr0").scans[0]
    image = nib.load(out / "t1.nii.gz")
    assert np.allclose(image.affine, nifti_affine(scan.affine), atol=1e-4)
    assert image.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(image.dataobj.get_unscaled()), scan.array.transpose(2, 1, 0))
    assert np.allclose(image.get_fdata(), scan.array.transpose(2, 1, 0) * 0.5 + 10.0)
    for d, h, w in [(0, 0, 0), (6, 9, 8), (3, 2, 5)]:
        x, y, z, _ = scan.affine @ [d, h, w, 1]
        assert np.allclose(image.affine @ [w, h, d, 1], [-x, -y, z, 1], atol=1e-3)
    assert (out / "report.txt").read_text() == "Small T1 study."
    assert '"lesion": 1' in (out / "study.json").read_text()


@settings(max_examples=50, deadline=None)
@given(
    affine=hnp.arrays(np.float64, (3, 4), elements=st.floats(-100, 100)),
    index=st.tuples(*[st.integers(0, 50)] * 3),
)
def test_nifti_affine_maps_the_transposed_index_to_the_same_point_in_ras(affine, index):
    lps = np.vstack([affine, [0, 0, 0, 1]])
    d, h, w = index
    x, y, z, _ = lps @ [d, h, w, 1]
    assert np.allclose(nifti_affine(lps) @ [w, h, d, 1], [-x, -y, z, 1])


def test_real_nifti_survives_shards_and_export_unchanged(tmp_path):
    """A dcm2niix reference volume -> Study (LPS, [d,h,w]) -> shards -> export equals the original."""
    if not REAL_NIFTI.exists():
        raise FileNotFoundError(f"shared test data missing: {REAL_NIFTI}")
    original = nib.load(REAL_NIFTI)
    voxels = np.asarray(original.dataobj.get_unscaled(), dtype=np.int16)
    lps_affine = nifti_affine(original.affine)  # the conversion is its own inverse
    spacing = tuple(float(s) for s in np.linalg.norm(lps_affine[:3, :3], axis=0))
    scan = Scan("mr", voxels.transpose(2, 1, 0).copy(), spacing, lps_affine, "MR", intensity_unit="a.u.")
    write_dataset(tmp_path / "ds", [Study("real", "MR", [scan], report="reference volume")])
    assert (
        runner.invoke(app, ["export", str(tmp_path / "ds"), "real", "--out", str(tmp_path / "out")]).exit_code
        == 0
    )
    exported = nib.load(tmp_path / "out" / "mr.nii.gz")
    assert np.allclose(exported.affine, original.affine, atol=1e-4)
    assert np.array_equal(np.asarray(exported.dataobj.get_unscaled()), voxels)


def test_ls_shows_versions_and_version_pins_an_earlier_one(dataset):
    changed = synthetic_study("ct0", n_scans=2, shape=(5, 20, 18), seed=9)
    write_dataset(
        dataset, [changed, synthetic_study("ct9", n_scans=1, shape=(4, 8, 8))], max_shard_bytes=20_000
    )
    result = runner.invoke(app, ["ls", str(dataset)])
    assert result.exit_code == 0, result.output
    assert "version 2 (5 studies)" in result.output and "ct9" in result.output
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if line.startswith("│")]
    counts = [[cell.strip() for cell in row] for row in rows if row[0].strip() in ("1", "2")][:2]
    assert [row[:1] + row[2:] for row in counts] == [["1", "4", "0", "2", "4"], ["2", "1", "1", "1", "5"]]
    pinned = runner.invoke(app, ["ls", str(dataset), "--version", "1"])
    assert "version 1 (4 studies)" in pinned.output and "ct9" not in pinned.output.split("versions")[-1]
    for version in ("1", "2"):
        assert runner.invoke(app, ["verify", str(dataset), "--version", version]).exit_code == 0
    assert "scans 7" in runner.invoke(app, ["stats", str(dataset), "--version", "1"]).output
    missing = runner.invoke(app, ["ls", str(dataset), "--version", "3"])
    assert missing.exit_code == 2 and "no version 3" in " ".join(missing.output.split())


def forged_dataset(path: Path, scan_name: str) -> Path:
    """A dataset whose one study names its scan ``scan_name`` in the JSON and the zarr.zip
    alike, with offsets and checksums recomputed, as anyone producing a dataset can."""
    members = encode_study(synthetic_study("evil", n_scans=1, shape=(4, 6, 6)))
    record = json.loads(members["json"])
    old = record["scans"][0]["name"]
    record["scans"][0]["name"] = scan_name
    members["json"] = json.dumps(record).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(members["zarr.zip"])) as source, zipfile.ZipFile(buffer, "w") as target:
        for entry in source.namelist():
            renamed = scan_name + entry[len(old) :] if entry.startswith(f"{old}/") else entry
            target.writestr(renamed, source.read(entry))
    members["zarr.zip"] = buffer.getvalue()
    writer = DatasetWriter(path)
    writer.add_encoded("evil", members)
    writer.finalize()
    return path


def test_a_scan_name_that_escapes_is_refused_by_verify_show_and_export(tmp_path):
    dataset = forged_dataset(tmp_path / "a" / "b" / "ds", "../../ESCAPED")
    verified = runner.invoke(app, ["verify", str(dataset)])
    assert verified.exit_code == 1 and "unsafe scan name" in verified.output
    exported = runner.invoke(
        app, ["export", str(dataset), "evil", "--out", str(tmp_path / "a" / "b" / "out")]
    )
    assert exported.exit_code == 1
    assert exported.output.startswith("error: study 'evil': unsafe scan name '../../ESCAPED'")
    assert "Traceback" not in exported.output and len(exported.output.strip().splitlines()) <= 2
    assert not list(tmp_path.rglob("ESCAPED*")) and not (tmp_path / "a" / "b" / "out").exists()


def test_export_of_a_damaged_study_is_one_line_and_writes_nothing(dataset, tmp_path):
    row = ShardDataset(dataset).row("ct1")
    shard = dataset / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["zarr_zip_offset"] + 3] ^= 0x01
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["export", str(dataset), "ct1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert (
        result.output.startswith("error: study 'ct1': checksum mismatch") and "Traceback" not in result.output
    )
    assert not (tmp_path / "out").exists()


def test_verify_reports_files_the_manifest_does_not_list(dataset):
    (dataset / "ds-000099.tar").write_bytes(b"planted")
    (dataset / "notes").mkdir()
    (dataset / "notes" / "run.sh").write_text("rm -rf /")
    (dataset / "_ingest").mkdir()
    (dataset / "_ingest" / "index.parquet").write_bytes(b"local audit")
    report = verify_dataset(dataset)
    assert sorted(p.message for p in report.problems) == [
        "unlisted file ds-000099.tar (no manifest lists it)",
        "unlisted file notes/run.sh (no manifest lists it)",
    ]
    result = runner.invoke(app, ["verify", str(dataset)])
    assert result.exit_code == 1 and "notes/run.sh" in result.output


def test_a_manifest_shard_name_outside_the_dataset_is_refused(dataset):
    import pyarrow.parquet as pq

    manifest = pq.read_table(dataset / "manifest.parquet")
    shards = manifest.column("shard").to_pylist()
    shards[0] = "../" + shards[0]
    pq.write_table(
        manifest.set_column(manifest.schema.get_field_index("shard"), "shard", [shards]),
        dataset / "manifest.parquet",
    )
    problems = verify_dataset(dataset).problems
    assert any("unsafe shard name '../ds-000000.tar'" in p.message for p in problems)
