"""The partitioned index: listing split into units, rows partitioned by study, duplicates
found across partitions, rows reused per unit, and a dataset that does not depend on how
the index was cut."""

from __future__ import annotations

import csv
import os
import shutil
import zipfile
from dataclasses import replace

import pyarrow.parquet as pq
import pydicom
import pytest
from test_ingest_pipeline import SMALL, files_table, output_bytes, small_config

from hlip.ingest import partitions, pipeline
from hlip.ingest.index import index_sources
from hlip.ingest.plan import plan
from hlip.synth import make_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A synthetic archive plus one instance stored a second time under another study (same
    SOPInstanceUID, another StudyInstanceUID), as a re-sent study with a corrected UID is."""
    synth = make_archive(tmp_path_factory.mktemp("synth") / "archive", 3, seed=5, sizes=SMALL)
    first, other = synth.studies[0].study_uid, synth.studies[1].study_uid
    for path in sorted(synth.root.rglob("*")):
        if not path.is_file() or path.suffix.lower() in (".csv", ".zip"):
            continue
        try:
            dataset = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - clutter of the archive
            continue
        if getattr(dataset, "StudyInstanceUID", "") == first and "PixelData" in dataset:
            dataset.StudyInstanceUID = other
            (synth.root / "zz-resent").mkdir()
            dataset.save_as(synth.root / "zz-resent" / "copy.dcm")
            break
    return synth


def _index(archive, work, partition_count: int, monkeypatch=None, unit_files: int | None = None):
    if unit_files is not None:
        monkeypatch.setattr(partitions, "UNIT_FILES", unit_files)
    runner = pipeline.TaskRunner()
    return pipeline.index_archive([archive.root], work, partition_count, runner)


def test_split_units_index_every_file_once_as_one_table_does(archive, tmp_path, monkeypatch):
    whole = index_sources([archive.root]).drop(["mtime_ns"])
    summaries = _index(archive, tmp_path / "w", 5, monkeypatch, unit_files=3)
    assert sum(1 for summary in summaries if summary.files) > 5, "the archive was not split"
    assert all(summary.files <= 3 for summary in summaries)
    table = pq.read_table(tmp_path / "w" / partitions.INDEX_DIR).sort_by("file_id").drop(["mtime_ns"])
    assert table.equals(whole)
    for partition, units in partitions.iter_partitions(summaries):
        rows = partitions.read_partition(tmp_path / "w", partition, units)
        uids = {row["StudyInstanceUID"] for row in rows.to_pylist() if not row["error"]}
        assert all(partitions.partition_of(uid or "", 5) == partition for uid in uids)


@pytest.mark.parametrize("partition_count", [1, 2, 7])
def test_partitioned_plans_give_every_file_the_outcome_of_one_plan(archive, tmp_path, partition_count):
    """The instance stored under two studies is a duplicate whichever partitions hold them."""
    work = tmp_path / "w"
    summaries = _index(archive, work, partition_count)
    pipeline.flag_duplicates(work, summaries, pipeline.TaskRunner())
    expected = plan(index_sources([archive.root])).outcomes()
    found = {}
    for partition, units in partitions.iter_partitions(summaries):
        rows = partitions.read_partition(work, partition, units)
        found.update(plan(rows, duplicates=partitions.read_duplicates(work, partition)).outcomes())
    assert found == expected
    assert sum(reason == "duplicate_instance" for outcome, reason in expected.values()) >= 2


def test_a_rerun_parses_only_new_and_changed_files(archive, tmp_path, monkeypatch):
    source = tmp_path / "archive"
    shutil.copytree(archive.root, source)
    copy = replace(archive, root=source)
    work = tmp_path / "w"
    first = _index(copy, work, 4, monkeypatch, unit_files=4)
    assert sum(summary.parsed for summary in first) == sum(summary.files for summary in first)
    again = _index(copy, work, 4, monkeypatch, unit_files=4)
    assert sum(summary.parsed for summary in again) == 0
    touched = next(path for path in sorted(source.rglob("*.dcm")))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    (source / "late").mkdir()
    shutil.copy(touched, source / "late" / "new.dcm")
    third = _index(copy, work, 4, monkeypatch, unit_files=4)
    assert sum(summary.parsed for summary in third) == 2
    assert pipeline.index_digest(third) != pipeline.index_digest(again)
    table = pq.read_table(work / partitions.INDEX_DIR)
    assert table.num_rows == len(set(table["file_id"].to_pylist())) == sum(s.files for s in third)


def test_the_dataset_does_not_depend_on_the_partition_count(archive, tmp_path):
    outs = []
    for partition_count in (1, 5):
        out = tmp_path / f"out{partition_count}"
        config = small_config(archive, index_partitions=partition_count)
        pipeline.run_ingest([archive.root], out, config, workers=0)
        outs.append(out)
    assert output_bytes(outs[0]) == output_bytes(outs[1])
    assert files_table(outs[0]) == files_table(outs[1])
    parts = sorted((outs[1] / pipeline.INGEST_DIR / pipeline.FILES_FILE).iterdir())
    assert len(parts) > 1


def _ingested_copy(archive, tmp_path, monkeypatch, **changes):
    """A copy of the archive ingested once, with units of a few files (so that a unit, like
    a real archive's, holds few studies): (source, config, out)."""
    monkeypatch.setattr(partitions, "UNIT_FILES", 8)
    source, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(archive.root, source)
    config = small_config(archive, **changes)
    pipeline.run_ingest([source], out, config, workers=0)
    return source, config, out


def test_a_grown_archive_replans_only_what_it_grew_by(archive, tmp_path, monkeypatch):
    """The per-file outcomes after growing equal those of one run over the grown archive,
    and partitions without new files are not planned again."""
    source, config, out = _ingested_copy(archive, tmp_path, monkeypatch, index_partitions=16)
    late = make_archive(tmp_path / "late", 1, seed=6, sizes=SMALL)
    shutil.copytree(late.root, source / "late", ignore=shutil.ignore_patterns("*.csv"))
    reports = tmp_path / "reports.csv"
    late_rows = late.reports_csv.read_text().splitlines()[1:]
    reports.write_text("\n".join([*archive.reports_csv.read_text().splitlines(), *late_rows]) + "\n")
    config = replace(config, report_table=str(reports))
    whole = tmp_path / "whole"
    pipeline.run_ingest([source], whole, config, workers=0)
    planned = []
    original = pipeline.plan

    def counting_plan(rows, *args):
        planned.append(rows.num_rows)
        return original(rows, *args)

    monkeypatch.setattr(pipeline, "plan", counting_plan)
    summary = pipeline.run_ingest([source], out, config, workers=0)
    assert files_table(out) == files_table(whole)
    assert summary.version == 2 and summary.studies_added == 1
    partitions_with_rows = len(list((out / pipeline.INGEST_DIR / pipeline.FILES_FILE).iterdir()))
    assert 0 < len(planned) < partitions_with_rows
    # Within those partitions only the new studies' (and new unreadable files') rows.
    assert sum(planned) == sum(1 for path in (source / "late").rglob("*") if path.is_file())


def test_a_flat_folder_is_scanned_once_however_many_units_share_it(tmp_path, monkeypatch):
    """A folder of many files is split into hash-bucket units that read the one listing its
    splitting unit wrote, instead of each scanning the folder again."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(300):
        (flat / f"IM{i:05d}").write_bytes(b"not dicom %d" % i)
    scans = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(os.fspath(path)) or scandir(path))
    summaries = _index(type("Archive", (), {"root": flat}), tmp_path / "w", 3, monkeypatch, unit_files=16)
    assert sum(1 for summary in summaries if summary.files) >= 19  # 300 files, at most 16 per unit
    assert all(summary.files <= 16 for summary in summaries)
    assert scans.count(str(flat)) <= 2, "each unit scanned the folder"
    table = pq.read_table(tmp_path / "w" / partitions.INDEX_DIR).sort_by("file_id").drop(["mtime_ns"])
    assert table.equals(index_sources([flat]).drop(["mtime_ns"]))


def test_a_replan_reads_only_the_rows_of_studies_that_may_have_changed(archive, tmp_path, monkeypatch):
    """Growing the archive, or amending one study's report, makes the plan read the rows of
    the new or amended studies only (not every row of the partitions they fall in) and the
    accounting replace only their outcomes, and the per-file outcomes equal those of one run
    over the final archive."""
    source, config, out = _ingested_copy(archive, tmp_path, monkeypatch, index_partitions=2)
    read = []
    original = partitions.read_partition

    def counting_read(*args, with_unit=False, **kwargs):
        table = original(*args, with_unit=with_unit, **kwargs)
        if with_unit:  # the plan's read of whole rows
            read.append(table.num_rows)
        return table

    monkeypatch.setattr(partitions, "read_partition", counting_read)
    accounted = []  # the study keys whose outcome records the accounting reads
    account_groups = pipeline._account_groups
    monkeypatch.setattr(
        pipeline,
        "_account_groups",
        lambda ids, groups, *a: (
            accounted.extend(k for g in groups for k in g.keys) or account_groups(ids, groups, *a)
        ),
    )
    late = make_archive(tmp_path / "late", 1, seed=6, sizes=SMALL)  # a night's export, a source of its own
    sources = [source, late.root]
    rows = list(csv.DictReader(archive.reports_csv.open(newline="")))
    rows += list(csv.DictReader(late.reports_csv.open(newline="")))
    table = tmp_path / "reports.csv"
    _write_csv(table, rows)
    config = replace(config, report_table=str(table))
    pipeline.run_ingest(sources, out, config, workers=0)
    late_files = sum(1 for path in late.root.rglob("*") if path.is_file())
    assert sum(read) == late_files
    # the files table is updated by the new study's rows only
    assert len(accounted) == len(late.studies) == 1

    read.clear()
    amended = archive.studies[2].study_uid
    for row in rows:
        if row["StudyInstanceUID"] == amended:
            row["report"] += "\nADDENDUM: no change in the impression."
    _write_csv(table, rows)
    summary = pipeline.run_ingest(sources, out, config, workers=0)
    amended_reads = sum(read)
    whole = tmp_path / "whole"
    pipeline.run_ingest(sources, whole, config, workers=0)
    assert files_table(out) == files_table(whole)
    assert (summary.studies_added, summary.studies_superseded) == (0, 1)
    index = pq.read_table(out / pipeline.INGEST_DIR / partitions.INDEX_DIR, columns=["StudyInstanceUID"])
    study_files = index["StudyInstanceUID"].to_pylist().count(amended)
    assert 0 < amended_reads == study_files < index.num_rows / 4


def _write_csv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_trusted_folder_times_skip_unchanged_folders_and_see_what_was_added(archive, tmp_path, monkeypatch):
    """With trust_folder_times an unchanged re-run lists no folder and stats no file; a file added to an
    existing folder and a study folder added at the top are found, and the per-file
    outcomes equal those of a fresh run over the final archive."""
    monkeypatch.setattr(partitions, "UNIT_FILES", 8)
    source = tmp_path / "archive"
    shutil.copytree(archive.root, source)
    (source / "exports").mkdir()
    with zipfile.ZipFile(source / "exports" / "notes.zip", "w") as export:  # a unit found in a folder
        export.writestr("notes.txt", "not an image")
    config = replace(small_config(archive, index_partitions=4), trust_folder_times=True)
    out = tmp_path / "out"
    first = pipeline.run_ingest([source], out, config, workers=0)
    stats, scans = [], []
    source_file, scandir = partitions._source_file, os.scandir
    monkeypatch.setattr(partitions, "_source_file", lambda path: stats.append(path) or source_file(path))
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or scandir(path))
    again = pipeline.run_ingest([source], out, config, workers=0)
    assert stats == [] and not [path for path in scans if str(source) in str(path)]
    assert (again.files, again.studies_staged) == (first.files, first.studies_staged)

    deep = max((path for path in source.rglob("*") if path.is_dir()), key=lambda path: len(path.parts))
    (deep / "NOTES.txt").write_text("not an image")
    late = make_archive(tmp_path / "late", 1, seed=6, sizes=SMALL)
    shutil.copytree(late.root, source / "late", ignore=shutil.ignore_patterns("*.csv"))
    pipeline.run_ingest([source], out, config, workers=0)
    stated = len(stats)
    whole = tmp_path / "whole"
    pipeline.run_ingest([source], whole, replace(config, trust_folder_times=False), workers=0)
    assert files_table(out) == files_table(whole)
    assert str(deep / "NOTES.txt") in {row["file_id"] for row in files_table(out)}
    late_files = sum(1 for path in (source / "late").rglob("*") if path.is_file())
    assert late_files < stated < sum(1 for path in source.rglob("*") if path.is_file()) / 2
