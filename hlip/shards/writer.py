"""Write studies as format-v1 shards: deterministic bytes, atomic files, resumable staging.

Writing happens in two phases so that an interrupted ingest keeps its finished work:

1. :meth:`DatasetWriter.add` encodes one study (:func:`encode_study`, a pure function)
   and spools it atomically to ``<out_dir>/_staging/<key>.sample`` (a one-sample tar).
2. :meth:`DatasetWriter.finalize` packs every staged sample, in sorted key order, into
   size-bounded shards ``<prefix>-NNNNNN.tar`` numbered after those of earlier versions,
   writes the version's scans and manifest fragments, commits the version
   (:mod:`hlip.shards.versions`), then drops the staging dir.

Every byte is a function of the studies and the settings only: tar headers carry no
time, owner or mode of the writing machine, zip entries carry a fixed timestamp, JSON
keys are sorted, samples are packed in key order with a greedy size rule, and Parquet
tables have a fixed row order and no timestamps.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from hlip.shards import format as fmt
from hlip.shards import versions
from hlip.shards.format import Scan, Study
from hlip.shards.storage import Location

STAGING_DIR = "_staging"
STAGED_SUFFIX = ".sample"
TAR_BLOCK = 512
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
"""The earliest time a zip entry can carry; any fixed value keeps bytes reproducible."""

MEMBER_COLUMNS = {fmt.JSON_MEMBER: "json", fmt.TEXT_MEMBER: "txt", fmt.ARRAYS_MEMBER: "zarr_zip"}
"""Manifest column prefix per member (``<prefix>_offset``, ``_size``, ``_sha256``)."""

LABEL_COLUMN_PREFIX = "label_"


# --- encoding one study -----------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays from ingest code pass into JSON as plain values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dump_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace variance, strict (no NaN), UTF-8."""
    text = json.dumps(
        value,
        sort_keys=True,
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
        default=_json_default,
    )
    return text.encode("utf-8")


def scan_record(scan: Scan) -> dict[str, Any]:
    """The JSON description of one scan (everything but the voxels)."""
    return {
        "name": scan.name,
        "modality": scan.modality,
        "series_number": None if scan.series_number is None else int(scan.series_number),
        "series_description": scan.series_description,
        "shape": list(scan.shape),
        "spacing": [float(s) for s in scan.spacing],
        "affine": np.asarray(scan.affine, dtype=float).tolist(),
        "intensity_unit": scan.intensity_unit,
        "intensity_slope": float(scan.intensity_slope),
        "intensity_intercept": float(scan.intensity_intercept),
        "source_file_count": int(scan.source_file_count),
        "extra": scan.extra,
    }


def study_record(study: Study) -> dict[str, Any]:
    """The sample JSON (``<key>.json``): format identity, study fields and the scan list."""
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "key": study.key,
        "modality": study.modality,
        "body_part": study.body_part,
        "scans": [scan_record(scan) for scan in study.scans],
        "labels": study.labels,
        "meta": study.meta,
        "config_hash": study.config_hash,
    }


