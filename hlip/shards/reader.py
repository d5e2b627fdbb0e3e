"""Read format-v1 datasets: random access by key and members-to-Study decoding.

:class:`ShardDataset` opens any study with three byte-range reads located by the
manifest (no shard scan). :func:`decode_study` turns a sample's members into a
:class:`~hlip.shards.format.Study` whose scan arrays are lazy zarr arrays over the
in-memory ``zarr.zip``: slicing ``array[a:b]`` decompresses only the slabs it overlaps.
The streaming reader (:mod:`hlip.shards.stream`) uses the same decoding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from numcodecs import Blosc
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import StorePath

from hlip.shards import format as fmt
from hlip.shards import versions
from hlip.shards.format import Scan, ShardFormatError, Study
from hlip.shards.storage import Location
from hlip.shards.writer import MEMBER_COLUMNS


class ZipBytesStore(Store):
    """A read-only zarr store over a zip archive held in memory.

    zarr's ZipStore wants a file path; samples arrive as bytes from a tar stream or a
    byte-range read. ``key_reads`` counts the keys fetched, which shows (and lets tests
    assert) that a slice selection reads only the chunks it overlaps.
    """

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(self, data: bytes, name: str = "zarr.zip") -> None:
        super().__init__(read_only=True)
        self.data = bytes(data)
        self.name = name
        self.key_reads: Counter[str] = Counter()
        self._open_zip()

    def _open_zip(self) -> None:
        self._zip = zipfile.ZipFile(io.BytesIO(self.data))
        self._names = set(self._zip.namelist())
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "name": self.name,
            "_read_only": True,
            "_is_open": False,
            "key_reads": Counter(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_zip()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZipBytesStore) and other.data == self.data

    def __hash__(self) -> int:
        return id(self)

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        if key not in self._names:
            return None
        with self._lock:
            self.key_reads[key] += 1
            try:
                value = self._zip.read(key)
            except (zipfile.BadZipFile, zlib.error) as error:
                raise ShardFormatError(f"{self.name}: entry {key} is damaged: {error}") from None
        if byte_range is None:
            return value
        if isinstance(byte_range, RangeByteRequest):
            return value[byte_range.start : byte_range.end]
        if isinstance(byte_range, OffsetByteRequest):
            return value[byte_range.offset :]
        if isinstance(byte_range, SuffixByteRequest):
            return value[-byte_range.suffix :] if byte_range.suffix else b""
        raise TypeError(f"unexpected byte range {byte_range!r}")

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value = self._read(key, byte_range)
        return None if value is None else prototype.buffer.from_bytes(value)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return key in self._names

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:
        for key in sorted(self._names):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in sorted(self._names):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        start = f"{prefix}/" if prefix else ""
        children = {key[len(start) :].split("/")[0] for key in self._names if key.startswith(start)}
        for child in sorted(children - {""}):
            yield child


# --- slab reads -------------------------------------------------------------------------

_BLOSC = Blosc()
"""Decodes any Blosc frame: the frame header names its codec, level and shuffle."""


def _is_slab_array(array: Any) -> bool:
    """Whether ``array`` is a zarr array laid out as the format writes it: chunks of whole
    slices, stored as bytes + Blosc in an in-memory zip (what :func:`read_slices` decodes
    without zarr)."""
    if not isinstance(array, zarr.Array):
        return False
    metadata = array.metadata
    codecs = getattr(metadata, "codecs", ())
    grid = getattr(metadata, "chunk_grid", None)
    return (
        isinstance(array.store_path.store, ZipBytesStore)
        and array.dtype == fmt.ARRAY_DTYPE
        and len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and codecs[0].endian is not None
        and codecs[0].endian.value == "little"
        and isinstance(codecs[1], BloscCodec)
        and isinstance(grid, RegularChunkGrid)
        and tuple(grid.chunk_shape[1:]) == tuple(array.shape[1:])
    )


def read_slices(array: Any, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` of a scan's array as a numpy array: for the format's zarr arrays,
    the slabs the range overlaps, each Blosc-decoded straight into place.

    The same values as ``array[start:stop]``; zarr's own read of the same slabs costs about
    twice the CPU (a copy of every chunk, a hop through its event loop and thread pool, a
    second copy into the selection), which is most of a training crop's decoding time.
    Arrays in any other layout (or in memory) are sliced as they are.
    """
    start, stop, _ = slice(start, stop).indices(array.shape[0])
    stop = max(start, stop)
    if not _is_slab_array(array):
        return np.asarray(array[start:stop])
    depth = array.metadata.chunk_grid.chunk_shape[0]
    first, end = start // depth, -(-stop // depth)
    slabs = np.empty(((end - first) * depth, *array.shape[1:]), dtype=fmt.ARRAY_DTYPE)
    store, path = array.store_path.store, array.store_path.path
    for i, index in enumerate(range(first, end)):
        slab = slabs[i * depth : (i + 1) * depth]
        key = f"{path}/{array.metadata.encode_chunk_key((index, 0, 0))}"
        frame = store._read(key, None)
        if frame is None:  # chunks of only the fill value are not stored
            slab.fill(array.metadata.fill_value)
            continue
        if len(frame) < 16 or int.from_bytes(frame[4:8], "little") != slab.nbytes:
            raise ShardFormatError(f"{store.name}: chunk {key} does not hold {slab.nbytes} bytes")
        try:
            _BLOSC.decode(frame, out=slab)
        except (RuntimeError, ValueError) as error:
            raise ShardFormatError(f"{store.name}: chunk {key} does not decode: {error}") from None
    return slabs[start - first * depth : stop - first * depth]


