"""``hlip-ingest`` commands, and a run killed with SIGKILL that resumes to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_ingest_pipeline import SMALL, files_table, output_bytes
from typer.testing import CliRunner

from hlip.ingest import pipeline
from hlip.ingest.cli import app, parse_spacing
from hlip.ingest.config import IngestConfig
from hlip.ingest.deid import study_key
from hlip.shards.reader import ShardDataset
from hlip.shards.writer import STAGING_DIR
from hlip.synth import make_archive

KILL_WAIT_S = 300
"""Upper bound on waiting for a kill point; the test fails loudly if it is never reached."""


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_args(archive, out: Path) -> list[str]:
    return [
        "run", archive.root, "--out", out, "--reports", archive.reports_csv,
        "--secret", "cli-secret", "--spacing", "CT=5,4,4",
    ]  # fmt: skip


def matching_config(archive) -> IngestConfig:
    """The config the arguments of :func:`run_args` make."""
    return IngestConfig(
        target_spacing=parse_spacing(["CT=5,4,4"]), report_table=str(archive.reports_csv), secret="cli-secret"
    )


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("synth") / "archive", 3, seed=5, sizes=SMALL)


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    pipeline.run_ingest([archive.root], out, matching_config(archive), workers=0)
    return out


def test_parse_spacing():
    assert parse_spacing(["CT=2,1,1", "mr=native"]) == {"CT": (2.0, 1.0, 1.0), "MR": "native"}
    assert parse_spacing([])["CT"] == IngestConfig().target_spacing["CT"]
    assert set(parse_spacing(["native"]).values()) == {"native"}
    assert parse_spacing(["native", "CT=2,1,1"])["CT"] == (2.0, 1.0, 1.0)


def test_synth_index_and_plan_commands(tmp_path):
    invoke("synth", "--out", tmp_path / "archive", "--studies", 1, "--seed", 0, "--ct-matrix", 64)
    assert (tmp_path / "archive" / "reports.csv").exists()
    output = invoke("index", tmp_path / "archive", "--out", tmp_path / "work", "--workers", 0)
    index = pq.read_table(tmp_path / "work" / "index")
    files = [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
    assert index.num_rows == len(files) and f"{len(files)} files indexed" in output
    output = invoke("plan", tmp_path / "work" / "index")
    assert "1 studies" in output and "rejected files" in output and "localizer" in output


def test_synth_lesion_scale(tmp_path):
    def archive_bytes(scale: str) -> dict[str, bytes]:
        root = tmp_path / f"scale{scale}"
        invoke(
            "synth", "--out", root, "--studies", 4, "--seed", 0, "--ct-matrix", 64, "--lesion-scale", scale
        )
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    plain, doubled = archive_bytes("1"), archive_bytes("2")
    assert plain.keys() == doubled.keys() and plain != doubled  # same files, other lesions
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--lesion-scale", "3"])
    assert result.exit_code == 2 and "--lesion-scale" in result.output
    assert "less than or equal to 2" in result.output and "Traceback" not in result.output


def test_synth_kinds(tmp_path):
    invoke("synth", "--out", tmp_path / "head", "--studies", 1, "--ct-matrix", 64, "--kinds", "ct-head")
    header = next(p for p in (tmp_path / "head").rglob("*") if p.is_file() and p.name.startswith("IM"))
    assert b"CT HEAD WITHOUT CONTRAST" in header.read_bytes()
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--kinds", "CT,PET"])
    assert result.exit_code == 2 and "unknown study kinds ['PET']" in result.output


def test_run_prints_outcomes_and_reasons(archive, reference, tmp_path):
    output = invoke(*run_args(archive, tmp_path / "out"), "--workers", 0)
    summary = pipeline.summarize(pq.read_table(reference / "_ingest" / "files.parquet"), reference)
    for outcome, count in summary.outcomes.items():
        assert outcome in output and str(count) in output
    for reason in summary.reasons:
        assert reason in output
    assert f"studies: {summary.studies_staged} in the dataset" in output
    assert output_bytes(tmp_path / "out") == output_bytes(reference)


def test_run_refuses_to_resume_with_other_settings(archive, reference, tmp_path):
    invoke(*run_args(archive, tmp_path / "out"), "--workers", 0)
    result = CliRunner().invoke(
        app, [str(a) for a in run_args(archive, tmp_path / "out")] + ["--min-slices", "2"]
    )
    assert result.exit_code == 1 and "another min_slices" in result.output
    assert "Traceback" not in result.output


def test_run_with_the_lz4hc_codec_stores_the_same_studies(archive, reference, tmp_path):
    """Another slab codec changes the shard bytes, not the studies; a resumed run must keep
    the codec, and an unknown one is refused without a traceback."""
    invoke(*run_args(archive, tmp_path / "out"), "--workers", 0, "--codec", "lz4hc")
    fast, default = ShardDataset(tmp_path / "out"), ShardDataset(reference)
    assert fast.keys() == default.keys()
    for key in default:
        a, b = fast.open(key), default.open(key)
        assert a.report == b.report and a.config_hash == b.config_hash
        for x, y in zip(a.scans, b.scans, strict=True):
            assert x.array.metadata.codecs[-1].cname.value == "lz4hc"
            np.testing.assert_array_equal(x.array[...], y.array[...])
    assert output_bytes(tmp_path / "out") != output_bytes(reference)
    for codec, message in (("zstd", "another codec"), ("brotli", "unknown slab codec 'brotli'")):
        result = CliRunner().invoke(
            app, [str(a) for a in run_args(archive, tmp_path / "out")] + ["--codec", codec]
        )
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def _outcome_recorded(out: Path) -> bool:
    return any((out / pipeline.INGEST_DIR / pipeline.OUTCOMES_DIR).glob("*.json"))


def _two_staged(out: Path) -> bool:
    return len(list((out / STAGING_DIR).glob("*.sample"))) >= 2


def _config_written(out: Path) -> bool:
    return (out / pipeline.INGEST_DIR / pipeline.CONFIG_FILE).exists()


@pytest.mark.parametrize("kill_point", [_config_written, _outcome_recorded, _two_staged])
def test_killed_run_resumes_to_identical_bytes(archive, reference, tmp_path, kill_point):
    """SIGKILL the whole process group (client, nanny, worker) at a point of the run, check
    that no incomplete shard is visible, re-run, and compare with an uninterrupted run."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hlip.ingest.cli", *map(str, run_args(archive, out)), "--workers", "1"]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + KILL_WAIT_S
    while not kill_point(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kill_point(out), "the run never reached the kill point: " + process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert tar.getmembers()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=KILL_WAIT_S)
    assert output_bytes(out) == output_bytes(reference)
    assert files_table(out) == files_table(reference)


