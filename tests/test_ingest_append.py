"""Datasets that grow: re-runs append versions, rebuild changed studies, leave old bytes alone.

Two small synthetic archives: the first is ingested alone (version 1), then both together
with one report of the first amended (version 2: the second archive's studies added, the
amended study rebuilt), then again unchanged (no version 3).
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_ingest_pipeline import SMALL, small_config
from typer.testing import CliRunner

from hlip.ingest import cli, deid, pipeline
from hlip.ingest.lock import LOCK_FILE, IngestLocked, ingest_lock
from hlip.shards import inspect
from hlip.shards.reader import ShardDataset
from hlip.shards.stream import stream_studies
from hlip.synth import make_archive

AMENDED = "ADDENDUM: amended report."


def _sha256s(root: Path) -> dict[str, str]:
    """Digest of every dataset file outside ``_ingest/``, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and pipeline.INGEST_DIR not in path.relative_to(root).parts
    }


def _reports(path: Path, *tables: Path, amend: str | None = None) -> Path:
    """One report table from ``tables``; the report of study ``amend`` gets an addendum."""
    rows = [row for table in tables for row in csv.DictReader(table.open(newline=""))]
    for row in rows:
        if row["StudyInstanceUID"] == amend:
            row["report"] = f"{row['report']} {AMENDED}"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass
class Grown:
    out: Path
    first: object
    second: object
    table: Path
    key: str
    """The study whose report was amended."""
    digests: tuple[dict, dict, dict]
    summaries: tuple


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Grown:
    """The dataset after each of the three runs."""
    root = tmp_path_factory.mktemp("append")
    first = make_archive(root / "first", 4, seed=3, sizes=SMALL)
    second = make_archive(root / "second", 2, seed=11, sizes=SMALL)
    out = root / "out"
    summary_1 = pipeline.run_ingest([first.root], out, small_config(first), workers=0)
    digests_1 = _sha256s(out)
    amended_uid = first.studies[0].study_uid
    table = _reports(root / "reports.csv", first.reports_csv, second.reports_csv, amend=amended_uid)
    config = small_config(first, report_table=str(table))
    summary_2 = pipeline.run_ingest([first.root, second.root], out, config, workers=0)
    digests_2 = _sha256s(out)
    summary_3 = pipeline.run_ingest([first.root, second.root], out, config, workers=0)
    key = deid.study_key(amended_uid, b"test-secret")
    digests = (digests_1, digests_2, _sha256s(out))
    return Grown(out, first, second, table, key, digests, (summary_1, summary_2, summary_3))


def test_a_rerun_with_new_studies_appends_a_version_and_keeps_old_files(grown):
    out, first, second = grown.out, grown.first, grown.second
    (digests_1, digests_2, _), (summary_1, summary_2, _) = grown.digests, grown.summaries
    assert (summary_1.version, summary_1.studies_added) == (1, len(first.studies))
    assert (summary_2.version, summary_2.studies_added, summary_2.studies_superseded) == (
        2,
        len(second.studies),
        1,
    )
    assert {name: digests_2[name] for name in digests_1} == digests_1  # not one byte rewritten
    v1_shards = {name for name in digests_1 if name.endswith(".tar")}
    v2_shards = {name for name in digests_2 if name.endswith(".tar")} - v1_shards
    assert v2_shards and not v1_shards & v2_shards
    history = ShardDataset(out).history
    assert [v.number for v in history] == [1, 2]
    assert set(history[1].shards) == v2_shards and history[1].studies == len(first.studies) + len(
        second.studies
    )


def test_each_version_reads_back_whole_and_the_rebuilt_study_supersedes_its_old_sample(grown):
    out, first, second, key = grown.out, grown.first, grown.second, grown.key
    old, new = ShardDataset(out, version=1), ShardDataset(out)
    assert len(old) == len(first.studies) and len(new) == len(first.studies) + len(second.studies)
    assert set(old.keys()) < set(new.keys())
    assert AMENDED not in old.open(key).report and AMENDED in new.open(key).report
    assert old.row(key)["shard"] != new.row(key)["shard"]
    assert new.scans["key"].to_pylist().count(key) == len(new.open(key).scans)
    for version, dataset in ((1, old), (None, new)):
        streamed = [study for study in stream_studies(out, shardshuffle=False, version=version)]
        assert sorted(study.key for study in streamed) == sorted(dataset.keys())  # each study once
        (rebuilt,) = [study for study in streamed if study.key == key]
        assert (AMENDED in rebuilt.report) == (version is None)
    assert inspect.verify_dataset(out).ok and inspect.verify_dataset(out, version=1).ok


def test_an_unchanged_rerun_commits_nothing_and_says_so(grown):
    (_, digests_2, digests_3), (_, summary_2, summary_3) = grown.digests, grown.summaries
    assert summary_3.version is None and summary_3.studies_added == 0
    assert digests_3 == digests_2
    assert summary_3.studies_staged == summary_2.studies_staged
    assert cli.version_line(summary_3).startswith("0 new studies")
    assert cli.version_line(summary_2) == f"version 2: {len(grown.second.studies)} new studies, 1 rebuilt"


def test_same_inputs_give_the_same_versions_with_two_workers(grown, tmp_path):
    """The appended version's shards do not depend on the worker count."""
    first, second, (digests_1, digests_2, _) = grown.first, grown.second, grown.digests
    again = tmp_path / "out"
    pipeline.run_ingest([first.root], again, small_config(first), workers=2)
    assert _sha256s(again) == digests_1
    config = small_config(first, report_table=str(grown.table))
    pipeline.run_ingest([first.root, second.root], again, config, workers=2)
    assert _sha256s(again) == digests_2


# --- the lock on --out ----------------------------------------------------------------------


def _hold_lock(out: str, ready, release) -> None:
    with ingest_lock(out):
        ready.set()
        release.wait(30)


def test_a_second_ingest_into_a_locked_out_is_refused_in_one_line(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(IngestLocked, match=f"pid {holder.pid} on"):
            pipeline.run_ingest([tmp_path / "nothing"], tmp_path, workers=0)
        result = CliRunner().invoke(cli.app, ["run", str(tmp_path), "--out", str(tmp_path), "--workers", "0"])
        assert result.exit_code == 1 and "another ingest holds" in result.output
        assert "Traceback" not in result.output
    finally:
        release.set()
        holder.join(30)
    assert not (tmp_path / LOCK_FILE).exists()  # released when the holder ended


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    context = multiprocessing.get_context("spawn")
    dead = context.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    stale = f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "started": "then"}}'
    (tmp_path / LOCK_FILE).write_text(stale)
    with ingest_lock(tmp_path):
        assert str(os.getpid()) in (tmp_path / LOCK_FILE).read_text()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(stale.replace(socket.gethostname(), "another-host"))
    with pytest.raises(IngestLocked, match="another-host"), ingest_lock(tmp_path):
        pass
