"""Exact resume: a run SIGKILLed between checkpoints and resumed ends with weights
bit-identical to an uninterrupted run, and both see every study exactly once per epoch."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter

import torch
from train_support import cli_command, read_jsonl, subprocess_env, tiny_overrides, write_fake_dataset

from hlip.shards.reader import ShardDataset
from hlip.train.checkpoint import read_checkpoint
from hlip.train.data import DataState

STEPS = 16  # 64 studies: three full epochs of 20 and the start of a fourth
KILL_AFTER_STEP = 5  # the first checkpoint is at step 4


def settings(dataset, out):
    # two DataLoader workers: the resumed loader must also continue their round-robin
    return tiny_overrides(
        dataset, out, f"steps={STEPS}", "checkpoint_every=4", "log_keys=true", "num_workers=2", "seed=5"
    )


def kill_after(command, metrics, step: int, timeout: float = 300.0) -> int:
    """Start ``command`` and SIGKILL it once ``metrics`` shows ``step``; its return code."""
    process = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and any(r["step"] >= step for r in read_jsonl(metrics) if r):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    return process.returncode


def run(command):
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_killed_run_resumes_bit_identically(tmp_path):
    dataset = write_fake_dataset(tmp_path / "ds", 20, max_shard_bytes=50_000)
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    run(cli_command(settings(dataset, whole)))
    returncode = kill_after(cli_command(settings(dataset, killed)), killed / "metrics.jsonl", KILL_AFTER_STEP)
    assert returncode == -signal.SIGKILL
    interrupted_at = read_checkpoint(killed / "checkpoints" / "last.pt")["step"]
    assert 4 <= interrupted_at < STEPS
    run(cli_command(settings(dataset, killed), "--resume", "auto"))

    reference = read_checkpoint(whole / "checkpoints" / "last.pt")
    resumed = read_checkpoint(killed / "checkpoints" / "last.pt")
    assert resumed["step"] == reference["step"] == STEPS
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["data"] == reference["data"]
    deterministic = ("step", "loss", "lr", "grad_norm", "logit_scale", "epoch")
    curves = [
        [{k: r[k] for k in deterministic} for r in read_jsonl(d / "metrics.jsonl")] for d in (whole, killed)
    ]
    assert curves[0] == curves[1]

    seen = read_jsonl(killed / "keys-rank0.jsonl")
    assert seen == read_jsonl(whole / "keys-rank0.jsonl")
    assert len(seen) == STEPS * 4
    all_keys = set(ShardDataset(dataset).keys())
    per_epoch = Counter((row["epoch"], row["key"]) for row in seen)
    assert max(per_epoch.values()) == 1
    # Each reader streams its own share epoch after epoch, so readers drift apart; the epochs
    # that every reader has finished hold every study, the later ones a part of them.
    finished = DataState.from_dict(resumed["data"][0]).epoch
    assert finished >= 2
    for epoch in range(finished + 2):
        keys = {key for (e, key) in per_epoch if e == epoch}
        assert keys == all_keys if epoch < finished else keys < all_keys
