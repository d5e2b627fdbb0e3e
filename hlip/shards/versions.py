"""Dataset versions: a dataset grows by appending shards and committing a new version.

A version is one small JSON file, ``_versions/NNNNNN.json``, that lists the manifest and
scans fragments (Parquet files) whose rows make up the dataset at that version, oldest
first. A later fragment's row for a study key supersedes an earlier one: a rebuilt study
is a new sample in a new shard, and its old sample stays, unreferenced, in its old shard.
Shards and fragments are never rewritten, so every version stays readable as committed.

A version is committed by creating its JSON with create-if-absent semantics
(:meth:`hlip.shards.storage.Location.create`), after its shards and fragments are
complete: a reader sees a version whole or not at all, and of two writers that race for
the same number one wins and the other gets :class:`VersionConflict`.

Datasets written before versions existed (one ``manifest.parquet`` and ``scans.parquet``,
no ``_versions/``) read as version 1. Version 1 of a new dataset keeps those two file
names, so readers that predate versions read it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlip.shards import format as fmt
from hlip.shards.format import ShardFormatError
from hlip.shards.storage import Location

VERSIONS_DIR = "_versions"
VERSION_FILE = re.compile(r"\d{6}\.json")


class VersionConflict(RuntimeError):
    """Another writer committed the version this one was about to commit."""


@dataclass(frozen=True)
class DatasetVersion:
    """One committed version of a dataset (the content of ``_versions/NNNNNN.json``)."""

    number: int
    manifests: tuple[str, ...]
    scans: tuple[str, ...]
    shards: tuple[str, ...]
    """The shards this version added."""
    added: int
    """Studies new in this version."""
    superseded: int
    """Studies of earlier versions that this version rebuilt."""
    studies: int
    format_version: str = fmt.FORMAT_VERSION
    created: str = field(default="", compare=False)
    """UTC time of the commit (ISO 8601), from the version file's modification time: the
    file itself holds no time, so the same inputs give the same bytes. Empty for a dataset
    written before versions."""

    def record(self) -> dict:
        fields = asdict(self)
        del fields["created"]
        return {"format": fmt.FORMAT_NAME, **fields}


def version_file(number: int) -> str:
    return f"{VERSIONS_DIR}/{number:06d}.json"


def fragment_names(number: int) -> tuple[str, str]:
    """The manifest and scans fragments a version writes (version 1 keeps the v1 names)."""
    if number == 1:
        return fmt.MANIFEST_FILE, fmt.SCANS_FILE
    return f"{VERSIONS_DIR}/manifest-{number:06d}.parquet", f"{VERSIONS_DIR}/scans-{number:06d}.parquet"


def _parse(location: Location, name: str) -> DatasetVersion:
    where = f"{location.uri(name)}"
    try:
        record = json.loads(location.read_bytes(name))
        if record.get("format") != fmt.FORMAT_NAME:
            raise ShardFormatError(f"{where}: not an {fmt.FORMAT_NAME} version file")
        fmt.check_version(record.get("format_version", ""), where=where)
        fields = {key: record[key] for key in DatasetVersion.__dataclass_fields__ if key != "created"}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as error:
        raise ShardFormatError(f"{where}: damaged version file ({error})") from None
    for key in ("manifests", "scans", "shards"):
        fields[key] = tuple(fields[key])
    return DatasetVersion(**fields, created=location.modified(name))


def _legacy_version(location: Location) -> DatasetVersion | None:
    """Version 1 of a dataset written before versions existed, from its manifest."""
    if not location.exists(fmt.MANIFEST_FILE):
        return None
    manifest = read_parquet(location, fmt.MANIFEST_FILE)
    shards = tuple(sorted(set(manifest.column("shard").to_pylist())))
    return DatasetVersion(
        1, (fmt.MANIFEST_FILE,), (fmt.SCANS_FILE,), shards, manifest.num_rows, 0, manifest.num_rows
    )


def list_versions(location: Location) -> list[DatasetVersion]:
    """Every committed version, oldest first; [] when the location holds no dataset."""
    names = [name for name in location.list(VERSIONS_DIR) if VERSION_FILE.fullmatch(name.rsplit("/", 1)[-1])]
    if not names:
        legacy = _legacy_version(location)
        return [] if legacy is None else [legacy]
    versions = [_parse(location, name) for name in names]
    numbers = [version.number for version in versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ShardFormatError(f"{location}: version log is not numbered 1..{len(numbers)}: {numbers}")
    return versions


def get_version(location: Location, number: int | None = None) -> DatasetVersion:
    """Version ``number`` (default: the latest); ShardFormatError when there is none."""
    versions = list_versions(location)
    if not versions:
        raise ShardFormatError(
            f"{location} is not a finished dataset: {fmt.MANIFEST_FILE} is missing and no version is committed"
        )
    if number is None:
        return versions[-1]
    if not 1 <= number <= len(versions):
        raise ShardFormatError(f"{location} has no version {number} (versions 1..{len(versions)})")
    return versions[number - 1]


def read_parquet(location: Location, name: str, columns: list[str] | None = None) -> pa.Table:
    try:
        with location.open(name) as file:
            return pq.read_table(file, columns=columns)
    except FileNotFoundError:
        raise ShardFormatError(f"{location.uri(name)} is missing") from None
    except (pa.ArrowException, OSError) as error:
        raise ShardFormatError(f"{location.uri(name)} does not read as Parquet: {error}") from None


def _latest_rows(tables: list[pa.Table]) -> list[pa.Table]:
    """Each fragment's rows whose key no later fragment has (a later row supersedes)."""
    seen: set[str] = set()
    kept = []
    for table in reversed(tables):
        keys = table.column("key").to_pylist()
        kept.append(table.filter(pa.array([key not in seen for key in keys], pa.bool_())))
        seen.update(keys)
    return kept[::-1]


