"""Shard format v1: what is written is what is read, byte-identical whatever the order."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hlip.shards import format as fmt
from hlip.shards.format import Scan, ShardFormatError, Study
from hlip.shards.reader import ShardDataset, open_arrays, read_slices
from hlip.shards.stream import stream_studies
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import DatasetWriter, encode_arrays, encode_study, plan_shards, write_dataset

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
label_values = (
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(-1e9, 1e9) | st.text(max_size=6)
)
finite = st.floats(-1e4, 1e4, allow_nan=False)


@st.composite
def scans(draw, name: str) -> Scan:
    shape = draw(st.tuples(st.integers(1, 12), st.integers(1, 9), st.integers(1, 9)))
    affine = np.eye(4)
    affine[:3, :] = draw(hnp.arrays(np.float64, (3, 4), elements=finite))
    return Scan(
        name=name,
        array=draw(hnp.arrays(np.int16, shape)),
        spacing=draw(st.tuples(*[st.floats(1e-3, 20.0)] * 3)),
        affine=affine,
        modality=draw(st.sampled_from(["CT", "MR", "PT"])),
        series_number=draw(st.none() | st.integers(0, 2**31)),
        series_description=draw(st.text(max_size=12)),
        intensity_unit=draw(st.sampled_from(["HU", "a.u.", "Bq/ml"])),
        intensity_slope=draw(st.floats(1e-3, 1e3)),
        intensity_intercept=draw(finite),
        source_file_count=draw(st.integers(0, 5000)),
        extra=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    )


@st.composite
def studies(draw, key: str) -> Study:
    names = draw(
        st.lists(st.from_regex(fmt.SCAN_NAME_PATTERN, fullmatch=True), min_size=1, max_size=3, unique=True)
    )
    return Study(
        key=key,
        modality=draw(st.sampled_from(["CT", "MR"])),
        scans=[draw(scans(name)) for name in names],
        report=draw(st.text(max_size=40)),
        labels=draw(st.dictionaries(st.text(min_size=1, max_size=6), label_values, max_size=4)),
        body_part=draw(st.text(max_size=8)),
        meta=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
        config_hash=draw(st.text("0123456789abcdef", max_size=16)),
    )


@st.composite
def datasets(draw) -> list[Study]:
    keys = draw(st.lists(st.from_regex(fmt.KEY_PATTERN, fullmatch=True), min_size=1, max_size=4, unique=True))
    return [draw(studies(key)) for key in keys]


def assert_same_study(read: Study, written: Study) -> None:
    for name in ("key", "modality", "report", "labels", "body_part", "meta", "config_hash"):
        assert getattr(read, name) == getattr(written, name), name
    assert [s.name for s in read.scans] == [s.name for s in written.scans]
    for got, want in zip(read.scans, written.scans, strict=True):
        voxels = np.asarray(got.array[...])
        assert voxels.dtype == np.int16 and np.array_equal(voxels, want.array)
        assert got.shape == want.shape
        assert got.spacing == tuple(want.spacing)
        assert np.array_equal(got.affine, want.affine)
        for name in (
            "modality",
            "series_number",
            "series_description",
            "intensity_unit",
            "intensity_slope",
            "intensity_intercept",
            "source_file_count",
            "extra",
        ):
            assert getattr(got, name) == getattr(want, name), name


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(written=datasets(), max_shard_kib=st.integers(1, 64))
def test_written_studies_read_back_identically_by_key_and_by_stream(written, max_shard_kib):
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_dataset(tmp, written, max_shard_bytes=max_shard_kib * 1024)
        by_key = {study.key: study for study in written}
        assert manifest.column("key").to_pylist() == sorted(by_key)
        dataset = ShardDataset(tmp)
        for key, study in by_key.items():
            assert_same_study(dataset.open(key), study)
        streamed = {study.key: study for study in stream_studies(tmp, shardshuffle=False)}
        assert sorted(streamed) == sorted(by_key)
        for key, study in streamed.items():
            assert_same_study(study, by_key[key])


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@settings(max_examples=8, deadline=None)
@given(order=st.permutations(range(5)))
def test_same_studies_in_any_order_give_byte_identical_shards_and_manifests(order):
    studies = [
        synthetic_study(f"study{i}", n_scans=1 + i % 2, shape=(5 + i, 12, 10), seed=i) for i in range(5)
    ]
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        write_dataset(first, studies, max_shard_bytes=8000)
        write_dataset(second, [studies[i] for i in order], max_shard_bytes=8000)
        written = _dir_bytes(Path(first))
        assert len([name for name in written if name.endswith(".tar")]) >= 2
        assert written == _dir_bytes(Path(second))


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 100), max_size=30), limit=st.integers(1, 250))
def test_shard_plan_is_greedy_contiguous_and_size_bounded(sizes, limit):
    shards = plan_shards(sizes, limit)
    assert [i for shard in shards for i in shard] == list(range(len(sizes)))
    for shard, following in zip(shards, [*shards[1:], None], strict=False):
        total = sum(sizes[i] for i in shard)
        assert total <= limit or len(shard) == 1
        if following is not None:
            assert total + sizes[following[0]] > limit


def test_samples_and_manifest_rows_follow_key_order(tmp_path):
    keys = ["a-b", "a", "A", "a_b", "a0"]
    write_dataset(tmp_path, [synthetic_study(key, n_scans=1, shape=(2, 4, 4)) for key in keys])
    assert ShardDataset(tmp_path).keys() == sorted(keys)
    assert [study.key for study in stream_studies(tmp_path, shardshuffle=False)] == sorted(keys)


def test_encode_study_is_a_pure_function_of_the_study():
    study = synthetic_study("k1", n_scans=2, shape=(9, 16, 16))
    assert encode_study(study) == encode_study(synthetic_study("k1", n_scans=2, shape=(9, 16, 16)))


def test_resumed_writer_skips_staged_studies_and_gives_the_same_dataset(tmp_path):
    studies = [synthetic_study(f"s{i}", n_scans=1, shape=(4, 8, 8), seed=i) for i in range(4)]
    write_dataset(tmp_path / "once", studies)
    interrupted = DatasetWriter(tmp_path / "resumed")
    for study in studies[:2]:
        interrupted.add(study)
    resumed = DatasetWriter(tmp_path / "resumed")
    assert [resumed.has(s.key) for s in studies] == [True, True, False, False]
    for study in studies:
        if not resumed.has(study.key):
            resumed.add(study)
    resumed.finalize()
    assert _dir_bytes(tmp_path / "once") == _dir_bytes(tmp_path / "resumed")
    assert DatasetWriter(tmp_path / "resumed").finalize() is None  # nothing staged: no new version


@pytest.fixture(scope="module")
def deep_study(tmp_path_factory) -> ShardDataset:
    path = tmp_path_factory.mktemp("deep")
    write_dataset(path, [synthetic_study("deep", n_scans=1, shape=(40, 24, 20))], slab_depth=8)
    return ShardDataset(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bounds=st.tuples(st.integers(0, 39), st.integers(1, 40)).filter(lambda b: b[0] < b[1]))
def test_slice_read_touches_only_overlapping_slabs(deep_study, bounds):
    start, stop = bounds
    scan = deep_study.open("deep").scans[0]
    store = scan.array.store_path.store
    store.key_reads.clear()
    voxels = scan.array[start:stop]
    assert np.array_equal(
        voxels, synthetic_study("deep", n_scans=1, shape=(40, 24, 20)).scans[0].array[start:stop]
    )
    chunk_reads = {key for key in store.key_reads if "/c/" in key}
    assert chunk_reads == {f"scan0/c/{slab}/0/0" for slab in range(start // 8, (stop - 1) // 8 + 1)}


@st.composite
def slab_volumes(draw) -> tuple[np.ndarray, int]:
    """A volume with some all-zero slabs (which the writer leaves out) and a slab depth."""
    depth = draw(st.integers(1, 6))
    volume = draw(hnp.arrays(np.int16, st.tuples(st.integers(1, 20), st.integers(1, 6), st.integers(1, 6))))
    for slab in draw(st.sets(st.integers(0, volume.shape[0] // depth))):
        volume[slab * depth : (slab + 1) * depth] = 0
    return volume, depth


def slab_array(volume: np.ndarray, depth: int):
    study = synthetic_study("slabs", n_scans=1, shape=volume.shape)
    study.scans[0].array = volume
    return open_arrays(encode_arrays(study, slab_depth=depth), "slabs", ["scan0"])["scan0"]


@settings(max_examples=60, deadline=None)
@given(written=slab_volumes(), data=st.data())
def test_read_slices_decodes_the_same_voxels_as_zarr(written, data):
    volume, depth = written
    array = slab_array(volume, depth)
    start = data.draw(st.integers(-2, volume.shape[0] + 2))
    stop = data.draw(st.integers(-2, volume.shape[0] + 2))
    read = read_slices(array, start, stop)
    assert read.dtype == np.int16
    assert np.array_equal(read, array[slice(start, stop)])
    assert np.array_equal(read, volume[slice(start, stop)])
    assert np.array_equal(read_slices(volume, start, stop), volume[slice(start, stop)])


def test_read_slices_names_a_damaged_chunk():
    volume = np.arange(16 * 4 * 4, dtype=np.int16).reshape(16, 4, 4)
    array = slab_array(volume, 8)
    store = array.store_path.store
    frame = store._zip.read("scan0/c/1/0/0")
    for damaged in (frame[:10], frame[:16] + bytes(len(frame) - 16)):
        store._read = lambda key, byte_range, bad=damaged: bad if key.endswith("/c/1/0/0") else frame
        with pytest.raises(ShardFormatError, match="chunk scan0/c/1/0/0"):
            read_slices(array, 0, 16)


def test_manifest_lists_members_and_filters(tmp_path):
    studies = [synthetic_study(f"s{i}", n_scans=1 + i, shape=(3, 8, 8), seed=i) for i in range(3)]
    studies[0].labels = {"normal": True, "grade": 2}
    write_dataset(tmp_path, studies)
    dataset = ShardDataset(tmp_path)
    assert len(dataset) == 3 and list(dataset) == ["s0", "s1", "s2"]
    row = dataset.row("s0")
    assert row["n_scans"] == 1 and row["label_grade"] == 2 and row["report_length"] == len(studies[0].report)
    assert dataset.scans.num_rows == 6
    wide = dataset.filter(pc.field("n_scans") >= 2)
    assert wide.keys() == ["s1", "s2"] and wide.scans.num_rows == 5
    assert {s.key for s in stream_studies(wide)} == {"s1", "s2"}
