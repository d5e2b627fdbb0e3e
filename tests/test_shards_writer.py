"""Shard writing in parallel: the bytes do not depend on how the shards are written."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import DatasetWriter

STUDIES = [synthetic_study(f"study{i}", n_scans=1 + i % 2, shape=(5 + i, 12, 10), seed=i) for i in range(6)]


def _dataset_bytes(out: Path, map_shards) -> dict[str, bytes]:
    writer = DatasetWriter(out, max_shard_bytes=9000)
    for study in STUDIES:
        writer.add(study)
    writer.finalize(map_shards)
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def _in_order(order: list[int]):
    """A ``map`` that runs the calls in ``order`` (cycled) but returns results in input order."""

    def run(function, *iterables):
        calls = list(zip(*iterables, strict=True))
        results = {}
        for position in sorted(range(len(calls)), key=lambda i: order[i % len(order)]):
            results[position] = function(*calls[position])
        return [results[i] for i in range(len(calls))]

    return run


@settings(max_examples=6, deadline=None)
@given(order=st.permutations(range(6)))
def test_shards_written_in_any_order_give_the_same_bytes(tmp_path_factory, order):
    expected = _dataset_bytes(tmp_path_factory.mktemp("serial"), map)
    assert len([name for name in expected if name.endswith(".tar")]) >= 3
    assert _dataset_bytes(tmp_path_factory.mktemp("reordered"), _in_order(order)) == expected


def test_shards_written_by_other_processes_give_the_same_bytes(tmp_path):
    expected = _dataset_bytes(tmp_path / "serial", map)
    with ProcessPoolExecutor(2) as pool:
        assert _dataset_bytes(tmp_path / "processes", pool.map) == expected
