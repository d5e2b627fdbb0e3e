"""Benchmark the study-shard format against the reference HLIP layout and NIfTI.

On one synthetic CT study (default 3 scans of 100x350x350 int16, see
hlip.shards.synthetic) it measures, in the same run:

* storage: shard bytes vs one float32 ``.pt`` per scan (torch.save, the reference HLIP
  layout) and vs one ``.nii.gz`` per scan (nibabel), and that the shard is lossless;
* write and read throughput (MB/s of int16 voxels) for shards, ``.pt`` and ``.nii.gz``;
* latency of reading 16 slices from the middle of a scan vs the whole scan;
* the same for several slab depths (slices per zarr chunk), to justify the default;
* every slab codec (``hlip.shards.format.SLAB_CODECS``) on the same slabs: size, CPU time to
  compress and to decompress, each against the default codec; and the default codec with
  Blosc's own block size, which the format's 4 MiB blocks replace.

Run: ``.venv/bin/python bench/shards.py`` (``--small`` for a quick run; ``--codec lz4hc`` for
shards written with that slab codec instead of the default zstd).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import torch
from numcodecs import Blosc

from hlip.shards import format as fmt
from hlip.shards.inspect import scan_to_nifti
from hlip.shards.reader import ShardDataset
from hlip.shards.stream import stream_studies
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import encode_slabs, write_dataset

WINDOW = 16
BASELINE_CODECS = {"zstd, Blosc's blocks": dataclasses.replace(fmt.SLAB_CODECS["zstd"], blocksize=0)}
"""Compared in the codec table, not offered: the default codec with the block size Blosc
picks by itself (small blocks, which the format's 4 MiB replace)."""


def best_of(repeats: int, run: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Fastest of ``repeats`` runs after a warm-up: the least disturbed by other load."""
    run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return min(times)


def cpu_best_of(repeats: int, run: Callable[[], object]) -> float:
    """CPU seconds of this process (all threads): the work done, whatever else runs."""
    return best_of(repeats, run, clock=time.process_time)


def directory_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_codecs(study, repeats: int) -> dict[str, dict[str, float]]:
    """Per slab codec: compressed bytes, and the CPU seconds to compress every slab of the
    study (the writer's ``encode_slabs``) and to decompress them (Blosc, as the reader does)."""
    out, blosc = np.empty((8, *study.scans[0].shape[1:]), fmt.ARRAY_DTYPE), Blosc()

    def encode(codec: str) -> dict[str, bytes]:
        return {
            k: v for scan in study.scans for k, v in encode_slabs(scan.name, scan.array, 8, codec).items()
        }

    results = {}
    with mock.patch.dict(fmt.SLAB_CODECS, BASELINE_CODECS):
        for codec in fmt.SLAB_CODECS:
            frames = list(encode(codec).values())
            results[codec] = {
                "bytes": sum(len(frame) for frame in frames),
                "encode_cpu": cpu_best_of(repeats, functools.partial(encode, codec)),
                "decode_cpu": cpu_best_of(
                    repeats, lambda frames=frames: [blosc.decode(f, out=out) for f in frames]
                ),
            }
    return results


def bench_baselines(study, work: Path, repeats: int) -> dict[str, float]:
    """Write and read the reference float32 .pt files and .nii.gz files."""
    results = {}
    pt_dir, nii_dir = work / "pt", work / "nii"
    pt_dir.mkdir()
    nii_dir.mkdir()

    def write_pt():
        for scan in study.scans:
            torch.save(torch.from_numpy(scan.array.astype(np.float32)), pt_dir / f"{scan.name}.pt")

    def write_nii():
        for scan in study.scans:
            nib.save(scan_to_nifti(scan), nii_dir / f"{scan.name}.nii.gz")

    results["pt_write_s"] = timed(write_pt)
    results["nii_write_s"] = timed(write_nii)
    results["pt_bytes"] = directory_bytes(pt_dir, "*.pt")
    results["nii_bytes"] = directory_bytes(nii_dir, "*.nii.gz")
    results["pt_read_s"] = best_of(repeats, lambda: [torch.load(p) for p in sorted(pt_dir.glob("*.pt"))])
    results["nii_read_s"] = best_of(
        max(1, repeats // 3),
        lambda: [np.asarray(nib.load(p).dataobj) for p in sorted(nii_dir.glob("*.nii.gz"))],
    )
    return results


def bench_shards(study, work: Path, repeats: int, slab_depth: int, codec: str) -> dict[str, float]:
    """Write one dataset with ``slab_depth`` and ``codec`` and time full and windowed reads."""
    out = work / f"shards-slab{slab_depth}"
    results = {"write_s": timed(lambda: write_dataset(out, [study], slab_depth=slab_depth, codec=codec))}
    results["bytes"] = directory_bytes(out, "*.tar")
    dataset = ShardDataset(out)
    opened = dataset.open(study.key)
    for got, want in zip(opened.scans, study.scans, strict=True):
        if not np.array_equal(got.array[...], want.array):
            raise AssertionError(f"shard of scan {want.name} is not lossless")
    middle = study.scans[0].shape[0] // 2
    window = slice(middle - WINDOW // 2, middle + WINDOW // 2)
    results["read_s"] = best_of(repeats, lambda: [s.array[...] for s in dataset.open(study.key).scans])
    results["stream_s"] = best_of(
        repeats, lambda: [s.array[...] for st in stream_studies(out) for s in st.scans]
    )
    results["scan_full_s"] = best_of(repeats * 3, lambda: opened.scans[0].array[...])
    results["scan_window_s"] = best_of(repeats * 3, lambda: opened.scans[0].array[window])
    results["open_s"] = best_of(repeats * 3, lambda: dataset.open(study.key))
    results["open_unverified_s"] = best_of(repeats * 3, lambda: dataset.open(study.key, verify=False))
    results["scan_full_cpu"] = cpu_best_of(repeats * 3, lambda: opened.scans[0].array[...])
    results["scan_window_cpu"] = cpu_best_of(repeats * 3, lambda: opened.scans[0].array[window])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="3 scans of 40x128x128 instead of 100x350x350")
    parser.add_argument("--scans", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--noise-everywhere", action="store_true", help="also add noise to the air around the body"
    )
    parser.add_argument("--codec", default=fmt.DEFAULT_CODEC, choices=sorted(fmt.SLAB_CODECS))
    args = parser.parse_args()
    shape = (40, 128, 128) if args.small else (100, 350, 350)
    study = synthetic_study("bench", n_scans=args.scans, shape=shape, noise_everywhere=args.noise_everywhere)
    voxel_mb = sum(scan.array.nbytes for scan in study.scans) / 1e6
    print(
        f"study: {args.scans} scans of {'x'.join(map(str, shape))} int16 ({voxel_mb:.1f} MB of int16 voxels)"
    )
    print(
        f"phantom noise: {'everywhere' if args.noise_everywhere else 'inside the body'}; "
        f"codec {fmt.SLAB_CODECS[args.codec]}; {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = bench_baselines(study, work, args.repeats)
        sweep = {
            depth: bench_shards(study, work, args.repeats, depth, args.codec) for depth in (4, 8, 16, 32)
        }
    codecs = bench_codecs(study, args.repeats)
    shard = sweep[fmt.DEFAULT_SLAB_DEPTH]

    print("\nstorage (bytes per study)")
    print(f"  float32 .pt per scan   {base['pt_bytes'] / 1e6:9.2f} MB   1.000x")
    print(
        f"  .nii.gz per scan       {base['nii_bytes'] / 1e6:9.2f} MB   {base['nii_bytes'] / base['pt_bytes']:.3f}x"
    )
    print(
        f"  shard (slab {fmt.DEFAULT_SLAB_DEPTH})          {shard['bytes'] / 1e6:9.2f} MB   "
        f"{shard['bytes'] / base['pt_bytes']:.3f}x  (vs .nii.gz {shard['bytes'] / base['nii_bytes']:.3f}x), lossless"
    )

    print("\nthroughput (MB/s of int16 voxels)")
    print(
        f"  write: shard {voxel_mb / shard['write_s']:7.0f}   .pt {voxel_mb / base['pt_write_s']:7.0f}   "
        f".nii.gz {voxel_mb / base['nii_write_s']:7.0f}"
    )
    print(
        f"  read:  shard {voxel_mb / shard['read_s']:7.0f}   .pt {voxel_mb / base['pt_read_s']:7.0f}   "
        f".nii.gz {voxel_mb / base['nii_read_s']:7.0f}   (shard via stream {voxel_mb / shard['stream_s']:.0f})"
    )

    print(f"\nslab sweep: {WINDOW} middle slices of {shape[0]} vs the whole scan of an opened study (ms)")
    print("  slab  bytes vs .pt   wall: whole  16 slices   ratio   cpu: whole  16 slices   ratio")
    for depth, r in sweep.items():
        print(
            f"  {depth:4d}  {r['bytes'] / base['pt_bytes']:11.3f}x  {r['scan_full_s'] * 1e3:11.1f}  "
            f"{r['scan_window_s'] * 1e3:9.1f}  {r['scan_window_s'] / r['scan_full_s']:6.3f}x  "
            f"{r['scan_full_cpu'] * 1e3:10.1f}  {r['scan_window_cpu'] * 1e3:9.1f}  "
            f"{r['scan_window_cpu'] / r['scan_full_cpu']:6.3f}x"
        )
    print(
        f"\nopening the study ({shard['bytes'] / 1e6:.1f} MB of members): {shard['open_s'] * 1e3:.1f} ms with sha256, "
        f"{shard['open_unverified_s'] * 1e3:.1f} ms with verify=False (zip CRC-32 still checks each entry read)"
    )
    for label, open_s in (("verified", shard["open_s"]), ("verify=False", shard["open_unverified_s"])):
        whole, part = open_s + shard["scan_full_s"], open_s + shard["scan_window_s"]
        print(
            f"  open ({label}) + 16 slices vs open + whole scan: {part * 1e3:.1f} / {whole * 1e3:.1f} ms = {part / whole:.3f}x"
        )
    default = codecs[fmt.DEFAULT_CODEC]
    print(f"\nslab codecs, slabs of 8 (CPU; ratios against the default, {fmt.DEFAULT_CODEC})")
    print(f"  {'codec':22s} size vs int16   compress MB/s   decompress MB/s   size    compress   decompress")
    for codec, r in codecs.items():
        print(
            f"  {codec:22s} {r['bytes'] / voxel_mb / 1e6:11.3f}x  {voxel_mb / r['encode_cpu']:14.0f}  "
            f"{voxel_mb / r['decode_cpu']:16.0f}  {r['bytes'] / default['bytes']:5.2f}x  "
            f"{default['encode_cpu'] / r['encode_cpu']:8.2f}x  {default['decode_cpu'] / r['decode_cpu']:9.2f}x"
        )
    ratio_storage = shard["bytes"] / base["pt_bytes"]
    ratio_wall = shard["scan_window_s"] / shard["scan_full_s"]
    ratio_cpu = shard["scan_window_cpu"] / shard["scan_full_cpu"]
    print(
        f"\ngoals: storage {ratio_storage:.3f}x .pt (<= 0.15: {'met' if ratio_storage <= 0.15 else 'NOT met'}); "
        f"16-slice read {ratio_wall:.3f}x wall, {ratio_cpu:.3f}x CPU of the whole scan "
        f"(<= 0.3: {'met' if max(ratio_wall, ratio_cpu) <= 0.3 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
