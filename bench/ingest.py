"""Benchmark hlip-ingest against dcm2niix on the same DICOM folders.

In one run, for a synthetic archive of 512x512 CT slices (about 250 MB; --quick: about
40 MB of 256x256) and for the real sets under ../shared/data, it measures:

* dcm2niix (the PyPI build in .venv/bin) writing ``.nii.gz`` (``-z y``) and ``.nii``
  (``-z n``) into a temporary folder: wall time;
* hlip-ingest (index, plan, build, write shards) on a fresh LocalCluster of 1 and of 2
  worker processes (one thread each): wall time from the call of ``run_ingest`` to the
  finished dataset, with the cluster started beforehand (its start-up is printed apart);
  files/s and MB/s of input, the ratio of its throughput to each dcm2niix mode, the
  scaling from 1 to 2 workers, and the peak RSS of every worker process.

Goals: with one worker at least 2.0x the throughput of ``dcm2niix -z y``; at least 1.8x
from 1 to 2 workers. Both programs read the same files; dcm2niix writes one volume per
series, hlip-ingest resamples CT to 3x1x1 mm and writes compressed zarr shards.

Run: ``.venv/bin/python bench/ingest.py`` (``--quick`` for a short run; ``--archive DIR``
reuses a synthetic archive made by an earlier run with ``--keep``).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from hlip.ingest.config import IngestConfig
from hlip.ingest.index import iter_source_files
from hlip.ingest.pipeline import run_ingest
from hlip.ingest.synth import Sizes, make_archive

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REAL_SETS = ("dcm_qa_nih/In", "dcm_qa_table/In", "dcm_qa_ts/In", "dicom2nifti/tests/data")
DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
MB = 1e6


def synthetic_archive(folder: Path, quick: bool) -> Path:
    """CT-only studies, short enough that 2 workers get balanced work (6 or 4 studies)."""
    sizes = Sizes(ct_matrix=256, ct_coverage_mm=80.0) if quick else Sizes(ct_matrix=512, ct_coverage_mm=96.0)
    make_archive(folder, 4 if quick else 6, seed=0, modalities=("CT",), sizes=sizes)
    return folder


def input_size(folder: Path) -> tuple[int, int]:
    files = list(iter_source_files([str(folder)]))
    return len(files), sum(f.size for f in files)


def time_dcm2niix(folder: Path, compress: str) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-dcm2niix-") as out:
        start = time.perf_counter()
        subprocess.run(
            [str(DCM2NIIX), "-z", compress, "-o", out, str(folder)], check=True, capture_output=True
        )
        return time.perf_counter() - start


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_ingest(folder: Path, reports: Path | None, workers: int) -> dict[str, float]:
    """One ingest on a fresh cluster of ``workers`` processes (so peak RSS is this run's)."""
    config = IngestConfig(
        report_table=str(reports) if reports else None, allow_missing_report=reports is None
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as out:
        start = time.perf_counter()
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            started = time.perf_counter()
            summary = run_ingest([folder], Path(out) / "ds", config, client=client)
            seconds = time.perf_counter() - started
            rss = client.run(_peak_rss_mb)
    return {
        "seconds": seconds,
        "startup": started - start,
        "rss_max": max(rss.values()),
        "studies": summary.studies_staged,
    }


def bench_folder(name: str, folder: Path, reports: Path | None, counts: list[int]) -> dict:
    n_files, n_bytes = input_size(folder)
    print(f"\n## {name}: {n_files} files, {n_bytes / MB:.0f} MB")
    gz, raw = time_dcm2niix(folder, "y"), time_dcm2niix(folder, "n")
    print(f"dcm2niix -z y: {gz:6.2f} s   ({n_files / gz:7.0f} files/s, {n_bytes / MB / gz:6.1f} MB/s)")
    print(f"dcm2niix -z n: {raw:6.2f} s   ({n_files / raw:7.0f} files/s, {n_bytes / MB / raw:6.1f} MB/s)")
    runs = {}
    for workers in counts:
        run = runs[workers] = time_ingest(folder, reports, workers)
        seconds = run["seconds"]
        print(
            f"hlip-ingest {workers} worker(s): {seconds:6.2f} s   ({n_files / seconds:7.0f} files/s, "
            f"{n_bytes / MB / seconds:6.1f} MB/s)   x{gz / seconds:5.2f} vs -z y   x{raw / seconds:5.2f} vs -z n   "
            f"peak RSS/worker {run['rss_max']:5.0f} MB   cluster start {run['startup']:.1f} s   "
            f"{run['studies']} studies"
        )
    if len(counts) > 1:
        print(
            f"scaling {counts[0]} -> {counts[-1]} workers: x{runs[counts[0]]['seconds'] / runs[counts[-1]]['seconds']:.2f}"
        )
    return {"gz": gz, "raw": raw, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small archive, no real sets")
    parser.add_argument("--archive", type=Path, help="reuse this synthetic archive")
    parser.add_argument("--keep", type=Path, help="make the synthetic archive here and keep it")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if not DCM2NIIX.exists():
        raise SystemExit(f"dcm2niix not found at {DCM2NIIX} (pip install dcm2niix)")

    scratch = Path(tempfile.mkdtemp(prefix="bench-ingest-archive-"))
    try:
        archive = args.archive or args.keep
        if archive is None or not archive.exists():
            archive = archive or scratch / "archive"
            start = time.perf_counter()
            synthetic_archive(archive, args.quick)
            print(f"synthetic archive made in {time.perf_counter() - start:.0f} s: {archive}")
        # The report table is the archive's reports.csv; dcm2niix skips it as not DICOM.
        synthetic = bench_folder("synthetic CT archive", archive, archive / "reports.csv", args.workers)
        print(
            f"\ngoal 1 worker >= 2.0x dcm2niix -z y: x{synthetic['gz'] / synthetic['runs'][args.workers[0]]['seconds']:.2f}"
        )
        if len(args.workers) > 1:
            runs = synthetic["runs"]
            print(
                f"goal scaling >= 1.8x: x{runs[args.workers[0]]['seconds'] / runs[args.workers[-1]]['seconds']:.2f}"
            )
        if not args.quick:
            if not SHARED_DATA.is_dir():
                raise SystemExit(f"real data missing: {SHARED_DATA}")
            for real in REAL_SETS:
                bench_folder(real, (SHARED_DATA / real).resolve(), None, args.workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
