"""Benchmark the training data loader against the reference HLIP loading path, per worker.

Both sides run as a ``torch.utils.data.DataLoader`` with one worker process (one thread:
DataLoader workers run torch single-threaded, and zarr decodes one chunk at a time) and
produce, for every study, 4 scans cropped at random offsets to 48x224x224, windowed to the
CT window [-1150, 350] HU and standardised as HLIP does, ``(x - 0.449) / 0.226``, in
batches of 4 studies delivered to the main process. They read the same phantom studies
(default 56x240x240 int16 scans, realistic noise inside the body so they compress like CT):

* **shards** (hlip): the training loader itself (``hlip.train.data.build_train_loader``):
  stream studies from tar shards (zarr.zip members), decode only the slabs of slices the
  crop overlaps, window and standardise the crop, tokenize the report (256 tokens) and pack
  the batch into patch order (``pack_studies``, which the reference leaves to the GPU);
* **shards, Blosc lz4**: the same shards written with Blosc lz4 instead of the format's
  zstd. Decompression is the largest cost of the shards row, and lz4 decompresses several
  times faster for about 40% more bytes: the row says what that trade is worth. Readers
  need no change (zarr records the codec with each array);
* **reference**: HLIP's layout, one float32 ``.pt`` per scan: ``torch.load`` each scan,
  window the volume, crop, standardise, stack (no tokenizing, no packing).

The page cache is warm for both: the files were just written and a warm-up pass reads all
of them before the timed passes. Real datasets are larger than memory, where the reference
also reads 2-3x more bytes per study from storage than the shards (the MB column).

Reported per side: studies per wall-second of the loader, and studies per CPU-second of the
worker plus the main process (CPU time does not count what other programs on a loaded
machine take, so it is the steadier number and the one to size cores by); the ratio
column compares CPU rates. Linux only (worker CPU time comes from /proc). Run:
``.venv/bin/python bench/loader.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterable
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
from hlip.train.data import DataState, build_train_loader

CROP = (48, 224, 224)
WINDOW = (-1150.0, 350.0)
PATCH = (8, 16, 16)
CONTEXT_LENGTH = 256


class ReferenceStudies(Dataset):
    """HLIP's loader: per study, load, window, crop and standardise each float32 scan."""

    def __init__(self, studies: list[list[Path]], length: int) -> None:
        self.studies, self.length = studies, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
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
    """The same studies as shards (zstd, the format's codec), as lz4 shards and as .pt files."""
    examples = [synthetic_study(f"study{i:03d}", n_scans=scans, shape=shape, seed=i) for i in range(studies)]
    write_dataset(root / "shards", examples)
    with mock.patch.object(fmt, "BLOSC_CNAME", "lz4"):
        write_dataset(root / "shards-lz4", examples)
    for study in examples:
        for scan in study.scans:
            path = root / "pt" / study.key / f"{scan.name}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(scan.array.astype(np.float32)), path)
    return {name: root / name for name in ("shards", "shards-lz4", "pt")}


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


def reference_loader(pt_root: Path, batch: int, length: int) -> DataLoader:
    studies = [sorted(d.glob("*.pt")) for d in sorted(pt_root.iterdir())]
    return DataLoader(ReferenceStudies(studies, length), batch_size=batch, num_workers=1)


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's live children (the DataLoader worker)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


@dataclass(frozen=True)
class Rate:
    wall: float
    """studies per wall-second"""
    cpu: float
    """studies per CPU-second (worker + main process)"""


def measure(loader: Iterable, batch: int, warm_batches: int, timed_batches: int) -> Rate:
    """Rates over ``timed_batches`` batches after ``warm_batches`` (page cache, allocator, imports)."""
    batches = iter(loader)
    for _ in range(warm_batches):
        next(batches)
    wall, cpu = time.perf_counter(), time.process_time() + children_cpu_seconds()
    for _ in range(timed_batches):
        next(batches)
    wall = time.perf_counter() - wall
    cpu = time.process_time() + children_cpu_seconds() - cpu
    del batches  # stops the worker
    studies = batch * timed_batches
    return Rate(studies / wall, studies / cpu)


def megabytes_per_study(root: Path, pattern: str, studies: int) -> float:
    return sum(p.stat().st_size for p in root.glob(pattern)) / studies / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[56, 240, 240])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--passes", type=int, default=8, help="timed passes over the studies")
    args = parser.parse_args()
    if args.studies % args.batch:
        parser.error("--studies must be a multiple of --batch")
    per_pass = args.studies // args.batch
    timed = per_pass * args.passes
    with tempfile.TemporaryDirectory(prefix="hlip-bench-loader-") as tmp:
        paths = make_data(Path(tmp), args.studies, args.scans, tuple(args.shape))
        length = args.batch * (per_pass + timed)
        rows = [
            (
                "reference (.pt float32: load, window, crop, normalize)",
                measure(reference_loader(paths["pt"], args.batch, length), args.batch, per_pass, timed),
                megabytes_per_study(paths["pt"], "*/*.pt", args.studies),
            ),
            (
                f"shards, Blosc {fmt.BLOSC_CNAME} (decode, crop, window, tokenize, pack)",
                measure(shard_loader(paths["shards"], args.scans, args.batch), args.batch, per_pass, timed),
                megabytes_per_study(paths["shards"], "*.tar", args.studies),
            ),
            (
                "shards, Blosc lz4 (same)",
                measure(
                    shard_loader(paths["shards-lz4"], args.scans, args.batch), args.batch, per_pass, timed
                ),
                megabytes_per_study(paths["shards-lz4"], "*.tar", args.studies),
            ),
        ]
    print(
        f"{args.studies} studies x {args.scans} scans of {tuple(args.shape)} int16 -> crops {CROP}, "
        f"batches of {args.batch}, one DataLoader worker, {args.passes} timed passes, warm page cache; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':62s} studies/s  studies/CPU-s  vs reference  MB/study")
    reference = rows[0][1].cpu
    for name, rate, size in rows:
        print(f"{name:62s} {rate.wall:9.2f}  {rate.cpu:13.2f}  {rate.cpu / reference:11.2f}x  {size:8.1f}")


if __name__ == "__main__":
    main()