def _zip_bytes(entries: Mapping[str, bytes]) -> bytes:
    """A zip of ``entries`` in sorted name order, stored (chunks are already compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, entries[name])
    return buffer.getvalue()


def encode_arrays(
    study: Study, slab_depth: int = fmt.DEFAULT_SLAB_DEPTH, codec: str = fmt.DEFAULT_CODEC
) -> bytes:
    """The ``<key>.zarr.zip`` member: a zarr v3 group with one int16 array per scan, its slabs
    compressed with the named codec (:data:`hlip.shards.format.SLAB_CODECS`).

    Arrays are written to memory and zipped afterwards, so the zip holds each key exactly
    once in sorted order (zarr's ZipStore appends duplicates when metadata is rewritten).
    """
    entries: dict[str, Any] = {}
    store = MemoryStore(entries)
    attributes = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "key": study.key}
    group = zarr.create_group(store=store, zarr_format=3, attributes=attributes)
    slabs: dict[str, bytes] = {}
    settings = fmt.slab_codec(codec)
    compressor = BloscCodec(
        cname=settings.cname, clevel=settings.clevel, shuffle=settings.shuffle, blocksize=settings.blocksize
    )
    for scan in study.scans:
        depth, height, width = scan.shape
        array = group.create_array(
            scan.name,
            shape=scan.shape,
            chunks=(min(slab_depth, depth), height, width),
            dtype=fmt.ARRAY_DTYPE,
            compressors=compressor,
            fill_value=0,
            dimension_names=("d", "h", "w"),
            attributes={
                "spacing": [float(s) for s in scan.spacing],
                "affine": np.asarray(scan.affine, dtype=float).tolist(),
                "intensity_unit": scan.intensity_unit,
            },
        )
        slabs.update(encode_slabs(scan.name, scan.array, array.chunks[0], codec))
    return _zip_bytes({**{key: buffer.to_bytes() for key, buffer in entries.items()}, **slabs})


@functools.cache
def _blosc(codec: str) -> Blosc:
    """The named codec's Blosc as zarr's ``BloscCodec`` configures numcodecs for int16 (so the
    chunks are the bytes zarr would write under the same ``zarr.json``)."""
    settings = fmt.slab_codec(codec)
    modes = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    return Blosc(
        cname=settings.cname,
        clevel=settings.clevel,
        shuffle=modes[settings.shuffle],
        blocksize=settings.blocksize,
        typesize=fmt.ARRAY_DTYPE.itemsize,
    )


def encode_slabs(
    name: str, voxels: np.ndarray, depth: int, codec: str = fmt.DEFAULT_CODEC
) -> dict[str, bytes]:
    """The chunk entries of array ``name``: each slab of ``depth`` slices compressed once,
    straight from the volume, with the bytes zarr writes for it (a partial last slab is
    padded with the fill value 0; a slab of only zeros is not stored).

    zarr itself copies each chunk into a new buffer and hands it to a thread through its
    event loop; this is the same Blosc call without that overhead."""
    voxels = np.ascontiguousarray(voxels, dtype=fmt.ARRAY_DTYPE.newbyteorder("<"))
    blosc, slabs = _blosc(codec), {}
    for index, start in enumerate(range(0, voxels.shape[0], depth)):
        slab = voxels[start : start + depth]
        if not slab.any():
            continue
        if len(slab) < depth:
            slab = np.concatenate([slab, np.zeros((depth - len(slab), *slab.shape[1:]), slab.dtype)])
        slabs[f"{name}/c/{index}/0/0"] = blosc.encode(slab)
    return slabs


def encode_study(
    study: Study, slab_depth: int = fmt.DEFAULT_SLAB_DEPTH, codec: str = fmt.DEFAULT_CODEC
) -> dict[str, bytes]:
    """The members of one sample, ``{"json": ..., "txt": ..., "zarr.zip": ...}``.

    Pure and deterministic: the same study gives the same bytes on any machine. Raises
    ValueError (naming the study and scan) for input that the format cannot hold.
    """
    fmt.validate_study(study)
    try:
        record = dump_json(study_record(study))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"study {study.key!r}: labels/meta/extra are not JSON serialisable: {error}"
        ) from None
    return {
        fmt.JSON_MEMBER: record,
        fmt.TEXT_MEMBER: study.report.encode("utf-8"),
        fmt.ARRAYS_MEMBER: encode_arrays(study, slab_depth, codec),
    }


# --- tar and atomic files ---------------------------------------------------------------


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A header that depends only on the member name and size."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def member_names(key: str, members: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """``(extension, file name)`` pairs in the fixed member order of the format."""
    return [(ext, f"{key}.{ext}") for ext in fmt.MEMBERS if ext in members]


def tar_member_size(size: int) -> int:
    """Bytes a member of ``size`` bytes occupies in a tar: header plus data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_sample_size(key: str, members: Mapping[str, bytes]) -> int:
    """Bytes one sample occupies in a shard (headers plus padded data)."""
    return sum(tar_member_size(len(members[ext])) for ext, _ in member_names(key, members))


def _add_sample(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes]) -> dict[str, tuple[int, int]]:
    """Append a sample; return ``{ext: (data offset, size)}`` within the tar."""
    located = {}
    for ext, name in member_names(key, members):
        data = members[ext]
        info = _tar_info(name, len(data))
        header = info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors)
        located[ext] = (tar.offset + len(header), len(data))
        tar.addfile(info, io.BytesIO(data))
    return located


