"""Benchmark the training data loader against the reference HLIP loading path, per worker.

Both sides run as a ``torch.utils.data.DataLoader`` with one worker process (one thread:
DataLoader workers run torch single-threaded, and zarr decodes one chunk at a time) and
produce, for every study, 4 scans cropped at random offsets to 48x224x224, windowed to the
CT window [-1150, 350] HU and standardised as HLIP does, ``(x - 0.449) / 0.226``, in
batches of 4 studies delivered to the main process. They read the same phantom studies
(default 56x240x240 int16 scans, realistic noise inside the body so they compress like CT):

* **shards** (hlip), one row per slab codec (``hlip.shards.format.SLAB_CODECS``: the default
  zstd, and lz4hc, as ``hlip-ingest run --codec lz4hc`` writes): the training loader itself
  (``hlip.train.data.build_train_loader``): stream studies from tar shards (zarr.zip members),
  decode only the slabs of slices the crop overlaps, window and standardise the crop,
  tokenize the report (256 tokens) and pack the batch into patch order (``pack_studies``,
  which the reference leaves to the GPU). Readers need no setting for the codec (zarr records
  it with each array);
* **reference**: HLIP's layout, one float32 ``.pt`` per scan: ``torch.load`` each scan,
  window the volume, crop, standardise, stack (no tokenizing, no packing).

Two regimes, the same for both sides:

* **warm**: the files were just written and a warm-up pass reads all of them before the
  timed passes, so every read is a memory copy from the page cache;
* **cold**: the worker evicts the benchmark's own files from the page cache
  (``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``; the rest of the machine's cache is left
  alone) at the start of every pass, so every pass reads its bytes from storage. This is
  pre-training's regime: hundreds of thousands of studies, terabytes, do not fit the page
  cache. ``--dir`` must be on a disk (on tmpfs the eviction does nothing).

Every row is measured ``--rounds`` times, the rows interleaved, and the medians printed with
each round's wall ratio (the reference's rate drifts with the machine's memory state from
run to run, so ratios are taken within a round). Reported per side: studies per wall-second
of the loader, and studies per CPU-second of the worker plus the main process (CPU time does
not count what other programs on a loaded machine take, so it is the steadier number and the
one to size cores by; time waiting for storage is not CPU time), each as a ratio to the
reference; and the study's size on disk with, in parentheses, the MB per study the worker
actually read from storage over the timed passes (about 0 warm; about the size cold, which
checks the eviction). Linux only (worker CPU time and reads come from /proc). Run:
``.venv/bin/python bench/loader.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hlip.model.text import Tokenizer
from hlip.shards import format as fmt
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import write_dataset
from hlip.train.config import HLIP_INTENSITY_MEAN, HLIP_INTENSITY_STD, load_config
from hlip.train.data import DataState, TrainStream, build_train_loader

CROP = (48, 224, 224)
WINDOW = (-1150.0, 350.0)
PATCH = (8, 16, 16)
CONTEXT_LENGTH = 256


def evict(files: Iterable[Path]) -> None:
    """Drop these files' pages from the page cache (theirs only: the machine is shared), so
    the next read comes from storage. Dirty pages cannot be dropped, hence the fsync."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class ReferenceStudies(Dataset):
    """HLIP's loader: per study, load, window, crop and standardise each float32 scan.

    With ``cold_files``, they are evicted from the page cache whenever a pass over the
    studies starts (in the worker, so prefetching cannot read ahead of the eviction).
    """

    def __init__(self, studies: list[list[Path]], length: int, cold_files: tuple[Path, ...] = ()) -> None:
        self.studies, self.length, self.cold_files = studies, length, cold_files

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if index % len(self.studies) == 0:
            evict(self.cold_files)
        rng = np.random.default_rng(index)
        scans = []
        for path in self.studies[index % len(self.studies)]:
            volume = torch.load(path, weights_only=True)
            volume = torch.clip((volume.float() - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0.0, 1.0)
            starts = [int(rng.integers(0, s - c + 1)) for c, s in zip(CROP, volume.shape, strict=True)]
            crop = volume[tuple(slice(a, a + c) for a, c in zip(starts, CROP, strict=True))]
            scans.append((crop - HLIP_INTENSITY_MEAN) / HLIP_INTENSITY_STD)
        return torch.stack(scans)[:, None]


def make_data(root: Path, studies: int, scans: int, shape: tuple[int, int, int]) -> dict[str, Path]:
    """The same studies as shards written with each slab codec (``shards-<codec>``) and as
    .pt files (``pt``)."""
    examples = [synthetic_study(f"study{i:03d}", n_scans=scans, shape=shape, seed=i) for i in range(studies)]
    for codec in fmt.SLAB_CODECS:
        write_dataset(root / f"shards-{codec}", examples, codec=codec)
    for study in examples:
        for scan in study.scans:
            path = root / "pt" / study.key / f"{scan.name}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(scan.array.astype(np.float32)), path)
    return {name: root / name for name in ("pt", *(f"shards-{codec}" for codec in fmt.SLAB_CODECS))}


def shard_loader(shards: Path, scans: int, batch: int) -> DataLoader:
    """The training loader of one rank with one worker, on these shards."""
    config = load_config(
        "demo-cpu",
        [
            f'data=["{shards}"]',
            f"img_size={list(CROP)}",
            "random_crop=true",
            f"ct_windows=[{list(WINDOW)}]",
            f"intensity_mean={HLIP_INTENSITY_MEAN}",
            f"intensity_std={HLIP_INTENSITY_STD}",
            f"max_scans={scans}",
            "shuffle_buffer=0",
            'text_mode="full"',
            "text_sections=[]",
            f"batch_size={batch}",
            "accum_steps=1",
            "num_workers=1",
        ],
    )
    tokenizer = Tokenizer(None, context_length=CONTEXT_LENGTH)
    return build_train_loader(config, tokenizer, PATCH, 0, 1, DataState(), pin_memory=False)


def reference_loader(pt_root: Path, batch: int, length: int, cold: bool) -> DataLoader:
    studies = [sorted(d.glob("*.pt")) for d in sorted(pt_root.iterdir())]
    cold_files = tuple(path for study in studies for path in study) if cold else ()
    return DataLoader(ReferenceStudies(studies, length, cold_files), batch_size=batch, num_workers=1)


@contextlib.contextmanager
def cold_epochs(shards: Path, cold: bool) -> Iterator[None]:
    """With ``cold``, the training stream evicts the shards from the page cache whenever it
    starts an epoch (a pass over the studies), in the worker like the reference does."""
    if not cold:
        yield
        return
    files = tuple(sorted(shards.glob("*.tar")))
    studies = TrainStream.studies

    def evicting(self: TrainStream, *args: int) -> Iterator:
        evict(files)
        return studies(self, *args)

    with mock.patch.object(TrainStream, "studies", evicting):
        yield


def children_stats() -> tuple[float, int]:
    """CPU seconds (user + system) and bytes read from storage of this process's live
    children (the DataLoader worker)."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu, read = 0, 0
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu += int(fields[11]) + int(fields[12])  # utime, stime
        io = dict(line.split(": ") for line in Path(f"/proc/{child.pid}/io").read_text().splitlines())
        read += int(io["read_bytes"])
    return cpu / ticks, read


@dataclass(frozen=True)
class Rate:
    wall: float
    """studies per wall-second"""
    cpu: float
    """studies per CPU-second (worker + main process)"""
    storage_mb: float
    """MB per study the worker read from storage (not from the page cache)"""


def measure(loader: Iterable, batch: int, warm_batches: int, timed_batches: int) -> Rate:
    """Rates over ``timed_batches`` batches after ``warm_batches`` (page cache, allocator, imports)."""
    batches = iter(loader)
    for _ in range(warm_batches):
        next(batches)
    cpu, read = children_stats()
    wall, cpu = time.perf_counter(), time.process_time() + cpu
    for _ in range(timed_batches):
        next(batches)
    wall = time.perf_counter() - wall
    end_cpu, end_read = children_stats()
    cpu = time.process_time() + end_cpu - cpu
    del batches  # stops the worker
    studies = batch * timed_batches
    return Rate(studies / wall, studies / cpu, (end_read - read) / studies / 1e6)


def megabytes_per_study(root: Path, pattern: str, studies: int) -> float:
    return sum(p.stat().st_size for p in root.glob(pattern)) / studies / 1e6


def measure_regime(paths: dict[str, Path], args: argparse.Namespace, cold: bool) -> list[tuple[str, Rate]]:
    """The three rows, with the page cache warm or each timed pass read from storage."""
    per_pass = args.studies // args.batch
    timed = per_pass * args.passes
    length = args.batch * (per_pass + timed)
    rows = [
        (
            "reference (.pt float32: load, window, crop, standardise)",
            measure(reference_loader(paths["pt"], args.batch, length, cold), args.batch, per_pass, timed),
        )
    ]
    for codec in fmt.SLAB_CODECS:
        default = " (default)" if codec == fmt.DEFAULT_CODEC else ""
        key = f"shards-{codec}"
        with cold_epochs(paths[key], cold):
            loader = shard_loader(paths[key], args.scans, args.batch)
            rows.append(
                (
                    f"shards, {codec}{default} (decode, window, tokenize, pack)",
                    measure(loader, args.batch, per_pass, timed),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[56, 240, 240])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--passes", type=int, default=8, help="timed passes over the studies")
    parser.add_argument("--dir", default=None, help="where to write the data (a disk, not tmpfs)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measure every row this many times, interleaved; print medians"
    )
    args = parser.parse_args()
    if args.studies % args.batch:
        parser.error("--studies must be a multiple of --batch")
    with tempfile.TemporaryDirectory(prefix="hlip-bench-loader-", dir=args.dir) as tmp:
        paths = make_data(Path(tmp), args.studies, args.scans, tuple(args.shape))
        sizes = [
            megabytes_per_study(path, "*/*.pt" if key == "pt" else "*.tar", args.studies)
            for key, path in paths.items()
        ]
        rounds = [
            {cold: measure_regime(paths, args, cold) for cold in (False, True)} for _ in range(args.rounds)
        ]
    print(
        f"{args.studies} studies x {args.scans} scans of {tuple(args.shape)} int16 -> crops {CROP}, "
        f"batches of {args.batch}, one DataLoader worker, {args.passes} timed passes, "
        f"median of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}"
    )
    for cold in (False, True):
        regime = "cold: each pass read from storage" if cold else "warm page cache"
        print(f"\n{regime:58s} studies/s  studies/CPU-s  vs reference (wall, CPU)  MB/study (read)")
        names = [name for name, _ in rounds[0][cold]]
        for row, (name, size) in enumerate(zip(names, sizes, strict=True)):
            rates = [r[cold][row][1] for r in rounds]
            references = [r[cold][0][1] for r in rounds]
            wall, cpu = (statistics.median(getattr(rate, f) for rate in rates) for f in ("wall", "cpu"))
            ratio_wall, ratio_cpu = (
                statistics.median(
                    getattr(a, f) / getattr(b, f) for a, b in zip(rates, references, strict=True)
                )
                for f in ("wall", "cpu")
            )
            storage = statistics.median(rate.storage_mb for rate in rates)
            ratios = f"{ratio_wall:5.2f}x, {ratio_cpu:5.2f}x"
            print(f"{name:58s} {wall:9.2f}  {cpu:13.2f}  {ratios:>25s}  {size:8.1f} ({storage:4.1f})")
            if args.rounds > 1:
                spread = ", ".join(f"{a.wall / b.wall:.2f}" for a, b in zip(rates, references, strict=True))
                print(f"{'':58s} wall ratio per round: {spread}")


if __name__ == "__main__":
    main()
