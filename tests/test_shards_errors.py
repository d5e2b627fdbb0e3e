"""Clear errors: bad writer input, unknown format versions, missing members, bad checksums."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlip.shards import format as fmt
from hlip.shards.format import ShardFormatError
from hlip.shards.reader import ShardDataset, decode_study
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import AtomicFile, encode_study, write_dataset


def study(key: str = "k1"):
    return synthetic_study(key, n_scans=2, shape=(4, 6, 6))


def with_scan(**changes):
    bad = study()
    for name, value in changes.items():
        setattr(bad.scans[1], name, value)
    return bad


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (with_scan(array=np.zeros((4, 6, 6), np.float32)), r"'k1' scan 'scan1'.*int16.*float32"),
        (with_scan(array=np.zeros((4, 6, 6), np.int32)), r"int16.*int32"),
        (with_scan(array=np.zeros((6, 6), np.int16)), r"3-D"),
        (with_scan(spacing=None), r"scan 'scan1': spacing must be three positive"),
        (with_scan(spacing=(1.0, 1.0)), r"spacing must be three"),
        (with_scan(spacing=(1.0, 0.0, 1.0)), r"spacing must be three positive"),
        (with_scan(spacing=(1.0, float("nan"), 1.0)), r"spacing must be three positive finite"),
        (with_scan(affine=np.eye(3)), r"affine must be a finite 4x4"),
        (with_scan(affine=None), r"affine must be a finite 4x4"),
        (with_scan(name="scan0"), r"duplicate scan names \['scan0'\]"),
        (with_scan(name="../x"), r"unsafe scan name"),
        (study("a.b"), r"unsafe study key 'a.b'.*no dots"),
        (study("../etc"), r"unsafe study key"),
        (study(""), r"unsafe study key"),
        (study("x" * 65), r"unsafe study key"),
    ],
)
def test_writer_rejects_bad_input_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        encode_study(bad)


def test_writer_rejects_unserialisable_labels_and_duplicate_keys(tmp_path):
    bad = study()
    bad.labels = {"score": float("nan")}
    with pytest.raises(ValueError, match="'k1'.*JSON"):
        encode_study(bad)
    with pytest.raises(ValueError, match="duplicate study key 'k1'"):
        write_dataset(tmp_path, [study(), study()])


def test_atomic_file_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "ds-000000.tar"
    with pytest.raises(RuntimeError), AtomicFile(target) as file:
        file.write(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def members_with_version(version: str) -> dict[str, bytes]:
    members = encode_study(study())
    record = json.loads(members[fmt.JSON_MEMBER]) | {"format_version": version}
    return members | {fmt.JSON_MEMBER: json.dumps(record).encode()}


def test_unknown_major_version_is_rejected_naming_found_and_supported():
    with pytest.raises(
        ShardFormatError, match=r"version 2\.0 in study 'k1'.*supports major version 1.*found major version 2"
    ):
        decode_study("k1", members_with_version("2.0"))
    with pytest.raises(ShardFormatError, match="malformed format version"):
        decode_study("k1", members_with_version("one"))


def test_newer_minor_version_of_a_known_major_is_read():
    assert decode_study("k1", members_with_version("1.7")).key == "k1"


def test_dataset_with_unknown_major_version_is_rejected_at_open(tmp_path):
    write_dataset(tmp_path, [study()])
    manifest = pq.read_table(tmp_path / fmt.MANIFEST_FILE)
    index = manifest.schema.get_field_index("format_version")
    manifest = manifest.set_column(index, "format_version", pa.array(["3.1"]))
    pq.write_table(manifest, tmp_path / fmt.MANIFEST_FILE)
    with pytest.raises(ShardFormatError, match=r"version 3\.1.*manifest\.parquet"):
        ShardDataset(tmp_path)


@pytest.mark.parametrize("member", fmt.MEMBERS)
def test_missing_member_is_named(member):
    members = encode_study(study())
    del members[member]
    with pytest.raises(ShardFormatError, match=f"study 'k1': missing member.*{member}"):
        decode_study("k1", members)


def rezipped(data: bytes, changes: dict[str, bytes | None]) -> bytes:
    """A copy of the zip ``data`` with entries replaced, or removed where the value is None."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    entries.update(changes)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name, value in entries.items():
            if value is not None:
                target.writestr(name, value)
    return out.getvalue()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (None, r"member zarr.zip does not open"),
        ({"zarr.json": None}, r"zarr.zip is not a zarr v3 group"),
        ({"zarr.json": b'{"zarr_format": 2, "node_type": "group"}'}, r"zarr.zip is not a zarr v3 group"),
        ({"scan1/zarr.json": None}, r"zarr.zip has no array for scan 'scan1'"),
        ({"scan1/zarr.json": b"{not json"}, r"zarr.zip's scan1/zarr.json does not parse"),
        ({"scan1/zarr.json": b"[]"}, r"zarr.zip's scan1/zarr.json is not an object"),
        (
            {"scan1/zarr.json": b'{"zarr_format": 3, "node_type": "array"}'},
            r"scan1/zarr.json is not a zarr v3 array",
        ),
    ],
)
def test_a_damaged_zarr_zip_is_a_format_error_naming_what_is_wrong(changes, message):
    members = encode_study(study())
    data = members[fmt.ARRAYS_MEMBER]
    members[fmt.ARRAYS_MEMBER] = b"not a zip" if changes is None else rezipped(data, changes)
    with pytest.raises(ShardFormatError, match=f"study 'k1'.*{message}"):
        decode_study("k1", members)


def test_checksum_mismatch_names_the_study_and_member(tmp_path):
    write_dataset(tmp_path, [study("k0"), study("k1")])
    dataset = ShardDataset(tmp_path)
    row = dataset.row("k1")
    shard = tmp_path / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["zarr_zip_offset"] + row["zarr_zip_size"] // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=r"study 'k1': checksum mismatch in member k1\.zarr\.zip"):
        dataset.open("k1")
    assert dataset.open("k0").key == "k0"
    with pytest.raises(ShardFormatError, match=r"study 'k1' zarr.zip: entry .* is damaged"):
        for scan in dataset.open("k1", verify=False).scans:
            scan.array[...]


def test_missing_or_damaged_manifest_is_a_format_error(tmp_path):
    with pytest.raises(ShardFormatError, match="manifest.parquet is missing"):
        ShardDataset(tmp_path)
    (tmp_path / fmt.MANIFEST_FILE).write_bytes(b"not parquet")
    with pytest.raises(ShardFormatError, match="manifest.parquet does not read as Parquet"):
        ShardDataset(tmp_path)