# --- decoding ---------------------------------------------------------------------------


def _require(record: Mapping[str, Any], field: str, key: str) -> Any:
    if field not in record:
        raise ShardFormatError(f"study {key!r}: sample JSON lacks field {field!r}")
    return record[field]


def parse_record(data: bytes, key: str) -> dict[str, Any]:
    """The sample JSON, after checking the format name and major version."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"study {key!r}: sample JSON does not parse: {error}") from None
    if not isinstance(record, dict):
        raise ShardFormatError(f"study {key!r}: sample JSON is not an object")
    name = _require(record, "format", key)
    if name != fmt.FORMAT_NAME:
        raise ShardFormatError(f"study {key!r}: format {name!r} is not {fmt.FORMAT_NAME!r}")
    fmt.check_version(_require(record, "format_version", key), where=f"study {key!r}")
    for field in ("key", "modality", "scans"):
        _require(record, field, key)
    if record["key"] != key:
        raise ShardFormatError(f"study {key!r}: sample JSON names key {record['key']!r}")
    if not isinstance(record["scans"], list) or not all(isinstance(scan, dict) for scan in record["scans"]):
        raise ShardFormatError(f"study {key!r}: sample JSON's scans is not a list of objects")
    for scan in record["scans"]:
        try:
            fmt.check_name(scan.get("name"), fmt.SCAN_NAME_PATTERN, "scan name")
        except ShardFormatError as error:
            raise ShardFormatError(f"study {key!r}: {error}") from None
    return record


def _scan_from_record(scan: Mapping[str, Any], array: Any) -> Scan:
    return Scan(
        name=scan["name"],
        array=array,
        spacing=tuple(float(s) for s in scan["spacing"]),
        affine=np.asarray(scan["affine"], dtype=np.float64),
        modality=scan["modality"],
        series_number=scan["series_number"],
        series_description=scan["series_description"],
        intensity_unit=scan["intensity_unit"],
        intensity_slope=float(scan["intensity_slope"]),
        intensity_intercept=float(scan["intensity_intercept"]),
        source_file_count=int(scan["source_file_count"]),
        extra=scan["extra"],
    )


def _zarr_json(store: ZipBytesStore, path: str, key: str) -> dict[str, Any] | None:
    """The parsed ``zarr.json`` at ``path`` in a sample's zip, None if there is none."""
    data = store._read(path, None)
    if data is None:
        return None
    try:
        metadata = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"study {key!r}: zarr.zip's {path} does not parse: {error}") from None
    if not isinstance(metadata, dict):
        raise ShardFormatError(f"study {key!r}: zarr.zip's {path} is not an object")
    return metadata