# --- NIfTI collections ----------------------------------------------------------------------


def _write_volume(path: Path, seed: int, shape=(6, 5, 4)) -> None:
    data = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)


def test_nifti_collection_command(tmp_path):
    """Rows sharing a study id form one study; an unreadable volume rejects its study's
    files; a re-run changes nothing."""
    for name, seed in (("a", 0), ("b1", 1), ("b2", 2)):
        _write_volume(tmp_path / f"{name}.nii.gz", seed)
    (tmp_path / "c.nii.gz").write_bytes(b"not a NIfTI file")
    (tmp_path / "table.csv").write_text(
        "study_id,volumes,report,effusion\n"
        's1,a.nii.gz,"Small effusion.",1\n'
        "s2,b1.nii.gz,Normal.,0\n"
        "s2,b2.nii.gz,,0\n"
        "s3,c.nii.gz,Normal.,0\n"
    )
    args = ("nifti", tmp_path / "table.csv", "--out", tmp_path / "out", "--secret", "k", "--workers", 0)
    output = invoke(*args)
    assert "studies: 2 in the dataset, 1 rejected" in output and "unreadable_nifti" in output
    dataset = ShardDataset(tmp_path / "out")
    s1, s2 = (dataset.open(study_key(study_id, b"k")) for study_id in ("s1", "s2"))
    assert s1.labels == {"effusion": 1} and s1.report == "Small effusion."
    assert [scan.shape for scan in s2.scans] == [(4, 5, 6), (4, 5, 6)] and len(dataset) == 2
    outcomes = {Path(row["file_id"]).name: row for row in files_table(tmp_path / "out")}
    assert {name: row["outcome"] for name, row in outcomes.items()} == {
        "a.nii.gz": "scan", "b1.nii.gz": "scan", "b2.nii.gz": "scan", "c.nii.gz": "rejected",
    }  # fmt: skip
    assert outcomes["c.nii.gz"]["reason"] == "unreadable_nifti"
    before = output_bytes(tmp_path / "out")
    invoke(*args)
    assert output_bytes(tmp_path / "out") == before
    invoke(*args[:3], tmp_path / "lz4hc", *args[4:], "--codec", "lz4hc")
    scan = ShardDataset(tmp_path / "lz4hc").open(s1.key).scans[0]
    assert scan.array.metadata.codecs[-1].cname.value == "lz4hc"
    np.testing.assert_array_equal(scan.array[...], s1.scans[0].array[...])


def test_ct_rate_layout(tmp_path):
    """CT-RATE's reports and labels CSVs and its folder of reconstructions."""
    folder = tmp_path / "volumes" / "train" / "train_1" / "train_1_a"
    folder.mkdir(parents=True)
    for number in (1, 2):
        _write_volume(folder / f"train_1_a_{number}.nii.gz", number)
    (tmp_path / "reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\n"
        "train_1_a_1.nii.gz,Emphysema in both upper lobes.,Emphysema.\n"
        "train_1_a_2.nii.gz,Emphysema in both upper lobes.,Emphysema.\n"
        "train_2_a_1.nii.gz,Not downloaded.,Absent.\n"
    )
    (tmp_path / "labels.csv").write_text(
        "VolumeName,Emphysema,Cardiomegaly\ntrain_1_a_1.nii.gz,1,0\ntrain_1_a_2.nii.gz,1,0\n"
    )
    invoke(
        "nifti", tmp_path / "reports.csv", "--ct-rate-volumes", tmp_path / "volumes",
        "--ct-rate-labels", tmp_path / "labels.csv", "--out", tmp_path / "out", "--secret", "k", "--workers", 0,
    )  # fmt: skip
    study = ShardDataset(tmp_path / "out").open(study_key("train_1_a", b"k"))
    assert [scan.name for scan in study.scans] == ["1", "2"]
    assert study.labels == {"Emphysema": 1, "Cardiomegaly": 0}
    assert "Emphysema in both upper lobes." in study.report and "Impression" in study.report
    assert study.body_part == "CHEST"
