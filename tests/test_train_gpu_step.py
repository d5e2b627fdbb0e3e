"""The loop's GPU-step machinery, run on CPU: compiled blocks, the attention knob, the device feed."""

from __future__ import annotations

import pytest
import torch
from train_support import read_jsonl, tiny_config, write_fake_dataset

from hlip.train.config import load_config
from hlip.train.distributed import DistInfo
from hlip.train.loop import DeviceFeed, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_fake_dataset(tmp_path_factory.mktemp("gpu_step") / "ds", 8)


def test_compiled_run_equals_eager_run_and_counts_its_graphs(dataset, tmp_path):
    """Same seed, same data: compiled blocks (aot_eager here, inductor on GPU) give the eager
    run's losses; the graph count is logged every step and stops growing after the first."""
    settings = ["steps=2", "patch_drop_rate=0.25", "attention='sdpa'"]
    eager = train(tiny_config(dataset, tmp_path / "eager", *settings))
    compiled = train(
        tiny_config(dataset, tmp_path / "compiled", *settings, "compile=true", "compile_backend='aot_eager'")
    )
    eager_log, compiled_log = (read_jsonl(r.run_dir / "metrics.jsonl") for r in (eager, compiled))
    for a, b in zip(eager_log, compiled_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    graphs = [r["compiled_graphs"] for r in compiled_log]
    assert 0 < graphs[0] == graphs[-1] and "compiled_graphs" not in eager_log[0]


def test_attention_knob_is_checked_and_reaches_the_trunk(dataset, tmp_path):
    with pytest.raises(ValueError, match="attention='flash'"):
        load_config("demo-cpu", ["attention=flash"])
    with pytest.raises(ValueError, match="varlen backend needs CUDA"):
        train(tiny_config(dataset, tmp_path / "varlen", "steps=1", "attention='varlen'"))


class Batches:
    """An iterator of numbered fake batches that records how many were taken from it."""

    def __init__(self) -> None:
        self.taken = 0

    def __next__(self):
        self.taken += 1
        return FakeBatch(self.taken)


class FakeBatch:
    def __init__(self, number: int) -> None:
        self.number, self.moved_to = number, None

    def to(self, device):
        self.moved_to = device
        return self


def test_device_feed_hands_over_batches_in_order_one_ahead():
    batches = Batches()
    feed = DeviceFeed(batches, DistInfo())
    first, waited = feed.take()  # nothing prefetched yet: fetched now
    assert (first.number, batches.taken, first.moved_to) == (1, 1, torch.device("cpu")) and waited >= 0
    assert feed.prefetch() >= 0 and batches.taken == 2  # taken from the loader, not handed over yet
    second, waited = feed.take()
    assert (second.number, waited, batches.taken) == (2, 0.0, 2)
