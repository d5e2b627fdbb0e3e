"""Benchmark the ingest core (index, plan, build) against dcm2niix, one process, same folders.

For each folder it measures, in the same run:

* baseline ``dcm2niix -z n`` (PyPI build in .venv/bin) writing uncompressed ``.nii`` into a
  temporary folder;
* ``index_sources`` + ``plan`` + ``build_scan`` of every planned scan, in this process,
  once on the native grid and once with the default configuration (CT resampled to
  3 x 1 x 1 mm); the scans stay in memory (no shard writing: bench/ingest.py times the
  whole pipeline).

It prints seconds, files/s, the stage split and the throughput ratio ours / dcm2niix
(above 1: faster). Folders: a synthetic CT/MR archive (512 x 512 CT, several transfer
syntaxes) and the real sets under ../shared/data.

Run: ``.venv/bin/python bench/ingest_core.py`` (``--quick``: smaller synthetic archive).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hlip.ingest.index import index_sources, iter_source_files
from hlip.ingest.plan import PlanConfig, plan
from hlip.ingest.volume import ScanRejected, VolumeConfig, build_scan
from hlip.synth import Sizes, make_archive

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REAL_SETS = ("dcm_qa_ts/In", "dcm_qa_nih/In", "dcm_qa_table/In", "dicom2nifti/tests/data")
DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


def time_dcm2niix(folder: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([str(DCM2NIIX), "-z", "n", "-o", out, str(folder)], check=False, capture_output=True)
        return time.perf_counter() - start


def time_core(folder: Path, config: VolumeConfig) -> dict[str, float]:
    start = time.perf_counter()
    table = index_sources(folder)
    indexed = time.perf_counter()
    result = plan(table, PlanConfig())
    planned = time.perf_counter()
    rows = {row["file_id"]: row for row in table.to_pylist()}
    built = 0
    for study in result.studies:
        for scan in study.scans:
            try:
                build_scan(scan, rows, config)
                built += 1
            except ScanRejected:
                pass
    end = time.perf_counter()
    return {
        "index": indexed - start,
        "plan": planned - indexed,
        "build": end - planned,
        "total": end - start,
        "scans": built,
    }


def report(name: str, folder: Path) -> None:
    files = list(iter_source_files(folder))
    megabytes = sum(f.size for f in files) / 1e6
    baseline = time_dcm2niix(folder)
    print(f"\n{name}: {len(files)} files, {megabytes:.0f} MB")
    print(f"  dcm2niix -z n (baseline)      {baseline:7.2f} s  {len(files) / baseline:7.0f} files/s")
    for label, config in (("native", VolumeConfig.native()), ("default (CT 3x1x1)", VolumeConfig())):
        t = time_core(folder, config)
        split = f"index {t['index']:.2f} / plan {t['plan']:.2f} / build {t['build']:.2f}"
        print(
            f"  hlip core, {label:<18} {t['total']:7.2f} s  {len(files) / t['total']:7.0f} files/s"
            f"  ratio {baseline / t['total']:5.2f}x  ({split}; {t['scans']} scans)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        sizes = (
            Sizes(ct_matrix=256, ct_coverage_mm=80.0)
            if args.quick
            else Sizes(ct_matrix=512, ct_coverage_mm=96.0)
        )
        make_archive(archive, 2 if args.quick else 4, seed=0, sizes=sizes)
        report("synthetic archive", archive)
    for relative in REAL_SETS:
        report(relative, SHARED_DATA / relative)


if __name__ == "__main__":
    main()