def open_arrays(data: bytes, key: str, names: Iterable[str]) -> dict[str, zarr.Array]:
    """The named arrays of a sample's ``zarr.zip`` bytes, opened lazily (no chunk is read).

    Each is built from its own ``zarr.json``, read straight from the zip: zarr's
    ``open_group`` and ``group[name]`` make a round trip through zarr's event-loop thread
    per call, about 1 ms of CPU per 4-scan study in a training worker. The root must be
    the zarr v3 group the format writes.
    """
    try:
        store = ZipBytesStore(data, f"study {key!r} zarr.zip")
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ShardFormatError(f"study {key!r}: member zarr.zip does not open: {error}") from None
    root = _zarr_json(store, "zarr.json", key)
    if root is None or root.get("zarr_format") != 3 or root.get("node_type") != "group":
        raise ShardFormatError(f"study {key!r}: member zarr.zip is not a zarr v3 group")
    arrays = {}
    for name in names:
        metadata = _zarr_json(store, f"{name}/zarr.json", key)
        if metadata is None:
            raise ShardFormatError(f"study {key!r}: zarr.zip has no array for scan {name!r}")
        try:
            arrays[name] = zarr.Array(
                zarr.AsyncArray(ArrayV3Metadata.from_dict(metadata), StorePath(store, name))
            )
        except Exception as error:
            raise ShardFormatError(
                f"study {key!r}: zarr.zip's {name}/zarr.json is not a zarr v3 array: {error}"
            ) from None
    return arrays