def read_tables(location: Location, version: DatasetVersion) -> tuple[pa.Table, pa.Table]:
    """The manifest (one row per study, key order) and scans table of ``version``."""
    manifests = [read_parquet(location, name) for name in version.manifests]
    for name, table in zip(version.manifests, manifests, strict=True):
        for found in set(table.column("format_version").to_pylist()):
            fmt.check_version(found, where=location.uri(name))
    if len(manifests) == 1:
        return manifests[0], read_parquet(location, version.scans[0])
    latest = _latest_rows(manifests)
    manifest = pa.concat_tables(latest, promote_options="default")
    manifest = manifest.take(pc.sort_indices(manifest, [("key", "ascending")]))
    scans = []
    for name, kept in zip(version.scans, latest, strict=True):
        table = read_parquet(location, name)
        scans.append(table.filter(pc.is_in(table["key"], value_set=kept["key"])))
    scans = pa.concat_tables(scans, promote_options="default")
    scans = scans.take(pc.sort_indices(scans, [("key", "ascending"), ("scan_index", "ascending")]))
    return manifest, scans


def next_shard_index(versions: list[DatasetVersion], prefix: str) -> int:
    """The first shard number free in every version (so names never collide)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.tar")
    numbers = [int(m.group(1)) for v in versions for s in v.shards if (m := pattern.fullmatch(s))]
    return max(numbers, default=-1) + 1


def commit(
    location: Location,
    previous: DatasetVersion | None,
    shards: list[str],
    keys: list[str],
    previous_keys: set[str],
) -> DatasetVersion:
    """Commit the version after ``previous`` whose fragments (already written under
    :func:`fragment_names`) hold ``keys`` in the new ``shards``; VersionConflict when
    another writer committed that number first."""
    if previous is not None and not location.exists(version_file(previous.number)):
        _write_version(location, previous)  # a dataset written before versions gets its log
    number = 1 if previous is None else previous.number + 1
    manifest_name, scans_name = fragment_names(number)
    superseded = sum(key in previous_keys for key in keys)
    version = DatasetVersion(
        number=number,
        manifests=(*(previous.manifests if previous else ()), manifest_name),
        scans=(*(previous.scans if previous else ()), scans_name),
        shards=tuple(shards),
        added=len(keys) - superseded,
        superseded=superseded,
        studies=len(previous_keys) + len(keys) - superseded,
    )
    if not _write_version(location, version):
        raise VersionConflict(f"{location}: version {number} was committed by another writer")
    return replace(version, created=location.modified(version_file(number)))


def _write_version(location: Location, version: DatasetVersion) -> bool:
    data = json.dumps(version.record(), indent=1, sort_keys=True).encode()
    return location.create(version_file(version.number), data)
