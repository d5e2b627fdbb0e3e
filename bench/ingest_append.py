"""Benchmark datasets that grow: the cost of appending new studies, and of a re-run that
finds nothing new, against fresh ingests measured in the same run.

For each base size B (default 8, 32 and 128 studies of small synthetic CT/MR studies, where
per-file costs dominate as they do in real exports) and N new studies (default 4):

* ``fresh``: ingest the base archive into an empty output (the baseline of the re-run);
* ``unchanged``: the same command again (index rows reused, every study found done, no
  version committed); goal: at most 0.05x ``fresh``;
* ``append``: the base and the new archive into the base's output (a new version of the N
  new studies); ``alone``: the new archive alone into an empty output (its baseline);
  goal: ``append`` at most 1.2x ``alone``, whatever B.

``--trust-folder-times`` runs every ingest with that setting: the re-runs then skip the
base's folders, whose times are unchanged, instead of listing and stat'ing their files.

Every ingest runs in this process (``workers=0``: no cluster start-up in the numbers),
timed by wall clock; the best of ``--repeat`` runs is kept (each run starts from copies
of the same outputs, so it does the same work), and ``append`` and ``alone`` take turns.

Run: ``.venv/bin/python bench/ingest_append.py`` (``--base 8 32 128 --new 4 --repeat 5``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hlip.ingest.config import IngestConfig
from hlip.ingest.index import iter_source_files
from hlip.ingest.pipeline import run_ingest
from hlip.synth import Sizes, make_archive

SIZES = Sizes(ct_matrix=64, mr_matrix=64, ct_coverage_mm=80.0)


def _config(reports: Path, trust_folder_times: bool = False) -> IngestConfig:
    return IngestConfig(
        target_spacing={"CT": (5.0, 4.0, 4.0)},
        report_table=str(reports),
        secret="bench",
        trust_folder_times=trust_folder_times,
    )


def _reports(path: Path, *tables: Path) -> Path:
    """One report table with the rows of ``tables`` (same header)."""
    lines = [table.read_text().splitlines() for table in tables]
    path.write_text("\n".join([lines[0][0], *(row for table in lines for row in table[1:])]) + "\n")
    return path


Job = tuple[Callable[[], None], Callable[[], object]]
"""What to prepare (untimed), and what to time."""


def _best(repeat: int, **jobs: Job) -> dict[str, float]:
    """The best wall time of each job over ``repeat`` rounds, the jobs taking turns within a
    round, so that a slow spell of the machine falls on both sides of a ratio."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeat):
        for name, (prepare, run) in jobs.items():
            prepare()
            os.sync()  # the copy's writeback would otherwise land inside the timed run
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _copy(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    if source is not None:
        shutil.copytree(source, target)


def measure(root: Path, base_studies: int, new_studies: int, repeat: int, trust: bool) -> dict[str, float]:
    base = make_archive(root / f"base{base_studies}", base_studies, seed=1, sizes=SIZES)
    new = make_archive(root / f"new{base_studies}", new_studies, seed=1000 + base_studies, sizes=SIZES)
    both = _reports(root / f"reports{base_studies}.csv", base.reports_csv, new.reports_csv)
    config = _config(both, trust)
    done, work = root / f"done{base_studies}", root / "work"
    fresh = _best(
        repeat, fresh=(lambda: _copy(None, work), lambda: run_ingest([base.root], work, config, workers=0))
    )
    shutil.copytree(work, done)
    timed = _best(
        repeat,
        unchanged=(lambda: _copy(done, work), lambda: run_ingest([base.root], work, config, workers=0)),
    )
    timed |= _best(
        repeat,
        append=(
            lambda: _copy(done, work),
            lambda: run_ingest([base.root, new.root], work, config, workers=0),
        ),
        alone=(lambda: _copy(None, work), lambda: run_ingest([new.root], work, config, workers=0)),
    )
    files = {
        name: sum(1 for _ in iter_source_files([str(a.root)])) for name, a in (("base", base), ("new", new))
    }
    return {**fresh, **timed, **files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", type=int, nargs="+", default=[8, 32, 128], help="Base archive sizes (studies)."
    )
    parser.add_argument("--new", type=int, default=4, help="New studies appended.")
    parser.add_argument("--repeat", type=int, default=5, help="Best of this many runs per measurement.")
    parser.add_argument(
        "--trust-folder-times", action="store_true", help="Re-runs skip folders whose times are unchanged."
    )
    args = parser.parse_args()
    print(
        "base studies (files) | new (files) | fresh s | unchanged s | unchanged/fresh (goal <= 0.05) "
        "| alone s | append s | append/alone (goal <= 1.2)"
    )
    with tempfile.TemporaryDirectory(prefix="hlip-append-") as folder:
        for base_studies in args.base:
            m = measure(Path(folder), base_studies, args.new, args.repeat, args.trust_folder_times)
            print(
                f"{base_studies} ({m['base']}) | {args.new} ({m['new']}) | {m['fresh']:.2f} | "
                f"{m['unchanged']:.2f} | {m['unchanged'] / m['fresh']:.3f} | {m['alone']:.2f} | "
                f"{m['append']:.2f} | {m['append'] / m['alone']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
