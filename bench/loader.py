"""Benchmark the training data loader against the reference HLIP loading path, per worker.

Both sides produce, for every study, 4 scans cropped to 48x224x224, windowed to the CT
window [-1150, 350] HU and standardised as HLIP does; they run in this one process (one
DataLoader worker's worth of CPU) over the same phantom studies (default 56x240x240 int16
scans, realistic noise so they compress like CT):

* **shards** (hlip): stream studies from tar shards (zarr.zip members), decode only the
  slabs of slices the random crop overlaps, window and standardise the crop, tokenize the
  report and pack the batch (``hlip.train.data``: TrainStream + Collate);
* **reference**: HLIP's layout, one float32 ``.pt`` per scan: ``torch.load`` each scan,
  window the volume, pad/crop to 48x224x224, standardise, stack (no tokenizing, no packing).

It prints studies per CPU-second of each (the rate of one worker that has a core to itself;
best of ``--repeats`` passes after a warm-up pass, so both read from the page cache) and
their ratio. Run: ``.venv/bin/python bench/loader.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import write_dataset
from hlip.train.config import HLIP_INTENSITY_MEAN, HLIP_INTENSITY_STD, load_config
from hlip.train.data import Collate, DataState, TrainStream

CROP = (48, 224, 224)
WINDOW = (-1150.0, 350.0)
PATCH = (8, 16, 16)


def reference_study(paths: list[Path], rng: np.random.Generator) -> torch.Tensor:
    """HLIP's loader for one study: load, window, pad/crop, standardise each float32 scan."""
    scans = []
    for path in paths:
        volume = torch.load(path, weights_only=True)
        volume = torch.clip((volume.float() - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0.0, 1.0)
        pad = [max(0, c - s) for c, s in zip(CROP, volume.shape, strict=True)]
        if any(pad):
            volume = torch.nn.functional.pad(volume, [p for n in reversed(pad) for p in (n // 2, n - n // 2)])
        starts = [int(rng.integers(0, s - c + 1)) for c, s in zip(CROP, volume.shape, strict=True)]
        crop = volume[tuple(slice(a, a + c) for a, c in zip(starts, CROP, strict=True))]
        scans.append((crop - HLIP_INTENSITY_MEAN) / HLIP_INTENSITY_STD)
    return torch.stack(scans)[:, None]


def make_data(
    root: Path, studies: int, scans: int, shape: tuple[int, int, int]
) -> tuple[Path, list[list[Path]]]:
    """The same studies as shards and as one float32 .pt per scan."""
    examples = [synthetic_study(f"study{i:03d}", n_scans=scans, shape=shape, seed=i) for i in range(studies)]
    write_dataset(root / "shards", examples)
    reference = []
    for study in examples:
        paths = []
        for scan in study.scans:
            path = root / "pt" / study.key / f"{scan.name}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(scan.array.astype(np.float32)), path)
            paths.append(path)
        reference.append(paths)
    return root / "shards", reference


def shard_rate(shards: Path, studies: int, scans: int, batch: int, repeats: int) -> float:
    """Studies/s of TrainStream (decode, crop, window) + Collate (tokenize, pack)."""
    from hlip.model.text import Tokenizer

    config = load_config(
        "demo-cpu",
        [
            f'data=["{shards}"]',
            f"img_size={list(CROP)}",
            f"max_scans={scans}",
            "shuffle_buffer=0",
            'text_mode="full"',
        ],
    )
    collate = Collate(Tokenizer(None, context_length=128), PATCH)

    def one_pass(epoch: int) -> None:
        start = DataState(positions={0: (epoch, 0)})  # each pass is one epoch: new crops
        samples = list(islice(iter(TrainStream(config, rank=0, world_size=1, state=start)), studies))
        for i in range(0, studies, batch):
            collate(samples[i : i + batch])

    return best_rate(one_pass, studies, repeats)


def reference_rate(reference: list[list[Path]], repeats: int) -> float:
    rng = np.random.default_rng(0)

    def one_pass(_: int) -> None:
        for paths in reference:
            reference_study(paths, rng)

    return best_rate(one_pass, len(reference), repeats)


def best_rate(one_pass, studies: int, repeats: int) -> float:
    """Studies per CPU-second of this process (all its threads: zarr decodes in a helper
    thread), best of ``repeats`` passes after a warm-up; CPU time, unlike wall time, does not
    count the time other programs on the machine take from this one."""
    one_pass(0)  # warm-up: page cache, imports, allocator
    times = []
    for epoch in range(1, repeats + 1):
        start = time.process_time()
        one_pass(epoch)
        times.append(time.process_time() - start)
    return studies / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[56, 240, 240])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's worth of CPU
    with tempfile.TemporaryDirectory(prefix="hlip-bench-loader-") as tmp:
        shards, reference = make_data(Path(tmp), args.studies, args.scans, tuple(args.shape))
        ours = shard_rate(shards, args.studies, args.scans, args.batch, args.repeats)
        theirs = reference_rate(reference, args.repeats)
    print(
        f"{args.studies} studies x {args.scans} scans of {tuple(args.shape)} int16 -> crops {CROP}, one worker"
    )
    print(f"reference (.pt float32: load, window, crop, normalize): {theirs:7.2f} studies per CPU-second")
    print(f"shards (decode slabs, crop, window, tokenize, pack):     {ours:7.2f} studies per CPU-second")
    print(f"ratio shards / reference: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
