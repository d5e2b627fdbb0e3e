"""Peak memory of building one scan, per decoded voxel: the factor behind the ingest's
per-study voxel budget (``hlip.ingest.volume.DECODE_BYTES_PER_VOXEL``).

Builds every planned scan of a synthetic CT and MR study (uncompressed and compressed
transfer syntaxes, native grid and the default resampling) under tracemalloc, which numpy
reports its buffers to, and prints the peak bytes per voxel the index declares, with the
int16 output (2 bytes per voxel) as the baseline.

    PYTHONPATH=. python bench/decode_memory.py [--matrix 256]
"""

from __future__ import annotations

import argparse
import tempfile
import tracemalloc
from pathlib import Path

from hlip.ingest.index import index_sources
from hlip.ingest.plan import plan
from hlip.ingest.volume import VolumeConfig, build_scan, declared_study_voxels
from hlip.synth import Sizes, make_archive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--matrix", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        archive = make_archive(Path(scratch) / "a", 2, seed=0, sizes=Sizes(ct_matrix=args.matrix))
        index = index_sources([archive.root])
        rows = {row["file_id"]: row for row in index.to_pylist()}
        worst = 0.0
        for study in plan(index).studies:
            for name, config in (("native", VolumeConfig.native()), ("default", VolumeConfig())):
                for scan_plan in study.scans:
                    voxels = declared_study_voxels([scan_plan], rows)
                    tracemalloc.start()
                    build_scan(scan_plan, rows, config)
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    ratio = peak / voxels
                    worst = max(worst, ratio)
                    print(
                        f"{study.modality} {scan_plan.name:>12} {name:>7} {voxels:>10} voxels: "
                        f"peak {peak / 2**20:7.1f} MiB = {ratio:5.1f} B/voxel ({ratio / 2:4.1f}x the int16 output)"
                    )
        print(f"worst: {worst:.1f} bytes per declared voxel")


if __name__ == "__main__":
    main()
