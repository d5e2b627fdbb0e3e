"""The partitioned index: listing split into units, rows partitioned by study.

An archive of 10^7-10^8 files cannot be listed, indexed or planned by one process, so the
workers build the index as a partitioned Parquet dataset in the ingest's work folder
(``_ingest/``), and the client never holds a row of it:

* A **unit** is the piece of the sources one task lists and indexes: a folder tree of at
  most :data:`UNIT_FILES` files, a share of the files or of the subfolders of a larger
  folder (by a hash of their names), a chunk of the members of a zip export or of the
  lines of a path list, or one file. A task that finds its piece too large splits it into
  units instead of indexing it (:func:`expand`), so listing itself is spread over the
  workers.
* A unit writes its rows to ``index/part-NNNN/<unit>.parquet``, one file for each
  partition it has rows in. A row's partition is a hash of its StudyInstanceUID, so all
  files of a study meet in one partition whatever folder or zip they lie in (unreadable
  files, which belong to no study, are spread by a hash of their path). The
  SOPInstanceUIDs of its rows go to ``sops/part-NNNN/<unit>.parquet`` by a hash of the
  UID, so that an instance stored under two studies is found per partition too
  (:func:`find_duplicates`).
* ``units/<unit>.json`` records what the unit listed (a digest of the paths, sizes and
  modification times) and the partitions it wrote. A re-run skips a unit whose listing
  is unchanged and parses only the new or changed files of the others.

What the client keeps is one small :class:`UnitSummary` per unit and counts per
partition.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlip.ingest import index, reports
from hlip.shards.writer import parquet_bytes, write_bytes_atomic

UNIT_FILES = 2048
"""Most files one index task lists and parses: enough to hide a task's overhead, few
enough that a huge folder is split over many workers."""

DEFAULT_PARTITIONS = 16
"""Index partitions of an ingest. A partition is planned by one task holding its rows, so
aim at about 50,000 files per partition: the default suits archives of up to about 10^6
files (``--index-partitions`` for larger ones). More partitions than that only add small
files: each unit writes one fragment per partition it has rows in."""

INDEX_DIR, SOPS_DIR, UNITS_DIR, DUPLICATES_DIR, LISTINGS_DIR = (
    "index",
    "sops",
    "units",
    "duplicates",
    "listings",
)
ZIP_SUFFIX = ".zip"
SOP_SCHEMA = pa.schema([("SOPInstanceUID", pa.string()), ("file_id", pa.string()), ("partition", pa.int32())])
DUPLICATE_SCHEMA = pa.schema([("file_id", pa.string()), ("SOPInstanceUID", pa.string())])
SCHEMA_DIGEST = hashlib.sha256(str(index.INDEX_SCHEMA).encode()).hexdigest()[:16]
"""Rows of a unit recorded under another index schema are parsed again."""


@dataclass(frozen=True, order=True)
class Unit:
    """A piece of the sources: ``kind`` is ``tree`` (a folder, split when large), ``files``
    or ``folders`` (the files or the subfolder trees directly in folder ``path`` whose names
    fall in hash bucket ``chunk``), ``zip`` / ``list`` (a zip export or a path list; chunk
    ``chunk`` of its members or lines, -1 until split) or ``file``."""

    kind: str
    path: str
    chunk: int = -1

    @property
    def name(self) -> str:
        """A file name for the unit's records, stable across runs."""
        return hashlib.sha256(repr(tuple(asdict(self).values())).encode()).hexdigest()[:24]


@dataclass
class UnitSummary:
    """What an index task reports: more units to index (when it split its own), and the
    unit's row counts per index partition and SOP partition (its record)."""

    unit: Unit
    units: list[Unit] = field(default_factory=list)
    files: int = 0
    parsed: int = 0
    listing: str = ""
    partitions: dict[int, int] = field(default_factory=dict)
    sop_partitions: list[int] = field(default_factory=list)


