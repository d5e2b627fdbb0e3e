"""Shared helpers of the training tests: small synthetic shard datasets and a tiny run config.

The studies are CT-like volumes (HU) with one planted bright cube whose presence the report
states, written with the real shard writer, so the training tests read real shards.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from hlip.shards.format import Scan, Study
from hlip.shards.writer import write_dataset
from hlip.train.config import TrainConfig, load_config

NANO_OVERRIDES = [
    'model_overrides.vision={name = "vit_nano_multiscan_h3"}',
    "model_overrides.text={context_length = 16}",
]
"""The demo model shrunk to test size: 48-wide 3-block trunk on 8x16x16 crops, 16 text tokens."""


def fake_study(index: int, seed: int = 0, shape=(12, 20, 20), max_scans: int = 3) -> Study:
    """A study of 1..max_scans int16 HU scans; ``labels["cube"]`` says if a bright cube is planted."""
    rng = np.random.default_rng([seed, index])
    positive = bool(rng.random() < 0.5)
    scans = []
    for s in range(int(rng.integers(1, max_scans + 1))):
        size = [int(n + rng.integers(-2, 3)) for n in shape]
        volume = rng.normal(-700, 60, size=size).astype(np.int16)
        if positive:
            d, h, w = (n // 2 for n in size)
            volume[d - 3 : d + 3, h - 5 : h + 5, w - 5 : w + 5] = 300
        scans.append(
            Scan(
                name=f"scan{s}",
                array=volume,
                spacing=(2.0, 1.0, 1.0),
                affine=np.diag([2.0, 1.0, 1.0, 1.0]),
                modality="CT",
                series_number=s + 1,
            )
        )
    report = "A bright cube is present. " if positive else "No cube is seen. "
    report += f"Study number {index}."
    return Study(
        key=f"s{seed:02d}-{index:04d}",
        modality="CT",
        scans=scans,
        report=report,
        labels={"cube": int(positive)},
        body_part="CHEST",
    )


def write_fake_dataset(out_dir: Path, n: int, seed: int = 0, max_shard_bytes: int = 1 << 30, **kw) -> Path:
    write_dataset(out_dir, [fake_study(i, seed, **kw) for i in range(n)], max_shard_bytes=max_shard_bytes)
    return out_dir


def tiny_overrides(data: Path | list, out: Path, *overrides: str) -> list[str]:
    """``key=value`` settings turning demo-cpu into a fast test run of the nano model."""
    sources = [str(d) for d in data] if isinstance(data, list) else [str(data)]
    return [
        *NANO_OVERRIDES,
        f"data={sources!r}".replace("'", '"'),
        f'out="{out}"',
        "num_workers=0",
        "batch_size=4",
        "shuffle_buffer=8",
        "precision=fp32",  # the same arithmetic on every CPU, with or without bf16 instructions
        "batch_grouping=none",  # the stream's own order (tests/test_train_grouping.py groups)
        "warmup_steps=2",
        "progress=false",
        "tensorboard=false",
        "lr=1e-3",
        "lock_text=true",  # the 22M-parameter MiniLM stays frozen: small optimizer state, fast steps
        "lock_text_unlocked_layers=0",
        *overrides,
    ]


def tiny_config(data: Path | list, out: Path, *overrides: str) -> TrainConfig:
    """demo-cpu with the nano model, fp32, no progress bar; ``overrides`` as ``key=value``."""
    return load_config("demo-cpu", tiny_overrides(data, out, *overrides))


def cli_command(overrides: list[str], *args: str) -> list[str]:
    """``python -m hlip.train.cli run --config demo-cpu --set ...`` for a subprocess run."""
    sets = [item for override in overrides for item in ("--set", override)]
    return [sys.executable, "-m", "hlip.train.cli", "run", "--config", "demo-cpu", *sets, *args]


def subprocess_env() -> dict[str, str]:
    """One compute thread per process: identical arithmetic in every run, no oversubscription."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- damaged shards ---------------------------------------------------------------------


def locate(dataset, key: str, member: str) -> tuple[str, int, int]:
    row = next(r for r in pq.read_table(dataset / "manifest.parquet").to_pylist() if r["key"] == key)
    return row["shard"], row[f"{member}_offset"], row[f"{member}_size"]


def corrupt_json(dataset, key: str) -> None:
    """Zero the first bytes of a study's JSON member inside its tar shard."""
    shard, offset, _ = locate(dataset, key, "json")
    with open(dataset / shard, "r+b") as f:
        f.seek(offset)
        f.write(bytes(16))


def corrupt_chunks(dataset, key: str) -> None:
    """Zero the compressed voxel chunks of a study's zarr.zip, leaving its metadata intact:
    the study decodes, and fails only when a crop reads voxels."""
    shard, offset, size = locate(dataset, key, "zarr_zip")
    with open(dataset / shard, "r+b") as f:
        f.seek(offset)
        member = bytearray(f.read(size))
        for info in zipfile.ZipFile(io.BytesIO(bytes(member))).infolist():
            if "/c/" in info.filename:
                name_len, extra_len = struct.unpack(
                    "<HH", member[info.header_offset + 26 : info.header_offset + 30]
                )
                start = info.header_offset + 30 + name_len + extra_len
                member[start : start + info.compress_size] = bytes(info.compress_size)
        f.seek(offset)
        f.write(member)