def decode_report(key: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ShardFormatError(f"study {key!r}: report txt is not UTF-8") from None


def decode_study(key: str, members: Mapping[str, bytes]) -> Study:
    """Build a Study from a sample's members; ShardFormatError names what is wrong."""
    missing = [ext for ext in fmt.MEMBERS if ext not in members]
    if missing:
        raise ShardFormatError(f"study {key!r}: missing member(s) {', '.join(missing)}")
    record = parse_record(members[fmt.JSON_MEMBER], key)
    arrays = open_arrays(members[fmt.ARRAYS_MEMBER], key, [scan["name"] for scan in record["scans"]])
    scans = []
    for scan in record["scans"]:
        array = arrays[scan["name"]]
        if list(array.shape) != list(scan["shape"]) or array.dtype != fmt.ARRAY_DTYPE:
            raise ShardFormatError(
                f"study {key!r} scan {scan['name']!r}: array is {array.dtype}{list(array.shape)}, "
                f"JSON says int16{scan['shape']}"
            )
        scans.append(_scan_from_record(scan, array))
    return Study(
        key=key,
        modality=record["modality"],
        scans=scans,
        report=decode_report(key, members[fmt.TEXT_MEMBER]),
        labels=record.get("labels", {}),
        body_part=record.get("body_part", ""),
        meta=record.get("meta", {}),
        config_hash=record.get("config_hash", ""),
    )


# --- random access ----------------------------------------------------------------------


class ShardDataset:
    """A dataset opened through its manifests; a mapping of key -> Study.

    ``path`` is a directory or an object-store URL (``s3://bucket/prefix``, through
    fsspec). ``version`` pins a committed version (:mod:`hlip.shards.versions`; default:
    the latest). ``manifest`` (one row per study) and ``scans`` (one row per scan) are
    pyarrow tables; :meth:`filter` narrows the study set with a pyarrow expression;
    :meth:`open` reads one study with byte-range reads and, by default, checks each
    member's sha256.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: pa.Table | None = None,
        *,
        version: int | None = None,
        _scans: pa.Table | None = None,
    ) -> None:
        self.location = Location(path)
        self.path = Path(self.location.url) if self.location.local else self.location.url
        self.version = versions.get_version(self.location, version)
        if manifest is None:
            manifest, _scans = versions.read_tables(self.location, self.version)
        self.manifest = manifest
        self._all_scans = _scans
        self._rows = {key: i for i, key in enumerate(manifest.column("key").to_pylist())}

    @functools.cached_property
    def history(self) -> list[versions.DatasetVersion]:
        """Every committed version of the dataset, oldest first."""
        return versions.list_versions(self.location)

    @functools.cached_property
    def scans(self) -> pa.Table:
        """Per-scan rows of the studies in this (possibly filtered) view."""
        table = self._all_scans
        if table is None:
            table = versions.read_tables(self.location, self.version)[1]
        return table.filter(pc.is_in(table["key"], value_set=self.manifest["key"]))

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.path)!r}, {len(self)} studies)"

    def keys(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __getitem__(self, key: str) -> Study:
        return self.open(key)

    def filter(self, expression: pc.Expression) -> ShardDataset:
        """A view of the studies matching ``expression``, e.g. ``pc.field("n_scans") >= 2``."""
        return ShardDataset(
            self.location.url,
            self.manifest.filter(expression),
            version=self.version.number,
            _scans=self._all_scans,
        )

    def shard_names(self) -> list[str]:
        """Shards holding this view's studies, in name order."""
        return sorted(set(self.manifest.column("shard").to_pylist()))

    def shard_paths(self) -> list[str]:
        """Paths (local) or URLs (object store) of this view's shards, in name order."""
        return [self.location.uri(name) for name in self.shard_names()]

    def where(self) -> dict[str, str]:
        """``key -> shard`` of this view's studies (an earlier version's sample of a study
        may still lie in another shard; it is not part of this view)."""
        return dict(
            zip(
                self.manifest.column("key").to_pylist(),
                self.manifest.column("shard").to_pylist(),
                strict=True,
            )
        )

    def listed_files(self) -> set[str]:
        """The dataset's files as its version log lists them (paths relative to the dataset
        root): every version file, fragment and shard of every version, so the old shards
        of rebuilt studies count (earlier versions read them)."""
        files = set()
        for version in self.history:
            if self.location.exists(versions.version_file(version.number)):
                files.add(versions.version_file(version.number))
            files.update(version.manifests, version.scans, version.shards)
        return files

    def row(self, key: str) -> dict[str, Any]:
        if key not in self._rows:
            raise KeyError(f"no study {key!r} in {self.path}")
        return self.manifest.slice(self._rows[key], 1).to_pylist()[0]

    def read_members(
        self, key: str, verify: bool = True, names: Iterable[str] = fmt.MEMBERS
    ) -> dict[str, bytes]:
        """The sample's raw members (all, or those named in ``names``), read by offset (no
        shard scan)."""
        row = self.row(key)
        try:
            shard = fmt.check_name(row["shard"], fmt.SHARD_NAME_PATTERN, "shard name")
        except ShardFormatError as error:
            raise ShardFormatError(f"study {key!r}: {error}") from None
        wanted, members = set(names), {}
        with self.open_shard(key, shard) as file:
            for ext, column in ((e, c) for e, c in MEMBER_COLUMNS.items() if e in wanted):
                file.seek(row[f"{column}_offset"])
                data = file.read(row[f"{column}_size"])
                if len(data) != row[f"{column}_size"]:
                    raise ShardFormatError(f"study {key!r}: member {ext} is truncated in {row['shard']}")
                if verify and hashlib.sha256(data).hexdigest() != row[f"{column}_sha256"]:
                    raise ShardFormatError(
                        f"study {key!r}: checksum mismatch in member {key}.{ext} ({row['shard']})"
                    )
                members[ext] = data
        return members

    def open_shard(self, key: str, shard: str):
        """The shard file ``shard`` (holding study ``key``), open for byte-range reads."""
        try:
            return self.location.open(shard)
        except FileNotFoundError:
            raise ShardFormatError(f"study {key!r}: shard {shard} is missing") from None

    def report(self, key: str, verify: bool = True) -> str:
        """The study's report text alone (one byte-range read; no arrays are opened)."""
        return decode_report(key, self.read_members(key, verify, names=(fmt.TEXT_MEMBER,))[fmt.TEXT_MEMBER])

    def open(self, key: str, verify: bool = True) -> Study:
        """The study ``key`` with lazy scan arrays; ``verify`` checks member sha256s."""
        return decode_study(key, self.read_members(key, verify=verify))
