"""Benchmark ingest at archive scale: many tiny files through separate scheduler and
worker processes, and the plan stage alone on a large simulated index.

1. ``archive``: for each size (default 2.5k, 10k, 40k and 160k files), a PACS-like export of
   tiny CT slices (16x16 pixels, 40 slices a study, one folder a study), where file count
   dominates as it does in real exports. A ``dask scheduler`` and a ``dask worker`` with
   ``--workers`` processes run as their own processes; the client (``run_ingest`` with
   ``scheduler=``) runs in a process of its own, which reports its peak RSS. Printed: the
   client's peak RSS and its ratios to the previous and the smallest size (goal: <= 1.25x
   for 4x the files), wall time, files/s and files/s per worker; then an unchanged re-run of the
   largest size against its fresh run (goal: <= 0.05x).
2. ``plan``: an index of ``--plan-rows`` rows, made by replicating the index of a real
   archive with new UIDs, written as the partitioned index the workers would write; the
   plan tasks alone (one per partition) on 1 and then 2 workers, as rows/s and the ratio of
   2 workers to 1 (goal: > 1, planning throughput grows with workers).

Run: ``.venv/bin/python bench/ingest_scale.py`` (``--sizes 2500 10000 40000 160000 --workers 2
--plan-rows 200000``). On 2 cores the client, scheduler and workers share the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from hlip.ingest import partitions, pipeline
from hlip.ingest.config import IngestConfig
from hlip.ingest.index import index_sources

SLICES = 40
UID_ROOT = "1.2.826.0.1.3680043.10.99."
CLIENT = """
import json, resource, sys, time
from hlip.ingest.config import IngestConfig
from hlip.ingest.pipeline import run_ingest
if __name__ == "__main__":
    root, out, reports, address = sys.argv[1:5]
    config = IngestConfig(target_spacing={"CT": "native"}, report_table=reports, secret="bench")
    start = time.perf_counter()
    summary = run_ingest([root], out, config, scheduler=address)
    print(json.dumps({"seconds": time.perf_counter() - start, "files": summary.files,
                      "studies": summary.studies_staged,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _template() -> bytes:
    """One tiny CT slice whose UIDs, position and instance number are fixed-width
    placeholders, so every file of the archive is this byte string with them replaced."""
    with warnings.catch_warnings():  # the placeholders are not valid UIDs; their values are
        warnings.simplefilter("ignore")
        return _template_bytes()


def _template_bytes() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID_ROOT + "3.SOPSOPSOPSOP"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = UID_ROOT + "3.SOPSOPSOPSOP"
    ds.StudyInstanceUID = UID_ROOT + "1.STUDYSTUDY"
    ds.SeriesInstanceUID = UID_ROOT + "2.STUDYSTUDY"
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "SCALE^BENCH", "STUDYSTUDY"
    ds.SeriesNumber, ds.InstanceNumber = 1, "987654"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = ["0", "0", "4321.5"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (np.arange(256, dtype=np.int16) * 4).tobytes()
    path = Path(tempfile.mkdtemp()) / "template.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def write_archive(root: Path, files: int) -> Path:
    """``files`` tiny slices in studies of :data:`SLICES` under ``root``, and their report
    table beside it."""
    template = _template()
    studies = files // SLICES
    lines = ["StudyInstanceUID,report"]
    for study in range(studies):
        folder = root / f"p{study // 100:04d}" / f"s{study:06d}"
        folder.mkdir(parents=True)
        tag = f"{study:010d}".encode()
        study_bytes = template.replace(b"STUDYSTUDY", tag)
        for position in range(SLICES):
            data = study_bytes.replace(b"SOPSOPSOPSOP", f"{study * SLICES + position:012d}".encode())
            data = data.replace(b"4321.5", f"{position:06.1f}".encode())
            data = data.replace(b"987654", f"{position:06d}".encode())
            (folder / f"IM{position:04d}").write_bytes(data)
        lines.append(f"{UID_ROOT}1.{study:010d},Study {study}: no acute finding.")
    reports = root.with_name(f"{root.name}-reports.csv")
    reports.write_text("\n".join(lines) + "\n")
    return reports


def _process(command: list[str], **options) -> subprocess.Popen:
    return subprocess.Popen(command, start_new_session=True, **options)


@contextlib.contextmanager
def cluster(scratch: Path, workers: int):
    """A ``dask scheduler`` and a ``dask worker`` of ``workers`` processes; the address."""
    from distributed import Client

    scheduler_file = scratch / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    dask = [sys.executable, "-m"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [
        _process(
            [*dask, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(scheduler_file)], **quiet,
        )
    ]  # fmt: skip
    try:
        while not scheduler_file.exists():
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        processes.append(
            _process(
                [*dask, "distributed.cli.dask_worker", address, "--nworkers", str(workers), "--nthreads", "1",
                 "--no-dashboard", "--memory-limit", "4GiB"], **quiet,
            )
        )  # fmt: skip
        with Client(address) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()


def run_client(root: Path, out: Path, reports: Path, address: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, str(root), str(out), str(reports), address],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_archives(scratch: Path, sizes: list[int], workers: int) -> None:
    print(f"== archive ingest through a scheduler and {workers} worker processes (tiny CT slices)")
    print(f"{'files':>8} {'studies':>8} {'client peak RSS':>16} {'x previous':>10} {'x smallest':>10} "
          f"{'wall s':>8} {'files/s':>8} {'per worker':>10}")  # fmt: skip
    smallest = previous = None
    for files in sizes:
        root = scratch / f"archive-{files}"
        reports = write_archive(root, files)
        out = scratch / f"out-{files}"
        with cluster(scratch, workers) as address:
            fresh = run_client(root, out, reports, address)
            rss = fresh["peak_rss_mb"]
            smallest, previous = smallest or rss, previous or rss
            rate = fresh["files"] / fresh["seconds"]
            print(f"{fresh['files']:>8} {fresh['studies']:>8} {rss:>13.0f} MB "
                  f"{rss / previous:>9.2f}x {rss / smallest:>9.2f}x {fresh['seconds']:>8.1f} "
                  f"{rate:>8.0f} {rate / workers:>10.0f}")  # fmt: skip
            previous = rss
            if files == sizes[-1]:
                again = run_client(root, out, reports, address)
                print(f"unchanged re-run of {files} files: {again['seconds']:.1f} s = "
                      f"{again['seconds'] / fresh['seconds']:.3f}x the fresh run (goal <= 0.05x)")  # fmt: skip


def simulated_index(
    scratch: Path, rows: int, partition_count: int
) -> list[tuple[int, list[partitions.Unit]]]:
    """The index of a tiny archive replicated with new UIDs to ``rows`` rows, written as the
    partitioned index (one unit per block of copies, one fragment per partition it has rows
    in, rows partitioned as the workers partition them); the partitions and their units.
    Built with Arrow column operations: 10^7 rows take minutes, not the hour of the row-wise
    index writer."""
    template = index_sources([_small_archive(scratch)])
    work = scratch / "plan-work"
    copies = -(-rows // template.num_rows)
    by_unit = 256
    summaries = []
    for block in range(0, copies, by_unit):
        unit = partitions.Unit("tree", f"/simulated/{block}")
        table = _copies(template, range(block, min(block + by_unit, copies)))
        where = _row_partitions(table, partition_count)
        order = np.lexsort((table["file_id"].to_numpy(zero_copy_only=False), where))
        table, where = table.take(pa.array(order)), where[order]
        summary = partitions.UnitSummary(unit)
        for partition, start, count in zip(
            *np.unique(where, return_index=True, return_counts=True), strict=True
        ):
            fragment = partitions._fragment(work, partitions.INDEX_DIR, int(partition), unit)
            partitions._write_table(fragment, table.slice(start, count))
            summary.partitions[int(partition)] = int(count)
        summaries.append(summary)
    return list(partitions.iter_partitions(summaries))


def _copies(template: pa.Table, copies: range) -> pa.Table:
    """``template`` once per copy, its UIDs and file ids suffixed with the copy number."""
    table = pa.concat_tables([template] * len(copies))
    suffix = pa.array(np.repeat([f".{copy}" for copy in copies], template.num_rows))
    for column in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "file_id"):
        joined = pc.binary_join_element_wise(table[column], suffix, "")
        table = table.set_column(table.schema.get_field_index(column), column, joined)
    return table


def _row_partitions(table: pa.Table, partition_count: int) -> np.ndarray:
    """Each row's index partition, by :func:`hlip.ingest.partitions.row_partition`'s rule,
    hashed once per distinct key."""
    failed = table["error"].to_numpy(zero_copy_only=False).astype(bool)
    keys = np.where(
        failed,
        table["file_id"].to_numpy(zero_copy_only=False),
        pc.fill_null(table["StudyInstanceUID"], "").to_numpy(zero_copy_only=False),
    )
    distinct, inverse = np.unique(keys, return_inverse=True)
    return np.array([partitions.partition_of(key, partition_count) for key in distinct])[inverse]


def _small_archive(scratch: Path) -> Path:
    root = scratch / "plan-template"
    if not root.exists():
        write_archive(root, 4 * SLICES)
    return root


def _plan_only(partition: int, units: list[partitions.Unit], work: Path) -> int:
    from hlip.ingest.plan import plan

    rows = partitions.read_partition(work, partition, units)
    plan(rows, duplicates=partitions.read_duplicates(work, partition))
    return rows.num_rows


def bench_plan(scratch: Path, rows: int, partition_count: int) -> None:
    from distributed import Client, LocalCluster

    print(f"== plan stage alone: {rows} simulated index rows, {partition_count} partitions")
    parts = simulated_index(scratch, rows, partition_count)
    work = scratch / "plan-work"
    rates = {}
    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as lc,
            Client(lc) as client,
        ):
            runner = pipeline.TaskRunner(client)
            start = time.perf_counter()
            for partition, units in parts:
                runner.submit(None, _plan_only, partition, units, work)
            planned = sum(runner.drain())
            seconds = time.perf_counter() - start
        rates[workers] = planned / seconds
        print(f"{workers} worker(s): {planned} rows in {seconds:.1f} s = {rates[workers]:.0f} rows/s")
    print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (goal > 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_500, 10_000, 40_000, 160_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--plan-rows", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=IngestConfig.index_partitions)
    parser.add_argument("--skip", choices=["archive", "plan"], default=None)
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        os.environ.setdefault("HLIP_INGEST_WORK", str(Path(scratch) / "work"))
        if args.skip != "archive":
            bench_archives(Path(scratch), args.sizes, args.workers)
        if args.skip != "plan":
            bench_plan(Path(scratch), args.plan_rows, args.partitions)


if __name__ == "__main__":
    main()
