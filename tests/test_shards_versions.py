"""The version log: atomic commits, one winner per version number, old datasets, unknown majors."""

from __future__ import annotations

import json
import shutil

import pytest

from hlip.shards import versions
from hlip.shards.format import ShardFormatError
from hlip.shards.reader import ShardDataset
from hlip.shards.storage import Location
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import DatasetWriter, write_dataset


def _studies(*keys: str, seed: int = 0):
    return [synthetic_study(key, n_scans=1, shape=(4, 8, 8), seed=seed + i) for i, key in enumerate(keys)]


def test_create_if_absent_lets_exactly_one_writer_win(tmp_path):
    location = Location(tmp_path)
    assert location.create("_versions/000001.json", b"first")
    assert not location.create("_versions/000001.json", b"second")
    assert (tmp_path / "_versions" / "000001.json").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "_versions").iterdir()] == ["000001.json"]  # no temporary left


def test_a_writer_that_loses_the_race_for_a_version_gets_a_conflict(tmp_path):
    write_dataset(tmp_path, _studies("a", "b"))
    loser, winner = DatasetWriter(tmp_path), DatasetWriter(tmp_path)
    for study in _studies("c", seed=5):
        loser.add(study)
    previous = versions.get_version(Location(tmp_path))
    winner.finalize()  # commits version 2 from the same staging
    with pytest.raises(versions.VersionConflict, match="version 2"):
        versions.commit(Location(tmp_path), previous, [], ["c"], {"a", "b"})
    assert [v.number for v in ShardDataset(tmp_path).history] == [1, 2]


def test_a_dataset_written_before_versions_reads_as_version_1_and_grows(tmp_path):
    write_dataset(tmp_path, _studies("a", "b"))
    shutil.rmtree(tmp_path / "_versions")  # the layout of format 1.0
    legacy = ShardDataset(tmp_path)
    assert legacy.version.number == 1 and legacy.version.created == "" and legacy.keys() == ["a", "b"]
    write_dataset(tmp_path, _studies("c", seed=7))
    assert sorted(p.name for p in (tmp_path / "_versions").glob("*.json")) == ["000001.json", "000002.json"]
    assert ShardDataset(tmp_path).keys() == ["a", "b", "c"] and ShardDataset(tmp_path, version=1).keys() == [
        "a",
        "b",
    ]


def test_a_version_file_of_an_unknown_major_is_refused_by_name(tmp_path):
    write_dataset(tmp_path, _studies("a"))
    path = tmp_path / "_versions" / "000001.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format_version": "2.0"}))
    with pytest.raises(
        ShardFormatError, match=r"unsupported hlip-study-shards version 2\.0 in .*000001\.json"
    ):
        ShardDataset(tmp_path)


def test_identical_restaged_samples_commit_no_version_and_new_shards_never_reuse_names(tmp_path):
    write_dataset(tmp_path, _studies("a", "b"), max_shard_bytes=1)
    assert write_dataset(tmp_path, _studies("a", "b"), max_shard_bytes=1).num_rows == 2
    assert len(ShardDataset(tmp_path).history) == 1  # same bytes: nothing to commit
    write_dataset(tmp_path, _studies("b", seed=3), max_shard_bytes=1)
    history = ShardDataset(tmp_path).history
    assert [v.shards for v in history] == [("ds-000000.tar", "ds-000001.tar"), ("ds-000002.tar",)]
    assert (history[1].added, history[1].superseded, history[1].studies) == (0, 1, 2)