def partition_of(key: str, partitions: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % partitions


def row_partition(row: dict, partitions: int) -> int:
    """A row's index partition: by StudyInstanceUID (files without one, but readable,
    share the partition of the empty UID, as the plan puts them in one study); an
    unreadable file by its own id."""
    if row.get("error"):
        return partition_of(row["file_id"], partitions)
    return partition_of(row.get("StudyInstanceUID") or "", partitions)


def part_folder(kind: str, partition: int) -> str:
    return f"{kind}/part-{partition:04d}"


# --- units -------------------------------------------------------------------------------


def source_units(sources: Iterable[str | os.PathLike]) -> list[Unit]:
    """The first units of the sources; the tasks that index them split large ones."""
    units = []
    for source in sources:
        path = Path(source)
        absolute = os.path.abspath(path)
        if path.is_dir():
            units.append(Unit("tree", absolute))
        elif path.is_file() and path.suffix.lower() in index.LIST_SUFFIXES:
            units.append(Unit("list", absolute))
        elif path.is_file() and (path.suffix.lower() == ZIP_SUFFIX or index._is_zip(path)):
            units.append(Unit("zip", absolute))
        else:
            units.append(Unit("file", absolute))
    return units


def _excluded(path: str, exclude: Sequence[str]) -> bool:
    return any(path == folder or path.startswith(folder + os.sep) for folder in exclude)


def _entries(folder: str, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """Paths of the subfolders and of the files directly in ``folder``, sorted by name,
    without excluded ones; an unreadable folder has none."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError:
        return [], []
    folders, files = [], []
    for entry in entries:
        if _excluded(entry.path, exclude):
            continue
        try:
            is_folder = entry.is_dir()
        except OSError:
            is_folder = False
        (folders if is_folder else files).append(entry.path)
    return folders, files


def _source_file(path: str) -> index.SourceFile:
    try:
        stat = os.stat(path)
    except OSError:
        return index.SourceFile(os.path.abspath(path), "", 0)
    return index.SourceFile(os.path.abspath(path), "", stat.st_size, stat.st_mtime_ns)


def _is_zip_name(path: str) -> bool:
    return path.lower().endswith(ZIP_SUFFIX)


def _stamp(folder: str) -> list:
    """``[path, mtime_ns, inode]`` of a folder, taken before it is listed: a file added,
    removed or renamed in it afterwards changes the stamp ([path, 0, 0] if unreadable)."""
    try:
        stat = os.stat(folder)
    except OSError:
        return [folder, 0, 0]
    return [folder, stat.st_mtime_ns, stat.st_ino]


def _walk(
    roots: Sequence[str], exclude: Sequence[str], limit: int
) -> tuple[list[index.SourceFile] | None, list[Unit], list[list]]:
    """Every file under the folders ``roots`` (zips become units of their own) and the
    stamp of every folder listed; files None once they hold more than ``limit`` files (the
    stamps then are those of the folders listed until then, which decided it). Files are
    stat'ed only once the whole tree is known to fit: a tree that is split is listed again
    by its parts, which stat their own."""
    plain, zips, stamps, stack = [], [], [], list(reversed(roots))
    while stack:
        folder = stack.pop()
        stamps.append(_stamp(folder))
        folders, paths = _entries(folder, exclude)
        stack.extend(reversed(folders))
        plain += [path for path in paths if not _is_zip_name(path)]
        if len(plain) > limit:
            return None, [], stamps
        zips += [Unit("zip", os.path.abspath(path)) for path in paths if _is_zip_name(path)]
    return sorted(map(_source_file, plain), key=lambda f: f.file_id), sorted(zips), stamps


# --- one listing of a large folder ---------------------------------------------------------
#
# A folder too large for one unit is split over many units, each of which needs the folder's
# entries: scanned by each of them, a folder of F files would be read F / UNIT_FILES times.
# The unit that splits it writes the listing once (names, whether a folder, and the hash that
# places a name in a bucket) for the units it splits into, which read their bucket from it.

LISTING_SCHEMA = pa.schema([("name", pa.string()), ("folder", pa.bool_()), ("hash", pa.uint32())])


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def _listing_path(listings: Path, folder: str) -> Path:
    return listings / f"{hashlib.sha256(folder.encode()).hexdigest()[:24]}.parquet"


def _bucket(
    folder: str, chunk: int, want_folders: bool, exclude: Sequence[str], listings: Path | None
) -> tuple[list[str], np.ndarray, list]:
    """Paths (sorted by name) and name hashes of the subfolders (or files) of ``folder`` in
    hash bucket ``chunk``, and the folder's stamp taken before it was listed: from the
    listing the splitting unit wrote in this run, else scanned."""
    table = None
    if listings is not None:
        try:
            table = read_file(_listing_path(listings, folder))
        except OSError:
            table = None
    if table is None:
        stamp = _stamp(folder)
        folders, files = _entries(folder, exclude)
        table = _listing_table(folders, files, stamp)
    level, bucket = _level_bucket(chunk)
    hashes = table["hash"].to_numpy().astype(np.int64)
    keep = (table["folder"].to_numpy(zero_copy_only=False) == want_folders) & (
        hashes % (1 << level) == bucket
    )
    names = table["name"].filter(pa.array(keep)).to_pylist()
    stamp = json.loads((table.schema.metadata or {}).get(b"stamp", b"null")) or [folder, 0, 0]
    return [os.path.join(folder, name) for name in names], hashes[keep], stamp


def _listing_table(folders: Sequence[str], files: Sequence[str], stamp: list) -> pa.Table:
    names = [os.path.basename(p) for p in (*folders, *files)]
    columns = {
        "name": names,
        "folder": [True] * len(folders) + [False] * len(files),
        "hash": pa.array([_name_hash(name) for name in names], pa.uint32()),
    }
    return pa.table(columns, schema=LISTING_SCHEMA.with_metadata({"stamp": json.dumps(stamp)}))


ALL = 1
"""The bucket of every name: level 0 of the hash buckets below."""
MAX_LEVEL = 32


def _level_bucket(chunk: int) -> tuple[int, int]:
    level = chunk.bit_length() - 1
    return level, chunk - (1 << level)


def _halves(unit: Unit) -> list[Unit]:
    """The two buckets of the next level that share ``unit``'s names."""
    level, bucket = _level_bucket(unit.chunk)
    return [
        replace(unit, chunk=(2 << level) + bucket),
        replace(unit, chunk=(2 << level) + bucket + (1 << level)),
    ]


def _file_buckets(unit: Unit, hashes: np.ndarray, limit: int) -> list[Unit]:
    """The ``files`` units that ``unit``'s names fall into when each is halved until it holds
    at most ``limit`` names: the units one halving at a time would reach, found at once."""
    level, _ = _level_bucket(unit.chunk)
    if len(hashes) <= limit or level >= MAX_LEVEL:
        return [unit]
    return [
        leaf
        for half in _halves(unit)
        for leaf in _file_buckets(half, hashes[hashes % (2 << level) == _level_bucket(half.chunk)[1]], limit)
    ]


def expand(
    unit: Unit, exclude: Sequence[str] = (), limit: int | None = None, listings: Path | None = None
) -> tuple[list[index.SourceFile], list[Unit]]:
    """The files this unit indexes itself, and the units it splits off
    (:func:`expand_stamped` without the stamps)."""
    return expand_stamped(unit, exclude, limit, listings)[:2]


def expand_stamped(
    unit: Unit, exclude: Sequence[str] = (), limit: int | None = None, listings: Path | None = None
) -> tuple[list[index.SourceFile], list[Unit], dict | None]:
    """The files this unit indexes itself, and the units it splits off (units of at most
    ``limit`` files, default :data:`UNIT_FILES`).

    A folder too large for one unit is split into its direct files and its subfolders,
    each set cut by a hash of the names into halves until a half fits (``files`` and
    ``folders`` units): a name stays in its unit when others are added, so a growing
    archive keeps its units, and their index rows, from run to run. Listing is
    deterministic: the same tree gives the same units and files in the same order.
    With ``listings`` (a folder of the work area), the folder is scanned once, by the unit
    that splits it, and its units read their names from the listing written there.

    The stamps of a folder unit are ``{"roots": the folders it walked from, "folders": the
    stamp of every folder whose entries decided its files or its split}``
    (:func:`unchanged_folders`); None for zip, list and file units.
    """
    limit = limit or UNIT_FILES
    if unit.kind == "tree":
        files, zips, stamps = _walk([unit.path], exclude, limit)
        stamped = {"roots": [unit.path], "folders": stamps}
        if files is not None:
            return files, zips, stamped
        folders, paths = _entries(unit.path, exclude)
        if listings is not None:  # stamps[0], the folder's, was taken before this scan too
            _write_table(_listing_path(listings, unit.path), _listing_table(folders, paths, stamps[0]))
        zips = [Unit("zip", os.path.abspath(path)) for path in paths if _is_zip_name(path)]
        parts = [Unit("folders", unit.path, ALL)] if folders else []
        if len(zips) < len(paths):
            parts.append(Unit("files", unit.path, ALL))
        return [], [*parts, *zips], stamped
    if unit.kind == "folders":
        folders = _bucket(unit.path, unit.chunk, True, exclude, listings)[0]
        files, zips, stamps = _walk(folders, exclude, limit)
        stamped = {"roots": folders, "folders": stamps}
        if files is not None:
            return files, zips, stamped
        if len(folders) == 1 or _level_bucket(unit.chunk)[0] >= MAX_LEVEL:
            return [], [Unit("tree", folder) for folder in folders], stamped
        return [], _halves(unit), stamped
    if unit.kind == "files":
        paths, hashes, stamp = _bucket(unit.path, unit.chunk, False, exclude, listings)
        stamped = {"roots": [], "folders": [stamp]}
        plain = [not _is_zip_name(path) for path in paths]
        leaves = _file_buckets(unit, hashes[plain], limit)
        if leaves != [unit]:
            return [], leaves, stamped
        return [_source_file(path) for path, keep in zip(paths, plain, strict=True) if keep], [], stamped
    if unit.kind == "zip":
        members = list(index._iter_one_source(Path(unit.path), top_level=True))
        if unit.chunk < 0 and len(members) > limit:
            return [], [Unit("zip", unit.path, i) for i in _chunks(len(members), limit)], None
        return members[max(unit.chunk, 0) * limit :][:limit], [], None
    if unit.kind == "list":
        return (*_expand_list(unit, exclude, limit), None)
    return list(index._iter_one_source(Path(unit.path), top_level=True)), [], None


def unchanged_folders(unit: Unit, stamps: dict | None, exclude: Sequence[str], listings: Path | None) -> bool:
    """Whether the folders a unit listed its files from last time (``stamps``, from
    :func:`expand_stamped`) are as they were: the same roots, and every folder with the same
    modification time and inode. Adding, removing or renaming an entry changes its folder's
    time; rewriting a file in place does not, so a caller trusts this only where files are
    never rewritten in place (``--trust-folder-times``)."""
    if stamps is None:
        return False
    if (
        unit.kind == "folders"
        and _bucket(unit.path, unit.chunk, True, exclude, listings)[0] != stamps["roots"]
    ):
        return False
    return all(_stamp(stamp[0]) == stamp for stamp in stamps["folders"])


def _chunks(count: int, limit: int) -> range:
    return range(-(-count // limit))


def _expand_list(unit: Unit, exclude: Sequence[str], limit: int) -> tuple[list[index.SourceFile], list[Unit]]:
    """A path list: chunks of lines when long; a line naming a folder or list becomes a
    unit, a line naming a file or zip is indexed here."""
    lines = index.list_file_entries(Path(unit.path))
    if unit.chunk < 0 and len(lines) > limit:
        return [], [Unit("list", unit.path, i) for i in _chunks(len(lines), limit)]
    files, units = [], []
    for entry in lines[max(unit.chunk, 0) * limit :][:limit]:
        if _excluded(str(entry), exclude):
            continue
        nested = source_units([entry])[0]
        if nested.kind in ("tree", "list"):
            units.append(nested)
        else:
            files.extend(expand(nested, exclude, limit)[0])
    return files, units


# --- indexing a unit -----------------------------------------------------------------------


def listing_digest(files: Sequence[index.SourceFile], partitions: int) -> str:
    text = repr((SCHEMA_DIGEST, partitions, [(f.file_id, f.size, f.mtime_ns) for f in files]))
    return hashlib.sha256(text.encode()).hexdigest()


def _record_path(work: Path, unit: Unit) -> Path:
    return work / UNITS_DIR / f"{unit.name}.json"


def _fragment(work: Path, kind: str, partition: int, unit: Unit) -> Path:
    return work / part_folder(kind, partition) / f"{unit.name}.parquet"


def _read_record(work: Path, unit: Unit) -> tuple[UnitSummary | None, dict | None]:
    """The unit's record as written last (with the units it handed on, such as the zips
    in its folders), and the stamps of the folders it listed."""
    try:
        record = json.loads(_record_path(work, unit).read_bytes())
    except (OSError, ValueError):
        return None, None
    summary = UnitSummary(
        unit=unit,
        units=[Unit(**fields) for fields in record.get("units", [])],
        files=record["files"],
        listing=record["listing"],
        partitions={int(p): n for p, n in record["partitions"].items()},
        sop_partitions=record["sop_partitions"],
    )
    return summary, record.get("stamps")


def _previous_rows(work: Path, record: UnitSummary | None) -> dict[tuple[str, int, int], dict]:
    """Rows the unit wrote before, by (file_id, size, mtime_ns)."""
    if record is None:
        return {}
    rows = {}
    for partition in record.partitions:
        try:
            table = read_file(_fragment(work, INDEX_DIR, partition, record.unit))
        except OSError:
            continue
        for row in table.to_pylist():
            rows[(row["file_id"], row["size"], row["mtime_ns"])] = row
    return rows


def index_unit(
    unit: Unit, work: Path, partitions: int, exclude: Sequence[str] = (), trust_folder_times: bool = False
) -> UnitSummary:
    """Index one unit into the partitioned index under ``work`` (a Dask task).

    A unit that is too large returns the units it splits into and writes nothing. A unit
    listed as before returns its record; otherwise the rows of unchanged files are taken
    from its earlier fragments, the other files are parsed, and its fragments and record
    are replaced. With ``trust_folder_times``, a unit whose folders are unchanged
    (:func:`unchanged_folders`) returns its record without listing or stat'ing its files.
    """
    from hlip.ingest.pipeline import tune_allocator

    tune_allocator()
    work, listings = Path(work), Path(work) / LISTINGS_DIR
    record, stamps = _read_record(work, unit)
    if trust_folder_times and record is not None and unchanged_folders(unit, stamps, exclude, listings):
        return record
    files, units, now = expand_stamped(unit, exclude, listings=listings)
    listing = listing_digest(files, partitions)
    summary = UnitSummary(unit, units, len(files), 0, listing)
    if record is not None and record.listing == listing:
        summary.partitions, summary.sop_partitions = record.partitions, record.sop_partitions
        if now != stamps:
            _write_record(work, summary, now)
        return summary
    previous = _previous_rows(work, record)
    rows = []
    for source_file in dict.fromkeys(files):
        row = previous.get((source_file.file_id, source_file.size, source_file.mtime_ns))
        if row is None:
            row = index.index_file(source_file)
            summary.parsed += 1
        rows.append(row)
    _write_unit(work, summary, rows, partitions, record, now)
    return summary


def _write_unit(
    work: Path,
    summary: UnitSummary,
    rows: list[dict],
    partitions: int,
    record: UnitSummary | None,
    stamps: dict | None,
) -> None:
    """Write the unit's fragments, remove those it no longer has, then its record."""
    by_partition: dict[int, list[dict]] = {}
    sops: dict[int, list[dict]] = {}
    for row in rows:
        partition = row_partition(row, partitions)
        by_partition.setdefault(partition, []).append(row)
        if row.get("SOPInstanceUID") and not row.get("error"):
            sop = {"SOPInstanceUID": row["SOPInstanceUID"], "file_id": row["file_id"], "partition": partition}
            sops.setdefault(partition_of(row["SOPInstanceUID"], partitions), []).append(sop)
    for partition, part_rows in by_partition.items():
        table = index.rows_to_table(sorted(part_rows, key=lambda row: row["file_id"]))
        _write_table(_fragment(work, INDEX_DIR, partition, summary.unit), table)
    for partition, sop_rows in sops.items():
        table = pa.Table.from_pylist(sorted(sop_rows, key=lambda row: row["file_id"]), schema=SOP_SCHEMA)
        _write_table(_fragment(work, SOPS_DIR, partition, summary.unit), table)
    summary.partitions = {p: len(r) for p, r in sorted(by_partition.items())}
    summary.sop_partitions = sorted(sops)
    if record is not None:
        for partition in set(record.partitions) - set(summary.partitions):
            _fragment(work, INDEX_DIR, partition, summary.unit).unlink(missing_ok=True)
        for partition in set(record.sop_partitions) - set(summary.sop_partitions):
            _fragment(work, SOPS_DIR, partition, summary.unit).unlink(missing_ok=True)
    _write_record(work, summary, stamps)


def _write_record(work: Path, summary: UnitSummary, stamps: dict | None) -> None:
    fields = {
        "unit": asdict(summary.unit),
        "units": [asdict(unit) for unit in summary.units],
        "files": summary.files,
        "listing": summary.listing,
        "partitions": {str(p): n for p, n in summary.partitions.items()},
        "sop_partitions": summary.sop_partitions,
        "stamps": stamps,
    }
    write_bytes_atomic(_record_path(work, summary.unit), json.dumps(fields, sort_keys=True).encode())


def read_file(path: Path | pa.NativeFile, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file of the work folder (or its bytes), read as the single file it is:
    ``pq.read_table`` on a path first discovers a dataset, which costs more than reading a
    small fragment (about 2x per fragment), and a plan or accounting task reads dozens."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)


def _write_table(path: Path, table: pa.Table) -> None:
    write_bytes_atomic(path, parquet_bytes(table))


# --- reading partitions ----------------------------------------------------------------------


def read_partition(
    work: Path,
    partition: int,
    units: Iterable[Unit],
    columns: Sequence[str] | None = None,
    *,
    with_unit: bool = False,
) -> pa.Table:
    """The index rows of one partition from the fragments of ``units``, one row per file,
    sorted by ``file_id`` (a file that two sources name is indexed once); only ``columns``
    (which must include ``file_id``) when given; with ``with_unit``, a column ``unit``
    names the unit (:attr:`Unit.name`) each row was read from."""
    tables = []
    for unit in units:
        table = read_file(_fragment(Path(work), INDEX_DIR, partition, unit), columns=columns)
        tables.append(_with_unit(table, unit.name) if with_unit else table)
    if not tables:
        empty = index.rows_to_table([])
        empty = empty if columns is None else empty.select(list(columns))
        return _with_unit(empty, "") if with_unit else empty
    table = pa.concat_tables(tables).sort_by("file_id")
    file_ids = table["file_id"].to_pylist()
    first = [i for i, file_id in enumerate(file_ids) if i == 0 or file_id != file_ids[i - 1]]
    return table.take(first) if len(first) < len(file_ids) else table


def _with_unit(table: pa.Table, name: str) -> pa.Table:
    return table.append_column("unit", pa.array([name] * table.num_rows, pa.string()))


def find_duplicates(work: Path, sop_partition: int, listings: Sequence[tuple[Unit, str]]) -> list[int]:
    """Flag the instances of one SOP partition stored in more than one file: every file
    but the first by ``file_id`` (the rule :func:`hlip.ingest.plan.plan` applies within one
    table) goes to ``duplicates/part-NNNN/`` of its own index partition. Returns the index
    partitions that got flags (a Dask task).

    ``listings`` are the units with rows in the partition and their listing digests. The
    partition's rows are kept compacted in one table (``sops/all-NNNN.parquet``): a re-run
    reads it and the fragments of the units whose listing changed, not every unit's; when
    none changed, the flags written last time stand and nothing is read.
    """
    work = Path(work)
    record_path = work / DUPLICATES_DIR / f"sops-{sop_partition:04d}.json"
    compact_path = work / SOPS_DIR / f"all-{sop_partition:04d}.parquet"
    wanted = {unit.name: listing for unit, listing in listings}
    record = {"listings": {}, "partitions": []}
    if record_path.exists() and compact_path.exists():
        record = json.loads(record_path.read_bytes())
    if record["listings"] == wanted:
        return record["partitions"]
    kept = [name for name, listing in record["listings"].items() if wanted.get(name) == listing]
    tables = [read_file(compact_path).filter(pc.is_in(pc.field("unit"), pa.array(kept)))] if kept else []
    for unit, listing in listings:
        if record["listings"].get(unit.name) != listing:
            tables.append(_with_unit(read_file(_fragment(work, SOPS_DIR, sop_partition, unit)), unit.name))
    table = pa.concat_tables(tables).sort_by([("SOPInstanceUID", "ascending"), ("file_id", "ascending")])
    _write_table(compact_path, table)
    for partition in record["partitions"]:
        (work / part_folder(DUPLICATES_DIR, partition) / f"sops-{sop_partition:04d}.parquet").unlink(
            missing_ok=True
        )
    written = _flag_copies(work, sop_partition, table)
    write_bytes_atomic(record_path, json.dumps({"listings": wanted, "partitions": written}).encode())
    return written


def _flag_copies(work: Path, sop_partition: int, table: pa.Table) -> list[int]:
    """Write the flags of a SOP partition's rows (sorted by UID, then file); the index
    partitions flagged."""
    if table.num_rows > 1:  # the same file named by two sources is one file, not a copy
        same = pc.and_(_same_as_previous(table, "SOPInstanceUID"), _same_as_previous(table, "file_id"))
        table = table.filter(pc.invert(same))
    copies = (
        table.filter(_same_as_previous(table, "SOPInstanceUID")) if table.num_rows > 1 else table.slice(0, 0)
    )
    written = sorted(set(copies["partition"].to_pylist()))
    for partition in written:
        rows = copies.filter(pc.equal(copies["partition"], partition)).select(DUPLICATE_SCHEMA.names)
        _write_table(
            work / part_folder(DUPLICATES_DIR, partition) / f"sops-{sop_partition:04d}.parquet", rows
        )
    return written


def _same_as_previous(table: pa.Table, column: str) -> pa.Array:
    """Per row, whether ``column`` equals the previous row's (False for the first row)."""
    values = table[column].combine_chunks()
    same = pc.fill_null(pc.equal(values.slice(1), values.slice(0, len(values) - 1)), False)
    return pa.concat_arrays([pa.array([False]), same])


def read_duplicates(work: Path, partition: int) -> dict[str, str]:
    """``file_id -> SOPInstanceUID`` of the files of a partition flagged as duplicates."""
    folder = Path(work) / part_folder(DUPLICATES_DIR, partition)
    if not folder.is_dir():
        return {}
    table = pa.concat_tables([read_file(path) for path in sorted(folder.glob("*.parquet"))])
    return dict(zip(table["file_id"].to_pylist(), table["SOPInstanceUID"].to_pylist(), strict=True))


def iter_partitions(summaries: Iterable[UnitSummary]) -> Iterator[tuple[int, list[Unit]]]:
    """``(partition, units with rows in it)`` for every non-empty partition."""
    by_partition: dict[int, list[Unit]] = {}
    for summary in summaries:
        for partition in summary.partitions:
            by_partition.setdefault(partition, []).append(summary.unit)
    for partition in sorted(by_partition):
        yield partition, sorted(by_partition[partition])


# --- the report table ------------------------------------------------------------------------

REPORTS_DIR = "reports"
REPORT_SCHEMA = pa.schema([("key", pa.string()), ("text", pa.string()), ("labels", pa.string())])
REPORT_ROW_GROUP = 1024
"""Report rows per Parquet row group: rows are sorted by key, so a lookup of a few keys
reads the row groups whose key range holds them, not a partition's whole text."""
CHANGED_KEYS, CHANGED_RECORD = "changed.parquet", "changed.json"


def partition_reports(table: dict[str, reports.Report], work: Path, partitions: int) -> dict[int, str]:
    """Write a loaded report table as ``reports/part-NNNN.parquet`` by a hash of its key,
    replacing an earlier one; return the digest of each partition's rows (a re-run with
    another table replans the partitions whose rows changed).

    The keys whose rows differ from the table written before (added, changed or removed)
    go to ``reports/changed.parquet``, and ``changed.json`` names the digests of both
    tables: a plan made from the earlier table checks only the studies those keys find
    (:func:`changed_report_keys`), so a report table that grows every night does not make
    every study's rows be read again. The same table as last time is neither read back nor
    written again."""
    folder = Path(work) / REPORTS_DIR
    by_partition: dict[int, list[dict]] = {}
    for key, report in sorted(table.items()):
        row = {"key": key, "text": report.text, "labels": json.dumps(report.labels, sort_keys=True)}
        by_partition.setdefault(partition_of(key, partitions), []).append(row)
    digests = {
        partition: hashlib.sha256(repr(rows).encode()).hexdigest() for partition, rows in by_partition.items()
    }
    record_path = folder / CHANGED_RECORD
    earlier = json.loads(record_path.read_bytes())["to"] if record_path.exists() else None
    written = {str(p): d for p, d in sorted(digests.items())}
    if earlier == written:  # the table written whole last time (the record comes last): keep it,
        return digests  # and the record of the change that led to it
    before = _report_rows(folder)
    record_path.unlink(missing_ok=True)  # written last: a write stopped half-way leaves none
    now = {row["key"]: (row["text"], row["labels"]) for rows in by_partition.values() for row in rows}
    changed = sorted(key for key in now.keys() | before.keys() if now.get(key) != before.get(key))
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    for partition, rows in sorted(by_partition.items()):
        table_rows = pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)
        write_bytes_atomic(
            folder / f"part-{partition:04d}.parquet", parquet_bytes(table_rows, REPORT_ROW_GROUP)
        )
    _write_table(folder / CHANGED_KEYS, pa.table({"key": pa.array(changed, pa.string())}))
    write_bytes_atomic(record_path, json.dumps({"from": earlier, "to": written}, sort_keys=True).encode())
    return digests


def _report_rows(folder: Path) -> dict[str, tuple[str, str]]:
    """``key -> (text, labels)`` of the report table written last (empty if none)."""
    rows = {}
    for path in sorted(folder.glob("part-*.parquet")):
        table = read_file(path)
        texts = zip(table["text"].to_pylist(), table["labels"].to_pylist(), strict=True)
        rows.update(zip(table["key"].to_pylist(), texts, strict=True))
    return rows


def changed_report_keys(work: Path, since: dict[int, str], now: dict[int, str]) -> set[str] | None:
    """The report keys whose rows differ between two states of the report table, each given
    by the digests of the partitions that matter to the caller (the same partitions, "" for
    an empty one): ``since`` (what a plan was made from) and ``now``. None when the last
    write of the table did not go from the one to the other in those partitions (a run was
    stopped in between): the caller then checks every study."""
    if since == now:
        return set()
    folder = Path(work) / REPORTS_DIR
    record = json.loads((folder / CHANGED_RECORD).read_bytes()) if (folder / CHANGED_RECORD).exists() else {}
    if record.get("from") is None or since.keys() != now.keys():
        return None
    for state, digests in ((since, record["from"]), (now, record["to"])):
        if any(digests.get(str(partition), "") != digest for partition, digest in state.items()):
            return None
    return set(read_file(folder / CHANGED_KEYS)["key"].to_pylist())


def read_reports(work: Path, keys: Iterable[str], partitions: int) -> dict[str, reports.Report]:
    """The reports of ``keys`` from the partitioned table (keys without one are absent)."""
    wanted: dict[int, set[str]] = {}
    for key in keys:
        wanted.setdefault(partition_of(key, partitions), set()).add(key)
    found = {}
    for partition, part_keys in sorted(wanted.items()):
        path = Path(work) / REPORTS_DIR / f"part-{partition:04d}.parquet"
        if not path.exists():
            continue
        for row in pq.read_table(path, filters=[("key", "in", sorted(part_keys))]).to_pylist():
            found[row["key"]] = reports.Report(row["text"], json.loads(row["labels"]))
    return found
