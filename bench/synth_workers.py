"""Time of writing a synthetic archive by several processes (``hlip-ingest synth --workers``)
against one process (the baseline), and a check that both write the same bytes.

    .venv/bin/python bench/synth_workers.py [--studies 48] [--workers 2] [--lesion-scale 2]

The demo's training archive is 480 studies of the same kinds; its synthesis scales with the
number of studies, so the ratio carries over.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from hlip.synth import Sizes, make_archive


def digest(root: Path) -> str:
    """One hash over every file's relative path and bytes."""
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        total.update(path.relative_to(root).as_posix().encode())
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return total.hexdigest()


def timed(out: Path, studies: int, sizes: Sizes, workers: int) -> tuple[float, str]:
    start = time.perf_counter()
    make_archive(out, studies, seed=0, sizes=sizes, workers=workers)
    return time.perf_counter() - start, digest(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lesion-scale", type=float, default=2.0)
    args = parser.parse_args()
    sizes = Sizes(lesion_scale=args.lesion_scale)
    with tempfile.TemporaryDirectory(prefix="hlip-synth-bench-") as scratch:
        one, one_digest = timed(Path(scratch) / "one", args.studies, sizes, 0)
        many, many_digest = timed(Path(scratch) / "many", args.studies, sizes, args.workers)
    print(f"{args.studies} studies, one process (baseline): {one:.1f} s ({one / args.studies:.2f} s/study)")
    print(
        f"{args.studies} studies, {args.workers} worker processes: {many:.1f} s ({many / args.studies:.2f} s/study)"
    )
    print(f"ratio {many / one:.2f}x; same bytes: {one_digest == many_digest}")


if __name__ == "__main__":
    main()
