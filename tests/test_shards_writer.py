"""Shard bytes do not depend on how shards are written or how slabs are encoded."""

from __future__ import annotations

import io
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numcodecs import blosc
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from hlip.shards import format as fmt
from hlip.shards import writer
from hlip.shards.inspect import storage_text
from hlip.shards.reader import ZipBytesStore, decode_study
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import DatasetWriter, encode_slabs, encode_study, shard_name, write_dataset

STUDIES = [synthetic_study(f"study{i}", n_scans=1 + i % 2, shape=(5 + i, 12, 10), seed=i) for i in range(6)]


def _dataset_bytes(out: Path, map_shards) -> dict[str, bytes]:
    writer = DatasetWriter(out, max_shard_bytes=9000)
    for study in STUDIES:
        writer.add(study)
    writer.finalize(map_shards)
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


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


def _zarr_chunks(voxels: np.ndarray, depth: int, codec: str) -> dict[str, bytes]:
    """The chunk entries zarr itself writes for ``voxels`` with the named slab codec."""
    entries: dict = {}
    settings = fmt.SLAB_CODECS[codec]
    compressor = BloscCodec(cname=settings.cname, clevel=settings.clevel, shuffle=settings.shuffle)
    array = zarr.create_array(
        MemoryStore(entries),
        shape=voxels.shape,
        chunks=(depth, *voxels.shape[1:]),
        dtype=fmt.ARRAY_DTYPE,
        compressors=compressor,
        fill_value=0,
        zarr_format=3,
    )
    array[...] = voxels
    return {f"x/{key}": buffer.to_bytes() for key, buffer in entries.items() if key != "zarr.json"}


@settings(max_examples=40, deadline=None)
@given(
    voxels=hnp.arrays(
        np.int16,
        st.tuples(st.integers(1, 20), st.integers(1, 9), st.integers(1, 9)),
        elements=st.sampled_from([0, 0, 0, 1, -1000, 32767, -32768, 40]),
    ),
    depth=st.integers(1, 9),
    codec=st.sampled_from(sorted(fmt.SLAB_CODECS)),
)
def test_slabs_are_the_bytes_zarr_writes(voxels, depth, codec):
    assert encode_slabs("x", voxels, depth, codec) == _zarr_chunks(voxels, depth, codec)


@pytest.mark.parametrize(("codec", "complib"), [("zstd", "Zstd"), ("lz4hc", "LZ4")])
def test_a_study_written_with_a_codec_declares_it_and_reads_back(codec, complib):
    """zarr.json names the codec its chunks use, and readers need no setting to read them."""
    study = STUDIES[0]
    members = encode_study(study, codec=codec)
    store = ZipBytesStore(members[fmt.ARRAYS_MEMBER])
    scan = study.scans[0]
    metadata = json.loads(store._read(f"{scan.name}/zarr.json", None))
    blosc_config = metadata["codecs"][-1]["configuration"]
    assert (blosc_config["cname"], blosc_config["clevel"]) == (codec, fmt.SLAB_CODECS[codec].clevel)
    chunks = [store._read(key, None) for key in sorted(store._names) if key.startswith(f"{scan.name}/c/")]
    assert chunks and {blosc.cbuffer_complib(chunk) for chunk in chunks} == {complib}
    decoded = decode_study(study.key, members).scans[0]
    np.testing.assert_array_equal(decoded.array[...], scan.array)
    depth = min(fmt.DEFAULT_SLAB_DEPTH, scan.shape[0])
    assert storage_text(decoded.array) == f"slabs of {depth}, {codec} {fmt.SLAB_CODECS[codec].clevel}"


def test_an_unknown_codec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown slab codec 'brotli'; known: zstd, lz4hc"):
        DatasetWriter(tmp_path / "ds", codec="brotli")


@pytest.mark.parametrize("n_studies", [1, 4])
def test_shard_is_the_tar_that_tarfile_writes_for_the_members(tmp_path, n_studies):
    """Shards are assembled from staged bytes; they must stay the tar ``tarfile`` writes."""
    studies = sorted(STUDIES[:n_studies], key=lambda study: study.key)
    write_dataset(tmp_path / "ds", studies)
    reference = io.BytesIO()
    with writer._open_tar(reference) as tar:
        for study in studies:
            writer._add_sample(tar, study.key, encode_study(study))
    assert (tmp_path / "ds" / shard_name(fmt.SHARD_PREFIX, 0)).read_bytes() == reference.getvalue()