def _open_tar(fileobj: Any) -> tarfile.TarFile:
    return tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """Write to ``<name>.tmp``, fsync, then rename: the target is complete or absent."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    def __enter__(self):
        self.file = open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole (temporary name, fsync, rename), creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as file:
        file.write(data)


# --- staged samples ---------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PackedSample:
    """Where one sample landed: its shard and each member's offset, size and digest."""

    key: str
    shard: str
    located: dict[str, tuple[int, int]]
    digests: dict[str, str]
    record: dict[str, Any]
    report_length: int


def staged_sample_size(location: Location, name: str) -> int:
    """Shard bytes of a staged sample, from its tar headers alone."""
    with location.open(name) as file, tarfile.open(fileobj=file, mode="r:") as tar:
        return sum(tar_member_size(info.size) for info in tar.getmembers())


def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Greedy assignment of consecutive samples to shards: a shard closes before it would
    exceed ``max_shard_bytes`` unless it is empty, so it depends only on order and sizes."""
    shards: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if not shards or used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(index)
        used += size
    return shards


def _pack_sample(file: Any, offset: int, data: bytes, key: str, shard: str) -> tuple[PackedSample, int]:
    """Append the staged sample ``data`` (of study ``key``) to the shard ``file`` at
    ``offset``; where it landed, and the offset after it.

    A staged sample is a one-sample tar whose member blocks (headers depend only on name
    and size) are exactly the bytes the sample occupies in a shard: they are copied in one
    write, without re-encoding the headers or copying the data block by block."""
    raw = memoryview(data)
    members, located, end = {}, {}, 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # shares ``data``: headers only
        for info in tar:
            _, _, ext = info.name.partition(".")
            members[ext] = raw[info.offset_data : info.offset_data + info.size]
            located[ext] = (offset + info.offset_data, info.size)
            end = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
    file.write(raw[:end])
    sample = PackedSample(
        key=key,
        shard=shard,
        located=located,
        digests={ext: _sha256(data) for ext, data in members.items()},
        record=json.loads(bytes(members[fmt.JSON_MEMBER])),
        report_length=len(bytes(members[fmt.TEXT_MEMBER]).decode("utf-8")),
    )
    return sample, offset + end


def _end_of_archive(offset: int) -> bytes:
    """What ``tarfile`` writes on closing a tar of ``offset`` bytes: two zero blocks, then
    zeros up to a whole record."""
    offset += 2 * TAR_BLOCK
    return bytes(2 * TAR_BLOCK + -offset % tarfile.RECORDSIZE)


def _staged_key(name: str) -> str:
    return name.rsplit("/", 1)[-1][: -len(STAGED_SUFFIX)]


def _write_samples(file: Any, location: Location, staged: Sequence[str], shard: str) -> list[PackedSample]:
    packed, offset = [], 0
    for name in staged:
        sample, offset = _pack_sample(file, offset, location.read_bytes(name), _staged_key(name), shard)
        packed.append(sample)
    file.write(_end_of_archive(offset))
    return packed


def write_shard(staged: Sequence[str], root: str, shard: str) -> list[PackedSample]:
    """Write the samples staged under ``root`` (names relative to it), in the given order,
    as the one shard ``shard`` there: complete or absent (a local file is renamed into
    place, an object is uploaded whole).

    Shards depend only on their own samples, so they can be written in any order or in
    parallel (in other processes, e.g. as tasks on a cluster) with the same bytes."""
    location = Location(root)
    if location.local:
        with AtomicFile(
            fmt.path_inside(location.root, fmt.check_name(shard, fmt.SHARD_NAME_PATTERN, "shard name"))
        ) as file:
            return _write_samples(file, location, staged, shard)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / shard
        with open(local, "wb") as file:
            packed = _write_samples(file, location, staged, shard)
        location.upload(local, shard)
    return packed


def pack_shards(
    staged: list[str],
    location: Location,
    prefix: str,
    max_shard_bytes: int,
    map: Callable = map,
    first_index: int = 0,
) -> list[PackedSample]:
    """Write the staged samples, in the given (sorted) order, into shards numbered from
    ``first_index``.

    The shard boundaries come from the staged tar headers alone; ``map`` (like the
    builtin, which it defaults to: ``map(write_shard, groups, roots, names)`` yielding
    results in order) then writes each shard, e.g. as parallel tasks on a cluster.
    """
    groups = plan_shards([staged_sample_size(location, name) for name in staged], max_shard_bytes)
    samples = [[staged[i] for i in group] for group in groups]
    names = [shard_name(prefix, first_index + index) for index in range(len(groups))]
    roots = [location.url] * len(groups)
    return [sample for shard in map(write_shard, samples, roots, names) for sample in shard]


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


# --- manifests --------------------------------------------------------------------------


def _label_columns(records: list[dict[str, Any]]) -> dict[str, pa.Array]:
    """One column per label name; a label whose values do not share one Arrow type is
    stored as JSON text so the table can always be written."""
    names = sorted({name for record in records for name in record["labels"]})
    columns = {}
    for name in names:
        values = [record["labels"].get(name) for record in records]
        try:
            columns[LABEL_COLUMN_PREFIX + name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[LABEL_COLUMN_PREFIX + name] = pa.array(
                [None if v is None else dump_json(v).decode() for v in values], pa.string()
            )
    return columns


MANIFEST_SCHEMA = pa.schema(
    [("key", pa.string()), ("shard", pa.string())]
    + [
        (f"{column}_{field}", kind)
        for column in MEMBER_COLUMNS.values()
        for field, kind in (("offset", pa.int64()), ("size", pa.int64()), ("sha256", pa.string()))
    ]
    + [
        ("format_version", pa.string()),
        ("modality", pa.string()),
        ("body_part", pa.string()),
        ("n_scans", pa.int32()),
        ("n_slices", pa.int64()),
        ("report_length", pa.int64()),
        ("config_hash", pa.string()),
        ("labels", pa.string()),
    ]
)
"""Fixed manifest columns; ``label_<name>`` columns follow (docs/shard-format.md)."""

SCANS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("scan", pa.string()),
        ("scan_index", pa.int32()),
        ("series_number", pa.int64()),
        ("series_description", pa.string()),
        ("modality", pa.string()),
        ("shape_d", pa.int64()),
        ("shape_h", pa.int64()),
        ("shape_w", pa.int64()),
        ("spacing_d", pa.float64()),
        ("spacing_h", pa.float64()),
        ("spacing_w", pa.float64()),
        ("dtype", pa.string()),
        ("intensity_unit", pa.string()),
        ("intensity_slope", pa.float64()),
        ("intensity_intercept", pa.float64()),
        ("source_file_count", pa.int64()),
    ]
)


def _manifest_row(sample: PackedSample) -> dict[str, Any]:
    record = sample.record
    row = {"key": sample.key, "shard": sample.shard}
    for ext, column in MEMBER_COLUMNS.items():
        row[f"{column}_offset"], row[f"{column}_size"] = sample.located[ext]
        row[f"{column}_sha256"] = sample.digests[ext]
    row.update(
        format_version=record["format_version"],
        modality=record["modality"],
        body_part=record["body_part"],
        n_scans=len(record["scans"]),
        n_slices=sum(scan["shape"][0] for scan in record["scans"]),
        report_length=sample.report_length,
        config_hash=record["config_hash"],
        labels=dump_json(record["labels"]).decode(),
    )
    return row


def manifest_table(packed: list[PackedSample]) -> pa.Table:
    """One row per study, in key order, plus one ``label_<name>`` column per label."""
    table = pa.Table.from_pylist([_manifest_row(sample) for sample in packed], schema=MANIFEST_SCHEMA)
    for name, column in _label_columns([sample.record for sample in packed]).items():
        table = table.append_column(name, column)
    return table


def _scan_row(key: str, index: int, scan: dict[str, Any]) -> dict[str, Any]:
    row = {name: scan.get(name) for name in SCANS_SCHEMA.names if name in scan}
    row.update(key=key, scan=scan["name"], scan_index=index, dtype=fmt.ARRAY_DTYPE.name)
    for axis, name in enumerate("dhw"):
        row[f"shape_{name}"] = scan["shape"][axis]
        row[f"spacing_{name}"] = scan["spacing"][axis]
    return row


def scans_table(packed: list[PackedSample]) -> pa.Table:
    """One row per scan, in (study key, scan order) order."""
    rows = [_scan_row(s.key, i, scan) for s in packed for i, scan in enumerate(s.record["scans"])]
    return pa.Table.from_pylist(rows, schema=SCANS_SCHEMA)


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """Parquet with a fixed writer configuration (no timestamps are ever written)."""
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        compression="zstd",
        use_dictionary=True,
        write_statistics=True,
        row_group_size=row_group_size,
    )
    return buffer.getvalue()


# --- the writer -------------------------------------------------------------------------


class DatasetWriter:
    """Stage studies one by one, then pack them into shards and commit a dataset version.

    ``add`` is safe to resume: staged samples survive a killed run and ``has(key)`` tells
    a caller which studies are already done. Different processes may stage different
    keys into the same dataset concurrently; ``finalize`` runs once, at the end. On a
    dataset that already has versions, ``finalize`` appends: the staged studies go into
    new shards and a new version (a staged key that an earlier version holds supersedes
    it there); shards already written are never touched.

    ``out_dir`` is a directory or an object-store URL (:mod:`hlip.shards.storage`); the
    staging area ``_staging/`` lives beside the shards, so whichever process packs a shard
    reads its samples from there.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = fmt.SHARD_PREFIX,
        max_shard_bytes: int = fmt.DEFAULT_MAX_SHARD_BYTES,
        slab_depth: int = fmt.DEFAULT_SLAB_DEPTH,
        codec: str = fmt.DEFAULT_CODEC,
    ) -> None:
        if not fmt.KEY_PATTERN.fullmatch(prefix):
            raise ValueError(f"unsafe shard prefix {prefix!r}")
        if max_shard_bytes <= 0 or slab_depth <= 0:
            raise ValueError("max_shard_bytes and slab_depth must be positive")
        fmt.slab_codec(codec)
        self.location = Location(out_dir)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.slab_depth = slab_depth
        self.codec = codec

    def _staged_name(self, key: str) -> str:
        return f"{STAGING_DIR}/{fmt.check_key(key)}{STAGED_SUFFIX}"

    def has(self, key: str) -> bool:
        """Whether ``key`` is already staged (a resumed run can skip it)."""
        return self.location.exists(self._staged_name(key))

    def staged_keys(self) -> list[str]:
        names = self.location.list(STAGING_DIR)
        return sorted(_staged_key(name) for name in names if name.endswith(STAGED_SUFFIX))

    def add(self, study: Study) -> None:
        """Encode and stage one study; ValueError for invalid input or a duplicate key."""
        members = encode_study(study, self.slab_depth, self.codec)
        self.add_encoded(study.key, members)

    def add_encoded(self, key: str, members: Mapping[str, bytes]) -> None:
        """Stage members produced by :func:`encode_study` (e.g. in another process)."""
        name = self._staged_name(key)
        missing = [ext for ext in fmt.MEMBERS if ext not in members]
        if missing:
            raise ValueError(f"study {key!r}: missing members {missing}")
        if self.location.exists(name):
            raise ValueError(
                f"duplicate study key {key!r}: already staged in {self.location.uri(STAGING_DIR)}"
            )
        buffer = io.BytesIO()
        with _open_tar(buffer) as tar:
            _add_sample(tar, key, members)
        self.location.write(name, buffer.getvalue())

    def finalize(self, map: Callable = map) -> versions.DatasetVersion | None:
        """Pack the staged samples into new shards and commit them as the next version;
        return it. A staged sample that the latest version already holds with the same
        bytes is dropped (a run that crashed after its commit, a rebuild that changed
        nothing); None when nothing is left to commit on a dataset that has a version.

        ``map`` writes the shards (:func:`pack_shards`); the bytes do not depend on it.
        Shards and fragments are complete before the version file that names them is
        created, so a reader never sees a partial version; re-running after a crash
        rewrites the same bytes from the staging area. VersionConflict when another
        writer committed the same version number first.
        """
        history = versions.list_versions(self.location)
        previous = history[-1] if history else None
        committed = {} if previous is None else self._digests(previous)
        keys = [
            key
            for key in self.staged_keys()
            if key not in committed or committed[key] != self._staged_digests(key)
        ]
        if previous is not None and not keys:
            self.location.delete_folder(STAGING_DIR)
            return None
        first = versions.next_shard_index(history, self.prefix)
        staged = [self._staged_name(key) for key in keys]
        packed = pack_shards(staged, self.location, self.prefix, self.max_shard_bytes, map, first)
        number = 1 if previous is None else previous.number + 1
        manifest_name, scans_name = versions.fragment_names(number)
        self.location.write(scans_name, parquet_bytes(scans_table(packed)))
        self.location.write(manifest_name, parquet_bytes(manifest_table(packed)))
        shards = sorted({sample.shard for sample in packed})
        version = versions.commit(self.location, previous, shards, keys, set(committed))
        self.location.delete_folder(STAGING_DIR)
        return version

    def _digests(self, version: versions.DatasetVersion) -> dict[str, tuple[str, ...]]:
        """``key -> member sha256s`` of the studies in ``version``."""
        manifest = versions.read_tables(self.location, version)[0]
        columns = [manifest[f"{column}_sha256"].to_pylist() for column in MEMBER_COLUMNS.values()]
        return dict(zip(manifest["key"].to_pylist(), zip(*columns, strict=True), strict=True))

    def _staged_digests(self, key: str) -> tuple[str, ...]:
        """Member sha256s of a staged sample, in :data:`MEMBER_COLUMNS` order."""
        data = self.location.read_bytes(self._staged_name(key))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = {info.name.partition(".")[2]: tar.extractfile(info).read() for info in tar}
        return tuple(_sha256(members[ext]) for ext in MEMBER_COLUMNS)


def read_manifest(location: Location) -> pa.Table:
    """The manifest of the latest version at ``location``."""
    return versions.read_tables(location, versions.get_version(location))[0]


def write_dataset(out_dir: str | os.PathLike, studies: Iterable[Study], **kw: Any) -> pa.Table:
    """Write ``studies`` into ``out_dir`` as a new dataset or the next version of one;
    return the manifest table of the latest version."""
    writer = DatasetWriter(out_dir, **kw)
    for study in studies:
        writer.add(study)
    writer.finalize()
    return read_manifest(writer.location)
