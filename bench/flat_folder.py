"""Listing a flat folder: one folder of many files (a PACS export that drops every instance
in one directory), split into hash-bucket units, with the folder's listing written once by the
unit that splits it, against every unit scanning the folder itself (the baseline).

    python bench/flat_folder.py [--files 20000 80000] [--unit-files 2048]

Times the listing stage alone (every unit expanded until each holds at most --unit-files files,
no file parsed), serially in one process, and prints the units, the scans of the folder and the
ratio baseline / listing-once per size. Files are empty placeholders in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hlip.ingest import partitions


def list_units(root: Path, unit_files: int, listings: Path | None) -> tuple[int, int, float]:
    """(units that index files, scans of ``root``, seconds) for the whole listing stage."""
    scans = 0
    scandir = os.scandir

    def counting(path):
        nonlocal scans
        scans += os.fspath(path) == str(root)
        return scandir(path)

    os.scandir = counting
    try:
        start, pending, leaves = time.perf_counter(), [partitions.Unit("tree", str(root))], 0
        while pending:
            files, units = partitions.expand(pending.pop(), limit=unit_files, listings=listings)
            leaves += bool(files)
            pending.extend(units)
        return leaves, scans, time.perf_counter() - start
    finally:
        os.scandir = scandir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, nargs="+", default=[20000, 80000])
    parser.add_argument("--unit-files", type=int, default=partitions.UNIT_FILES)
    args = parser.parse_args()
    print("| files | units | scans: each unit / once | seconds: each unit / once | ratio |")
    print("|---|---|---|---|---|")
    for count in args.files:
        with tempfile.TemporaryDirectory(prefix="hlip-flat-") as tmp:
            root = Path(tmp) / "flat"
            root.mkdir()
            for i in range(count):
                (root / f"IM{i:08d}").touch()
            units, base_scans, base = list_units(root, args.unit_files, None)
            once_units, once_scans, once = list_units(root, args.unit_files, Path(tmp) / "listings")
            assert once_units == units
            print(
                f"| {count:,} | {units} | {base_scans} / {once_scans} | {base:.2f} / {once:.2f} | {base / once:.1f}x |"
            )


if __name__ == "__main__":
    main()
