"""Streaming: every study exactly once per epoch across ranks x DataLoader workers."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from hlip.shards import format as fmt
from hlip.shards.format import ShardFormatError
from hlip.shards.stream import ShardPart, expand_urls, split_parts, stream_studies
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import DatasetWriter, encode_study, tar_sample_size, write_dataset

N_STUDIES = 13
RANKS, WORKERS = 2, 2


def small_study(i: int):
    return synthetic_study(f"s{i:02d}", n_scans=1, shape=(3, 6, 5), seed=i)


@pytest.fixture(scope="module", params=[1, 3, 7])
def dataset(request, tmp_path_factory) -> Path:
    """13 studies in 1, 3 (fewer than ranks x workers) or 7 (more) shards."""
    path = tmp_path_factory.mktemp(f"shards{request.param}")
    studies = [small_study(i) for i in range(N_STUDIES)]
    per_shard = -(-N_STUDIES // request.param)
    sample_bytes = max(tar_sample_size(s.key, encode_study(s)) for s in studies)
    write_dataset(path, studies, max_shard_bytes=per_shard * sample_bytes)
    assert len(expand_urls(path)) == request.param
    return path


def keys_of_epoch(path: Path, epoch: int, **kw) -> Counter:
    seen = Counter()
    for rank in range(RANKS):
        stream = stream_studies(path, rank=rank, world_size=RANKS, seed=3, epoch=epoch, **kw)
        for study in DataLoader(stream, batch_size=None, num_workers=WORKERS):
            seen[study.key] += 1
    return seen


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_each_study_exactly_once_per_epoch_over_ranks_and_workers(dataset, shuffle_buffer):
    expected = Counter(small_study(i).key for i in range(N_STUDIES))
    for epoch in (0, 1):
        assert keys_of_epoch(dataset, epoch, shuffle_buffer=shuffle_buffer) == expected


def test_streamed_studies_carry_lazy_arrays_through_worker_processes(dataset):
    stream = stream_studies(dataset, rank=1, world_size=RANKS)
    for study in DataLoader(stream, batch_size=None, num_workers=WORKERS):
        want = small_study(int(study.key[1:])).scans[0]
        assert np.array_equal(study.scans[0].array[1:3], want.array[1:3])


@settings(max_examples=200, deadline=None)
@given(
    shard_sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    world_size=st.integers(1, 5),
    workers=st.integers(1, 4),
)
def test_rank_then_worker_split_partitions_every_sample(shard_sizes, world_size, workers):
    parts = [ShardPart(str(i)) for i in range(len(shard_sizes))]
    taken = Counter()
    for rank in range(world_size):
        for worker in range(workers):
            for part in split_parts(split_parts(parts, rank, world_size), worker, workers):
                size = shard_sizes[int(part.url)]
                taken.update((part.url, i) for i in range(size) if i % part.stride == part.offset)
    assert taken == Counter((str(s), i) for s, size in enumerate(shard_sizes) for i in range(size))


def test_epochs_reshuffle_shards_reproducibly(tmp_path):
    write_dataset(tmp_path, [small_study(i) for i in range(12)], max_shard_bytes=1)
    order = [[s.key for s in stream_studies(tmp_path, seed=5, epoch=e)] for e in (0, 1, 0)]
    assert order[0] == order[2] and order[0] != order[1]
    assert sorted(order[0]) == sorted(order[1])


def test_sources_dir_glob_brace_and_list_expand_alike(dataset):
    shards = [str(p) for p in sorted(dataset.glob("*.tar"))]
    assert expand_urls(dataset) == shards
    assert expand_urls(str(dataset / "ds-*.tar")) == shards
    assert expand_urls(str(dataset / f"ds-{{000000..{len(shards) - 1:06d}}}.tar")) == shards
    assert expand_urls(shards) == shards
    pipe = [f"pipe:cat {shard}" for shard in shards]
    assert {s.key for s in stream_studies(pipe)} == {small_study(i).key for i in range(N_STUDIES)}


@pytest.fixture
def damaged(tmp_path) -> Path:
    """Five studies, one of which (s02) has a sample JSON of unknown major version 2."""
    writer = DatasetWriter(tmp_path)
    for i in range(5):
        members = encode_study(small_study(i))
        if i == 2:
            record = json.loads(members[fmt.JSON_MEMBER])
            members[fmt.JSON_MEMBER] = json.dumps(record | {"format_version": "2.0"}).encode()
        writer.add_encoded(f"s{i:02d}", members)
    writer.finalize()
    return tmp_path


def test_bad_sample_raises_an_error_naming_the_study(damaged):
    with pytest.raises(ShardFormatError, match=r"s02.*version 2\.0"):
        list(stream_studies(str(damaged / "*.tar")))


def test_skip_errors_skips_and_counts_bad_samples_across_workers(damaged):
    stream = stream_studies(str(damaged / "*.tar"), skip_errors=True)
    keys = [study.key for study in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(keys) == ["s00", "s01", "s03", "s04"]
    assert stream.errors.count == 1


def test_skip_errors_passes_each_skipped_key_to_the_callback(damaged):
    skipped = []
    stream = stream_studies(
        damaged / "ds-000000.tar", skip_errors=True, on_error=lambda k, e: skipped.append(k)
    )
    assert len(list(stream)) == 4 and skipped == ["s02"] and stream.errors.count == 1


@pytest.mark.parametrize(
    ("via_pipe", "cut_in_header"),
    [(False, True), (False, False), (True, False)],
    ids=["file-header", "file-data", "pipe-data"],
)
def test_a_truncated_shard_keeps_its_whole_samples_and_the_next_shard_is_read(
    tmp_path, via_pipe, cut_in_header
):
    write_dataset(tmp_path / "cut", [small_study(i) for i in range(6)])
    write_dataset(tmp_path / "whole", [small_study(i) for i in range(6, 9)])
    (cut,) = sorted((tmp_path / "cut").glob("*.tar"))
    with tarfile.open(cut) as tar:
        members = [(m.name.split(".")[0], m.offset, m.offset_data + m.size) for m in tar.getmembers()]
    _, header, end = members[len(members) // 2]
    size = header + 100 if cut_in_header else end - 10
    complete = {k for k, _, _ in members} - {k for k, _, end in members if end > size}
    with open(cut, "r+b") as file:
        file.truncate(size)
    urls = [str(cut), *map(str, sorted((tmp_path / "whole").glob("*.tar")))]
    if via_pipe:
        urls = [f"pipe:cat {url}" for url in urls]
    skipped = []
    stream = stream_studies(
        urls, shardshuffle=False, skip_errors=True, on_error=lambda k, e: skipped.append(k)
    )
    keys = {study.key for study in stream}
    assert keys == complete | {small_study(i).key for i in range(6, 9)}
    assert 0 < len(complete) < 6 and any(str(cut) in where for where in skipped)
    with pytest.raises(tarfile.ReadError):
        list(stream_studies(urls, shardshuffle=False))
