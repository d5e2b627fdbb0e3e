"""The ingest pipeline: index -> plan -> build per study -> account -> finalize, on Dask.

Each stage is a library function usable alone, and each runs as tasks on the workers,
which share the work folder (:func:`ingest_dir`):

* :func:`index_archive` lists and parses the sources unit by unit into the partitioned
  index (:mod:`hlip.ingest.partitions`), reusing the rows of unchanged files;
  :func:`flag_duplicates` finds instances stored twice across the whole index;
* :func:`plan_partition` plans one index partition (:func:`hlip.ingest.plan.plan`) and
  writes a task file per study still to build;
* :func:`build_study` builds one study in memory (decode, resample, report, de-identify);
  :func:`stage_planned_study` does that on a worker and stages the encoded sample with
  :class:`~hlip.shards.writer.DatasetWriter`, returning a small :class:`StudyOutcome`;
* :func:`account_partition` gives every file of a partition exactly one outcome
  (``_ingest/files.parquet/part-NNNN.parquet``).

:func:`run_ingest` chains them; the client only submits tasks and sums counts, holding a
record per unit of the sources and per partition, never one per file. Tasks are per
study so a worker holds one study at a time, however large the archive; voxels never
travel back to the client. A re-run on the same output directory resumes: studies with
an outcome record (and, when staged, a staged sample) are skipped, and the shards are
written only at the end, atomically and in key order, so the bytes do not depend on
worker count, scheduling, partitioning or interruptions.

Everything under ``<out>/_ingest/`` may contain PHI (header index, file paths, the
secret); nothing else does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import pickle
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pydicom
from rich.progress import Progress

from hlip.ingest import deid, index, partitions, reports
from hlip.ingest.config import IngestConfig, settings_hash
from hlip.ingest.lock import ingest_lock
from hlip.ingest.nifti import (
    NiftiStudyPlan,
    NiftiTableSpec,
    build_nifti_study,
    plan_nifti_studies,
)
from hlip.ingest.plan import REASONS as PLAN_REASONS
from hlip.ingest.plan import PlanConfig, Reject, StudyPlan, plan
from hlip.ingest.volume import (
    ScanRejected,
    VolumeConfig,
    build_scan,
    check_decoded_size,
    default_study_voxels,
)
from hlip.shards import format as fmt
from hlip.shards import versions
from hlip.shards.format import Scan, Study
from hlip.shards.storage import Location, is_remote
from hlip.shards.writer import DatasetWriter, encode_study, parquet_bytes, write_bytes_atomic

INGEST_DIR = fmt.LOCAL_DIR
WORK_ENV = "HLIP_INGEST_WORK"
FILES_FILE = "files.parquet"
"""Per-file outcomes: a folder of one Parquet file per index partition (``pq.read_table``
reads it whole)."""
CONFIG_FILE = "config.json"
OUTCOMES_DIR = "outcomes"
PLAN_DIR = "plan"
TASKS_DIR = "tasks"

SCAN, REPORT, REJECTED = "scan", "report", "rejected"

PIPELINE_REASONS = {
    "no_report": "the study has no report (neither in the report table nor as a DICOM SR object)",
    "no_usable_scan": "no scan of the study could be built",
    "report_from_table": "an SR report object of a study whose report came from the report table",
    "unreadable_report": "an SR object whose text could not be read",
    "invalid_study": "the built study does not satisfy the shard format",
    "build_error": "building the scan failed with an unexpected error",
    "not_planned": "an indexed file the plan neither used nor rejected",
    "unreadable_nifti": "a volume of a NIfTI collection that could not be read as a 3-D scan",
    "resource_limit": "building the study killed its worker (out of memory or crashed) every time it was tried",
}
REASONS = {**PLAN_REASONS, **PIPELINE_REASONS}
"""Every reason code a file can be rejected with, and what it means."""

FILES_SCHEMA = pa.schema(
    [
        ("file_id", pa.string()),
        ("outcome", pa.string()),
        ("study_key", pa.string()),
        ("scan", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)

SECRET_CHECK = "hlip-ingest secret check"


@dataclass(frozen=True)
class FileOutcome:
    """The one outcome of one input file (a row of ``files.parquet``)."""

    file_id: str
    outcome: str
    study_key: str = ""
    scan: str = ""
    reason: str = ""
    message: str = ""


@dataclass
class StudyOutcome:
    """What a build task reports back: whether the study was staged, and its files' outcomes.

    ``inputs`` is the digest of what the study was built from (:func:`task_inputs`): a
    re-run rebuilds a study whose inputs changed (a late series, an amended report)."""

    key: str
    staged: bool
    files: list[FileOutcome]
    inputs: str = ""


@dataclass
class StudyTask:
    """Everything a worker needs to build one study; small enough to ship per task."""

    key: str
    plan: StudyPlan
    index_rows: pa.Table
    report: reports.Report | None = None


@dataclass
class IngestSummary:
    """Counts of a finished run, from ``files.parquet``, and the dataset version it
    committed (``version`` is None when the dataset was already up to date)."""

    out_dir: Path | str
    files: int
    studies_staged: int
    studies_rejected: int
    outcomes: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    version: int | None = None
    studies_added: int = 0
    studies_superseded: int = 0


# --- executing tasks: serially in-process, or on a Dask cluster ---------------------------


def default_workers(memory_per_worker: int = 2 << 30) -> int:
    """One worker per usable core, fewer when memory would drop below ``memory_per_worker``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return max(1, min(cores, pages * page_size // memory_per_worker))


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, memory_limit: str = "auto"):
    """Yield a Dask client: of the cluster at ``scheduler``, else of a new ``LocalCluster``
    (``workers`` processes of one thread each; default :func:`default_workers`).

    ``workers=0`` yields ``None``: tasks then run serially in this process, without Dask.
    Call this from code guarded by ``if __name__ == "__main__"`` (the CLI is): worker
    processes re-import the main module.
    """
    if workers == 0 and scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    cluster = LocalCluster(
        n_workers=workers or default_workers(),
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",
    )
    with cluster, Client(cluster) as client:
        yield client


KILLED_RETRIES = 2
"""Times a task without ``if_killed`` is submitted again after Dask's ``KilledWorker``."""


class TaskRunner:
    """Submit tasks and take their results as they finish.

    On a Dask client each call is one task and each result is released as soon as it is
    read; without a client each call runs here, when it is submitted. A task that kills
    every worker it runs on (Dask's ``KilledWorker``, after
    ``distributed.scheduler.allowed-failures`` retries) runs ``if_killed`` with the same
    arguments instead, as a task of its own, when that is given; without it the task is
    submitted again, up to :data:`KILLED_RETRIES` times, since Dask also counts a task
    queued on a worker that another task killed.
    """

    def __init__(self, client=None) -> None:
        self.client = client
        self.finished: deque = deque()
        self.futures: dict = {}
        if client is not None:
            from distributed import as_completed

            self.pending = as_completed()

    @property
    def outstanding(self) -> int:
        return len(self.futures) + len(self.finished)

    @property
    def workers(self) -> int:
        """Workers of the cluster (1 in-process)."""
        if self.client is None:
            return 1
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    def submit(self, tag: Any, function: Callable, *args: Any, if_killed: Callable | None = None) -> None:
        if self.client is None:
            self.finished.append((tag, function(*args)))
            return
        self._submit(tag, function, args, if_killed, 0)

    def _submit(
        self, tag: Any, function: Callable, args: tuple, if_killed: Callable | None, tries: int
    ) -> None:
        future = self.client.submit(function, *args, pure=False)
        self.futures[future] = (tag, function, args, if_killed, tries)
        self.pending.add(future)

    def next(self) -> tuple[Any, Any]:
        """``(tag, result)`` of the next task to finish (of those submitted)."""
        if self.finished:
            return self.finished.popleft()
        from distributed.scheduler import KilledWorker

        while True:
            future = next(self.pending)
            tag, function, args, if_killed, tries = self.futures.pop(future)
            try:
                result = future.result()
            except KilledWorker:
                if if_killed is not None:
                    self._submit(tag, if_killed, args, None, 0)
                elif tries < KILLED_RETRIES:
                    self._submit(tag, function, args, None, tries + 1)
                else:
                    raise
                continue
            future.release()
            return tag, result

    def drain(self) -> list:
        """The results of every outstanding task."""
        return [self.next()[1] for _ in range(self.outstanding)]


def ordered_map(client) -> Callable:
    """A ``map(function, *iterables)`` that runs each call as a task on ``client`` (the
    builtin ``map`` without one) and returns the results in order."""
    if client is None:
        return map

    def run(function: Callable, *iterables: Iterable) -> list:
        return client.gather(client.map(function, *iterables, pure=False))

    return run


ALLOCATOR_THRESHOLD = 32 << 20
"""glibc's mmap and trim thresholds in processes that run ingest tasks (32 MiB, its
largest mmap threshold)."""


@functools.cache
def tune_allocator() -> bool:
    """Let glibc reuse freed memory for the large temporary arrays of a build.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's
    mmap threshold at 128 KiB: then every array above that is a fresh mapping whose pages
    fault in one by one, and an ingest worker spent as much time in the kernel as in its
    own code. Memory freed above the thresholds still goes back to the system. Returns
    whether the settings took (False off glibc); runs once per process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, ALLOCATOR_THRESHOLD)
        and libc.mallopt(m_trim_threshold, ALLOCATOR_THRESHOLD)
    )


# --- index -----------------------------------------------------------------------------


def index_archive(
    sources: Iterable[str | os.PathLike],
    work: Path,
    partition_count: int,
    runner: TaskRunner,
    progress: Progress | None = None,
    exclude: Iterable[str | os.PathLike] = (),
    trust_folder_times: bool = False,
) -> list[partitions.UnitSummary]:
    """Index every file under ``sources`` (headers only) into the partitioned index under
    ``work`` (:mod:`hlip.ingest.partitions`); return one summary per unit.

    Each unit is a task; a task that splits its unit hands back the new units, which are
    submitted at once, so listing a large archive is spread over the workers and overlaps
    with parsing it. Files under ``exclude`` (the output, when it lies inside a source)
    are not inputs. Unchanged units are not parsed again; with ``trust_folder_times``,
    units whose folders are unchanged are not even listed
    (:func:`hlip.ingest.partitions.unchanged_folders`).
    """
    progress = progress or Progress(disable=True)
    excluded = [os.path.abspath(folder) for folder in exclude]
    bar = progress.add_task("index", total=0)
    summaries, files, known = [], 0, 0
    for unit in partitions.source_units(sources):
        runner.submit(
            "unit", partitions.index_unit, unit, work, partition_count, excluded, trust_folder_times
        )
        known += 1
    while runner.outstanding:
        _, summary = runner.next()
        summaries.append(summary)
        for unit in summary.units:
            runner.submit(
                "unit", partitions.index_unit, unit, work, partition_count, excluded, trust_folder_times
            )
        known, files = known + len(summary.units), files + summary.files
        progress.update(bar, total=known, completed=len(summaries), description=f"index ({files} files)")
    return summaries


def flag_duplicates(work: Path, summaries: Iterable[partitions.UnitSummary], runner: TaskRunner) -> None:
    """Find the instances stored in more than one file across the whole index, one task per
    SOP partition whose units' listings changed (:func:`hlip.ingest.partitions.find_duplicates`)."""
    by_sop_partition: dict[int, list[partitions.UnitSummary]] = {}
    for summary in summaries:
        for sop_partition in summary.sop_partitions:
            by_sop_partition.setdefault(sop_partition, []).append(summary)
    for sop_partition, part in sorted(by_sop_partition.items()):
        listings = sorted((summary.unit, summary.listing) for summary in part)
        runner.submit("duplicates", partitions.find_duplicates, work, sop_partition, listings)
    runner.drain()


def index_digest(summaries: Iterable[partitions.UnitSummary]) -> str:
    """Digest of what the index listed: every unit's files with their sizes and times."""
    listings = sorted((summary.unit, summary.listing) for summary in summaries if summary.files)
    return hashlib.sha256(repr(listings).encode()).hexdigest()


# --- build one study ---------------------------------------------------------------------


def plan_config(config: IngestConfig) -> PlanConfig:
    return PlanConfig(min_slices=config.min_slices)


def volume_config(config: IngestConfig) -> VolumeConfig:
    return VolumeConfig(target_spacing=dict(config.target_spacing))


def study_voxel_budget(config: IngestConfig) -> int:
    """``config.max_study_voxels``, else what this worker's memory holds: the Dask worker's
    memory limit when it has one, else the machine's physical memory."""
    if config.max_study_voxels is not None:
        return config.max_study_voxels
    return default_study_voxels(worker_memory_bytes())


def worker_memory_bytes() -> int:
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):  # not in a Dask worker
        limit = None
    return int(limit) if limit else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _rejected(file_ids: Iterable[str], key: str, reason: str, message: str) -> list[FileOutcome]:
    return [FileOutcome(file_id, REJECTED, key, "", reason, message) for file_id in file_ids]


def _study_files(study_plan: StudyPlan) -> list[str]:
    """Every file of a study once (a multi-frame file may feed several scans)."""
    scan_files = (file_id for scan in study_plan.scans for file_id in scan.files)
    return list(dict.fromkeys([*scan_files, *study_plan.report_files]))


def _read_dataset(file_id: str) -> pydicom.Dataset:
    with index.open_source(*index.split_file_id(file_id)) as source:
        return pydicom.dcmread(source, force=True)


def _report_text(task: StudyTask) -> tuple[str, dict, list[FileOutcome]]:
    """The study's report text and labels, and the outcomes of its SR files.

    Labels come from the report table (which never takes identifiers or PHI columns as
    labels). Its text wins over SR objects in the study (a table is what a site exports on
    purpose); the SR files then are accounted as ``report_from_table``. An empty table
    cell falls back to the SR objects.
    """
    table = task.report or reports.Report("")
    if table.text.strip():
        message = "the report table holds this study's report"
        return (
            table.text,
            dict(table.labels),
            _rejected(task.plan.report_files, task.key, "report_from_table", message),
        )
    texts, outcomes = [], []
    for file_id in task.plan.report_files:
        try:
            texts.append(reports.sr_text(_read_dataset(file_id)).strip())
        except Exception as error:  # noqa: BLE001 - one unreadable SR must not stop the study
            outcomes += _rejected(
                [file_id], task.key, "unreadable_report", f"{type(error).__name__}: {error}"
            )
            continue
        outcomes.append(FileOutcome(file_id, REPORT, task.key))
    return "\n\n".join(text for text in texts if text), dict(table.labels), outcomes


def _build_scans(
    task: StudyTask, rows: dict[str, dict], config: IngestConfig
) -> tuple[list[Scan], list[FileOutcome]]:
    """Build every planned scan; a refused scan's files are rejected with its reason.

    A file can feed several scans (an enhanced multi-frame object holding two echoes): it
    is a ``scan`` file, naming every built scan it feeds, if any of them was built.
    """
    scans, used, refused = [], {}, {}
    volume = volume_config(config)
    for scan_plan in task.plan.scans:
        try:
            scans.append(build_scan(scan_plan, rows, volume))
        except ScanRejected as rejected:
            reason = (rejected.reason, rejected.message)
        except Exception as error:  # noqa: BLE001 - an uncurated archive must not stop the run
            reason = ("build_error", f"{type(error).__name__}: {error}")
        else:
            for file_id in scan_plan.files:
                used.setdefault(file_id, []).append(scan_plan.name)
            continue
        for file_id in scan_plan.files:
            refused.setdefault(file_id, reason)
    outcomes = [FileOutcome(file_id, SCAN, task.key, ",".join(names)) for file_id, names in used.items()]
    outcomes += [
        FileOutcome(file_id, REJECTED, task.key, "", *reason)
        for file_id, reason in refused.items()
        if file_id not in used
    ]
    return scans, outcomes


def build_study(task: StudyTask, config: IngestConfig) -> tuple[Study | None, list[FileOutcome]]:
    """Build one study in memory; ``None`` when it is rejected. Every file of the study
    gets its outcome. The report and the series descriptions (free text an operator
    typed) are scrubbed of the study's header PHI values, and only allow-listed header
    fields reach ``Study.meta``."""
    text, labels, report_outcomes = _report_text(task)
    if not text and not config.allow_missing_report:
        message = "no report in the report table and no SR text in the study"
        return None, _rejected(_study_files(task.plan), task.key, "no_report", message)
    rows = {row["file_id"]: row for row in task.index_rows.to_pylist()}
    try:
        check_decoded_size(task.plan.scans, rows, study_voxel_budget(config))
    except ScanRejected as rejected:
        return None, _rejected(_study_files(task.plan), task.key, rejected.reason, rejected.message)
    scans, scan_outcomes = _build_scans(task, rows, config)
    if not scans:
        message = "every scan of the study was rejected"
        return None, scan_outcomes + _rejected(task.plan.report_files, task.key, "no_usable_scan", message)
    phi = deid.phi_values(rows.values())
    for scan in scans:
        scan.series_description = deid.scrub_report(scan.series_description, phi)
    meta = deid.allowed_meta(rows[task.plan.scans[0].files[0]])
    study = Study(
        key=task.key,
        modality=task.plan.modality,
        scans=scans,
        report=deid.scrub_report(text, phi),
        labels=labels,
        body_part=meta.get("BodyPartExamined", ""),
        meta=meta,
        config_hash=config.config_hash(),
    )
    return study, scan_outcomes + report_outcomes


def ingest_dir(out_dir: str | os.PathLike) -> Path:
    """The ``_ingest/`` folder of an output: inside a local output directory; for an
    object-store output, on this machine's disk under ``$HLIP_INGEST_WORK``
    (default ``~/.cache/hlip/ingest``), one folder per output URL, so that the index and the
    secret (PHI) never go to the bucket."""
    if not is_remote(out_dir):
        return Path(out_dir) / INGEST_DIR
    base = Path(os.environ.get(WORK_ENV, Path.home() / ".cache" / "hlip" / "ingest")).expanduser()
    return base / hashlib.sha256(os.fspath(out_dir).encode()).hexdigest()[:16] / INGEST_DIR


def _outcome_path(out_dir: str | os.PathLike, key: str) -> Path:
    return ingest_dir(out_dir) / OUTCOMES_DIR / f"{key}.json"


def _write_outcome(out_dir: str | os.PathLike, outcome: StudyOutcome) -> None:
    record = {
        "key": outcome.key,
        "staged": outcome.staged,
        "files": [asdict(f) for f in outcome.files],
        "inputs": outcome.inputs,
    }
    path = _outcome_path(out_dir, outcome.key)
    write_bytes_atomic(path, json.dumps(record, sort_keys=True).encode())


def read_outcome(out_dir: str | os.PathLike, key: str) -> StudyOutcome | None:
    """The recorded outcome of a study, or None when it has not finished."""
    path = _outcome_path(out_dir, key)
    if not path.exists():
        return None
    record = json.loads(path.read_bytes())
    files = [FileOutcome(**f) for f in record["files"]]
    return StudyOutcome(record["key"], record["staged"], files, record.get("inputs", ""))


def task_inputs(task: StudyTask | tuple[str, NiftiStudyPlan]) -> str:
    """Digest of what a study is built from: its plan (which files make which scans), the
    size of each of its files and its report-table row. (The settings are fixed per
    output directory by :func:`_check_config`.) Dataclass reprs are exact and about ten
    times cheaper than ``asdict``: an unchanged re-run digests every study."""
    if isinstance(task, StudyTask):
        sizes = sorted(
            zip(task.index_rows["file_id"].to_pylist(), task.index_rows["size"].to_pylist(), strict=True)
        )
        text = repr((task.plan, sizes, task.report))
    else:
        text = repr(task[1])
    return hashlib.sha256(text.encode()).hexdigest()


def stage_study(task: StudyTask, out_dir: str | os.PathLike, config: IngestConfig) -> StudyOutcome:
    """Build a study and stage its sample in ``out_dir``; return the small outcome record.

    The outcome record is written before the sample is staged, so a study counts as done
    only once both exist (:func:`pending_tasks`); a run killed in between rebuilds it.
    """
    tune_allocator()
    study, files = build_study(task, config)
    members = None
    if study is not None:
        try:
            members = encode_study(study, codec=config.codec)
        except ValueError as error:
            members, files = None, _rejected(_study_files(task.plan), task.key, "invalid_study", str(error))
    outcome = StudyOutcome(task.key, members is not None, files, task_inputs(task))
    return _record_and_stage(out_dir, outcome, members)


KILLED_MESSAGE = "the study's task killed its worker on every try (memory limit or a crash in a decoder)"


def reject_killing_study(
    task: StudyTask | tuple[str, NiftiStudyPlan], out_dir: str | os.PathLike, *_: Any
) -> StudyOutcome:
    """Record a study whose task kept killing its worker: every file of it is a
    ``resource_limit`` reject, so the rest of the archive goes on and a re-run with the
    same inputs does not try it again."""
    if isinstance(task, StudyTask):
        key, files = task.key, _study_files(task.plan)
    else:
        key, files = task[0], [str(volume.path) for volume in task[1].volumes]
    outcome = StudyOutcome(
        key, False, _rejected(files, key, "resource_limit", KILLED_MESSAGE), task_inputs(task)
    )
    return _record_and_stage(out_dir, outcome, None)


def _record_and_stage(
    out_dir: str | os.PathLike, outcome: StudyOutcome, members: dict[str, bytes] | None
) -> StudyOutcome:
    """Write the outcome record, then stage the sample (when there is one)."""
    _write_outcome(out_dir, outcome)
    if members is not None:
        writer = DatasetWriter(out_dir)
        if not writer.has(outcome.key):
            writer.add_encoded(outcome.key, members)
    return outcome


# --- the run -----------------------------------------------------------------------------


def report_key(study_plan: StudyPlan, config: IngestConfig) -> str:
    """The value that finds a study's row in the report table."""
    if config.report_key_column == "StudyInstanceUID":
        return study_plan.study_uid
    return study_plan.accession_number


def study_tasks(
    study_plans: Sequence[StudyPlan],
    index_table: pa.Table,
    report_table: dict,
    config: IngestConfig,
    secret: bytes,
) -> list[StudyTask]:
    """One task per planned study, with only its own index rows and its table report."""
    position = {file_id: i for i, file_id in enumerate(index_table.column("file_id").to_pylist())}
    tasks = []
    for study_plan in study_plans:
        rows = index_table.take(sorted(position[file_id] for file_id in _study_files(study_plan)))
        report = report_table.get(report_key(study_plan, config))
        tasks.append(StudyTask(deid.study_key(study_plan.study_uid, secret), study_plan, rows, report))
    return tasks


def committed_keys(out_dir: Path, keys: Sequence[str]) -> set[str]:
    """Those of ``keys`` whose studies are in the latest committed version at ``out_dir``:
    the key column of its manifest fragments only (a version holds every key any of its
    fragments names), not its tables."""
    location = Location(out_dir)
    history = versions.list_versions(location)
    if not history or not keys:
        return set()
    wanted, found = pa.array(sorted(set(keys)), pa.string()), set()
    for name in history[-1].manifests:
        column = versions.read_parquet(location, name, columns=["key"])["key"]
        found.update(column.filter(pc.is_in(column, value_set=wanted)).to_pylist())
    return found


def pending_tasks(tasks: Sequence, keys: Sequence[str], out_dir: Path) -> tuple[list, list[StudyOutcome]]:
    """Split tasks (of studies ``keys``) into those still to build and the outcomes of
    those already done.

    A study is done when its outcome is recorded from the same inputs (:func:`task_inputs`)
    and, if it was staged, its sample is in the staging area or in the dataset's latest
    version. A new study, or one whose inputs changed, is built again: the next version
    adds or supersedes it. (An outcome recorded before inputs were digested counts as
    unchanged.)
    """
    committed, writer = committed_keys(out_dir, keys), DatasetWriter(out_dir)
    todo, done = [], []
    for task, key in zip(tasks, keys, strict=True):
        outcome = read_outcome(out_dir, key)
        unchanged = outcome is not None and outcome.inputs in ("", task_inputs(task))
        if unchanged and (not outcome.staged or key in committed or writer.has(key)):
            done.append(outcome)
        else:
            todo.append(task)
    return todo, done


def account(index_table: pa.Table, rejects: Iterable, outcomes: Iterable[StudyOutcome]) -> pa.Table:
    """``files.parquet``: exactly one outcome per indexed file, sorted by ``file_id``.

    Raises ValueError when a file would get two outcomes or an outcome names a file that
    is not indexed (both are bugs); indexed files nobody claimed are ``not_planned``.
    """
    by_file: dict[str, FileOutcome] = {}

    def claim(outcome: FileOutcome) -> None:
        if outcome.file_id in by_file:
            raise ValueError(
                f"file {outcome.file_id!r} has two outcomes: {by_file[outcome.file_id]} and {outcome}"
            )
        by_file[outcome.file_id] = outcome

    for reject in rejects:
        claim(FileOutcome(reject.file_id, REJECTED, "", "", reject.reason, reject.message))
    for study_outcome in outcomes:
        for file_outcome in study_outcome.files:
            claim(file_outcome)
    indexed = set(index_table.column("file_id").to_pylist())
    unknown = sorted(set(by_file) - indexed)
    if unknown:
        raise ValueError(f"{len(unknown)} outcomes name files that are not indexed, e.g. {unknown[0]!r}")
    for file_id in sorted(indexed - set(by_file)):
        claim(FileOutcome(file_id, REJECTED, "", "", "not_planned", "no scan, report or reject of the plan"))
    ordered = [by_file[file_id] for file_id in sorted(by_file)]  # by columns: asdict per row is slow
    columns = {name: [getattr(outcome, name) for outcome in ordered] for name in FILES_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=FILES_SCHEMA)


def summarize(files: pa.Table, out_dir: Path | str) -> IngestSummary:
    """Counts by outcome and by reject reason, and studies staged vs. wholly rejected."""
    rows = files.select(["outcome", "study_key", "reason"]).to_pylist()
    staged = {row["study_key"] for row in rows if row["outcome"] != REJECTED}
    seen = {row["study_key"] for row in rows if row["study_key"]}
    return IngestSummary(
        out_dir=out_dir,
        files=len(rows),
        studies_staged=len(staged),
        studies_rejected=len(seen - staged),
        outcomes=dict(sorted(Counter(row["outcome"] for row in rows).items())),
        reasons=dict(Counter(row["reason"] for row in rows if row["reason"]).most_common()),
    )


def combine(summaries: Iterable[IngestSummary], out_dir: Path | str, version=None) -> IngestSummary:
    """One summary of a run from the summaries of its partitions (each study lies in one)."""
    total = IngestSummary(out_dir=out_dir, files=0, studies_staged=0, studies_rejected=0)
    outcomes, reasons = Counter(), Counter()
    for part in summaries:
        total.files += part.files
        total.studies_staged += part.studies_staged
        total.studies_rejected += part.studies_rejected
        outcomes.update(part.outcomes)
        reasons.update(part.reasons)
    total.outcomes = dict(sorted(outcomes.items()))
    total.reasons = dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
    if version is not None:
        total.version, total.studies_added, total.studies_superseded = (
            version.number,
            version.added,
            version.superseded,
        )
    return total


def _check_config(ingest_dir: Path, settings: dict, secret: bytes) -> None:
    """Record the settings of a run, or refuse to resume with different ones.

    The secret is recorded only as a keyed hash of a constant, enough to refuse a resumed
    run whose other secret would give every study a second key.
    """
    path = ingest_dir / CONFIG_FILE
    fields = {**settings, "secret_check": deid.study_key(SECRET_CHECK, secret)}
    if path.exists():
        recorded, wanted = json.loads(path.read_text()), json.loads(json.dumps(fields))
        recorded.setdefault("codec", fmt.DEFAULT_CODEC)  # recorded before the codec was a setting
        differ = sorted(
            name for name in recorded.keys() | wanted.keys() if recorded.get(name) != wanted.get(name)
        )
        if differ:
            raise ValueError(
                f"{ingest_dir.parent} was ingested with another {', '.join(differ)}; use a new --out"
            )
        return
    write_bytes_atomic(path, json.dumps(fields, sort_keys=True, indent=1).encode())


def holds_out_lock(function: Callable) -> Callable:
    """Run an ingest ``function(sources, out_dir, ...)`` holding the lock on ``out_dir``
    (:mod:`hlip.ingest.lock`): a second ingest into the same output is refused."""

    @functools.wraps(function)
    def run(sources, out_dir, *args, **kwargs):
        with ingest_lock(out_dir):
            return function(sources, out_dir, *args, **kwargs)

    return run


@holds_out_lock
def run_ingest(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: IngestConfig | None = None,
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    memory_limit: str = "auto",
    client=None,
    progress: Progress | None = None,
) -> IngestSummary:
    """Ingest DICOM ``sources`` into a shard dataset at ``out_dir``; resume or grow it if
    it exists.

    Every stage runs as tasks on the workers, which read and write the work folder
    (:func:`ingest_dir`): the partitioned index (:func:`index_archive`), duplicates
    across the index (:func:`flag_duplicates`), one plan task per index partition
    (:func:`plan_partition`), one build task per study (:func:`stage_planned_study`), one
    accounting task per partition (:func:`account_partition`), one task per shard. The
    client holds a record per unit of the sources and per partition, and the studies of
    the few partitions being built; nothing per file.

    ``client`` (a Dask client) wins over ``scheduler`` (address of a running cluster),
    which wins over a new ``LocalCluster`` of ``workers`` processes; ``workers=0`` runs
    everything in this process. ``progress`` shows a bar per stage.
    """
    config = config or IngestConfig()
    progress = progress or Progress(disable=True)
    out = out_dir if is_remote(out_dir) else Path(out_dir)
    work = ingest_dir(out)
    with _client(client, scheduler, workers, memory_limit) as client:
        runner = TaskRunner(client)
        # First, on a worker: a table refused leaves no half-made --out behind.
        runner.submit("reports", partition_report_table, config, work)
        report_digests = runner.next()[1]
        out, secret = _prepare(out, config.secret, config.resume_fields())
        exclude = [work] if is_remote(out) else [out, work]
        summaries = index_archive(
            sources, work, config.index_partitions, runner, progress, exclude, config.trust_folder_times
        )
        digest = hashlib.sha256(repr((index_digest(summaries), report_digests)).encode()).hexdigest()
        if (unchanged := unchanged_run(out, digest)) is not None:
            return unchanged
        flag_duplicates(work, summaries, runner)
        inputs = plan_inputs(summaries, report_digests, config)
        del summaries
        _remove_stale_files(work, {part.partition for part in inputs})
        parts = _plan_build_account(runner, progress, work, out, config, secret, inputs)
        version = DatasetWriter(out, max_shard_bytes=config.max_shard_bytes).finalize(ordered_map(client))
        return _record_run(out, combine(parts, out, version), digest)


def partition_report_table(config: IngestConfig, work: Path) -> dict[int, str]:
    """Read the run's report table (a task: the client never holds it) and write it
    partitioned into ``work`` (:func:`hlip.ingest.partitions.partition_reports`); the
    digest of each partition. A refused table raises before anything is written."""
    table = {}
    if config.report_table:
        table = reports.load_report_table(
            config.report_table,
            config.report_key_column,
            config.report_text_columns,
            config.label_columns,
            config.label_prefixes,
        )
    return partitions.partition_reports(table, work, config.index_partitions)


def _plan_build_account(
    runner: TaskRunner,
    progress: Progress,
    work: Path,
    out: str | Path,
    config: IngestConfig,
    secret: bytes,
    inputs: list[PartitionInputs],
) -> list[IngestSummary]:
    """Plan each partition, build its studies, then account for its files.

    A partition is planned only while fewer than a few tasks per worker are waiting, so the
    client holds the keys of a bounded number of studies whatever the archive's size. A
    partition is accounted for as soon as its last study is built.
    """
    window = 4 * runner.workers
    queue = deque(inputs)
    units = {part.partition: part.units for part in inputs}
    left: dict[int, int] = {}
    planning, results = 0, []
    bars = {name: progress.add_task(name, total=0) for name in ("plan", "build", "account")}
    progress.update(bars["plan"], total=len(queue))
    progress.update(bars["account"], total=len(queue))

    def plan_more() -> None:
        nonlocal planning
        while queue and planning < runner.workers and sum(left.values()) < window:
            part = queue.popleft()
            runner.submit(("plan", part.partition), plan_partition, part, work, out, config, secret)
            planning += 1

    def account(partition: int) -> None:
        del left[partition]
        runner.submit(("account", partition), account_partition, partition, units[partition], work, out)

    plan_more()
    while runner.outstanding:
        (stage, partition), result = runner.next()
        if stage == "plan":
            planning -= 1
            progress.advance(bars["plan"])
            progress.update(bars["build"], total=progress.tasks[bars["build"]].total + result.studies)
            progress.advance(bars["build"], result.studies - len(result.todo))
            if result.accounted is not None:  # unchanged since it was last accounted for
                progress.advance(bars["account"])
                results.append(result.accounted)
                plan_more()
                continue
            left[partition] = len(result.todo)
            for key in result.todo:
                runner.submit(
                    ("study", partition), stage_planned_study, key, work, out, config,
                    if_killed=reject_killing_planned,
                )  # fmt: skip
            if not result.todo:
                account(partition)
        elif stage == "study":
            progress.advance(bars["build"])
            left[partition] -= 1
            if not left[partition]:
                account(partition)
        else:
            progress.advance(bars["account"])
            results.append(result)
        plan_more()
    return results


@dataclass
class PartitionPlan:
    """What a plan task reports: the keys of the partition's studies still to build
    (largest first) and how many studies it planned."""

    partition: int
    todo: list[str]
    studies: int
    accounted: IngestSummary | None = None
    """The partition's counts, when nothing in it changed since it was last accounted for."""


def _plan_files(work: Path, partition: int) -> tuple[Path, Path, Path]:
    """The partition's plan being built, its plan as last accounted for, and the record of
    that accounting."""
    name = f"part-{partition:04d}"
    folder = work / PLAN_DIR
    return folder / f"{name}.pending.pickle", folder / f"{name}.pickle", folder / f"{name}.done.json"


@dataclass
class StudyGroup:
    """The plan of the files of one StudyInstanceUID (or of one unreadable file): the
    digest of what it was planned from, its study keys and its rejects. Its studies'
    outcomes are not kept here: once accounted for they are in the partition's
    ``files.parquet`` part, which a later accounting keeps for the groups not planned
    again, so the plan record holds no per-file outcome to read and rewrite."""

    digest: str
    keys: list[str]
    rejects: list[Reject]
    units: list[str] | None = None
    """The units (:attr:`~hlip.ingest.partitions.Unit.name`) holding the group's rows."""
    names: list[str] | None = None
    """Its StudyInstanceUID and accession numbers: the keys its report rows may have."""
    files: list[str] | None = None
    """The ids of its files: what an accounting replaces when the group is planned again."""


GROUP_COLUMNS = ["file_id", "error", "StudyInstanceUID"]


def _row_groups(rows: pa.Table) -> list[str]:
    """Per row, the unit the plan decides alone: a study (its StudyInstanceUID), or one
    unreadable file. (Instances stored twice are flagged beforehand, over the whole index,
    so no plan rule looks across studies.)"""
    columns = zip(*(rows[name].to_pylist() for name in GROUP_COLUMNS), strict=True)
    return [
        f"file:{file_id}" if error else f"study:{study_uid or ''}" for file_id, error, study_uid in columns
    ]


def _group_rows(rows: pa.Table) -> dict[str, list[int]]:
    """Row positions by :func:`_row_groups`."""
    groups: dict[str, list[int]] = {}
    for position, name in enumerate(_row_groups(rows)):
        groups.setdefault(name, []).append(position)
    return groups


def _group_names(rows: pa.Table) -> list[str]:
    """The keys by which report rows find a group's files: UIDs and accession numbers."""
    names = set(rows["StudyInstanceUID"].to_pylist()) | set(rows["AccessionNumber"].to_pylist())
    return sorted(name for name in names if name)


def _group_digest(rows: pa.Table, names: list[str], duplicates: dict[str, str], table_reports: dict) -> str:
    """What a group's plan and tasks are made from: its files (id, size, time), their
    duplicate flags, and the report-table rows its UID or accession numbers (``names``) find."""
    files = sorted(zip(*(rows[c].to_pylist() for c in ("file_id", "size", "mtime_ns")), strict=True))
    found = [(name, table_reports[name]) for name in names if name in table_reports]
    flags = [duplicates.get(file_id) for file_id, _, _ in files]
    return hashlib.sha256(repr((files, flags, found)).encode()).hexdigest()


@dataclass(frozen=True)
class PartitionInputs:
    """What a partition is planned from, as far as the client knows it: the units with
    rows in it and their listing digests, and the digests of the report-table partitions
    its studies' reports can lie in (its own when the table is keyed by StudyInstanceUID,
    else all; "" for an empty one)."""

    partition: int
    listings: tuple[tuple[partitions.Unit, str], ...]
    reports: dict[int, str]

    @property
    def units(self) -> list[partitions.Unit]:
        return [unit for unit, _ in self.listings]

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr((self.listings, sorted(self.reports.items()))).encode()).hexdigest()


def plan_inputs(
    summaries: Sequence[partitions.UnitSummary], report_digests: dict[int, str], config: IngestConfig
) -> list[PartitionInputs]:
    """The :class:`PartitionInputs` of every partition with rows, by partition."""
    listing = {summary.unit: summary.listing for summary in summaries}
    by_uid = config.report_key_column == "StudyInstanceUID"
    every = range(config.index_partitions)
    return [
        PartitionInputs(
            partition,
            tuple((unit, listing[unit]) for unit in units),
            {p: report_digests.get(p, "") for p in ([partition] if by_uid else every)},
        )
        for partition, units in partitions.iter_partitions(summaries)
    ]


def _task_path(work: Path, key: str) -> Path:
    return work / TASKS_DIR / f"{fmt.check_key(key)}.pickle"


def plan_partition(
    inputs: PartitionInputs, work: Path, out: str | Path, config: IngestConfig, secret: bytes
) -> PartitionPlan:
    """Plan one index partition (a Dask task): its plan (study keys and rejects, by study)
    goes to ``plan/``, and each study still to build gets its task file in ``tasks/`` (its
    plan, index rows and report), which its build task reads.

    Work is done only where inputs changed since the partition was last accounted for: a
    partition whose inputs (:class:`PartitionInputs` and its duplicate flags) are unchanged
    is not read at all; in another, only the rows of the studies that may have changed are
    read (:func:`_groups_to_replan`), and only those whose files, flags or report rows did
    change are planned again, so growing a dataset costs what the new studies cost, not
    what the partitions they fall in hold."""
    tune_allocator()
    partition = inputs.partition
    duplicates = partitions.read_duplicates(work, partition)
    digest = hashlib.sha256(repr((inputs.digest, sorted(duplicates.items()))).encode()).hexdigest()
    pending_path, accounted_path, done_path = _plan_files(work, partition)
    if done_path.exists() and (work / FILES_FILE / f"part-{partition:04d}.parquet").exists():
        done = json.loads(done_path.read_bytes())
        if done["inputs"] == digest:
            accounted = IngestSummary(out_dir=out, **done["counts"])
            studies = accounted.studies_staged + accounted.studies_rejected
            return PartitionPlan(partition, [], studies, accounted)
    done_path.unlink(missing_ok=True)
    previous = pickle.loads(accounted_path.read_bytes()) if accounted_path.exists() else {"groups": {}}
    touched, units = _groups_to_replan(inputs, previous, duplicates, work)
    rows = partitions.read_partition(work, partition, units, with_unit=True)
    if touched is not None:
        rows = rows.filter(pa.array([name in touched for name in _row_groups(rows)], pa.bool_()))
    table_reports = partitions.read_reports(work, _group_names(rows), config.index_partitions)
    groups = {
        name: group
        for name, group in previous["groups"].items()
        if touched is not None and name not in touched
    }
    changed = []
    for name, positions in _group_rows(rows).items():
        group_rows = rows.take(pa.array(positions, pa.int64()))
        names = _group_names(group_rows)
        group = StudyGroup(_group_digest(group_rows, names, duplicates, table_reports), [], [])
        if name in previous["groups"] and previous["groups"][name].digest == group.digest:
            group = previous["groups"][name]
        else:
            changed.append(positions)
        groups[name] = replace(
            group,
            units=sorted(set(group_rows["unit"].to_pylist())),
            names=names,
            files=group_rows["file_id"].to_pylist(),
        )
    positions = pa.array(sorted(p for part in changed for p in part), pa.int64())
    todo = _plan_changed(rows.take(positions).drop_columns(["unit"]), groups, duplicates,
                         table_reports, work, out, config, secret)  # fmt: skip
    plan_record = {
        "inputs": digest,
        "groups": groups,
        "listings": {unit.name: listing for unit, listing in inputs.listings},
        "reports": inputs.reports,
        "duplicates": duplicates,
        "reaccount": _reaccount(touched, previous),
    }
    write_bytes_atomic(pending_path, pickle.dumps(plan_record, protocol=pickle.HIGHEST_PROTOCOL))
    return PartitionPlan(partition, todo, sum(len(group.keys) for group in groups.values()))


def _reaccount(touched: set[str] | None, previous: dict) -> dict | None:
    """What the accounting of a partition planned from ``touched`` groups replaces in the
    ``files.parquet`` part of the previous accounting: the touched groups' files as they
    were then. None (account every file) when every group was read or the previous plan
    does not say."""
    if touched is None or previous.get("files_digest") is None:
        return None
    before = [previous["groups"][name] for name in sorted(touched & previous["groups"].keys())]
    if any(group.files is None for group in before):
        return None
    dropped = [file_id for group in before for file_id in group.files]
    return {"touched": sorted(touched), "dropped": dropped, "files_digest": previous["files_digest"]}


def _groups_to_replan(
    inputs: PartitionInputs, previous: dict, duplicates: dict[str, str], work: Path
) -> tuple[set[str] | None, list[partitions.Unit]]:
    """The groups of a partition that may differ from its previous plan, and the units
    holding their rows: the groups with rows in a unit whose listing changed (or that is
    gone), those with a file whose duplicate flag changed, and those whose report keys
    have other rows in the report table. ``(None, every unit)`` when every group must be
    read: no such previous plan, or report-table changes that cannot be told apart
    (:func:`partitions.changed_report_keys`)."""
    before = previous.get("listings")
    report_keys = (
        None if before is None else partitions.changed_report_keys(work, previous["reports"], inputs.reports)
    )
    if report_keys is None:
        return None, inputs.units
    changed = [unit for unit, listing in inputs.listings if before.get(unit.name) != listing]
    moved = {unit.name for unit in changed} | (before.keys() - {unit.name for unit in inputs.units})
    rows = partitions.read_partition(work, inputs.partition, changed, columns=GROUP_COLUMNS)
    flagged = {
        f
        for f in duplicates.keys() | previous["duplicates"].keys()
        if duplicates.get(f) != previous["duplicates"].get(f)
    }
    flagged -= set(rows["file_id"].to_pylist())
    if flagged:  # a copy flagged in an unchanged unit (rare): find its group
        every = partitions.read_partition(work, inputs.partition, inputs.units, columns=GROUP_COLUMNS)
        rows = pa.concat_tables([rows, every.filter(pc.is_in(every["file_id"], pa.array(sorted(flagged))))])
    touched = set(_row_groups(rows))
    for name, group in previous["groups"].items():
        if moved.intersection(group.units) or report_keys.intersection(group.names):
            touched.add(name)
    holding = {unit.name for unit in changed}
    for name in touched & previous["groups"].keys():
        holding.update(previous["groups"][name].units)
    return touched, [unit for unit in inputs.units if unit.name in holding]


def _plan_changed(
    rows: pa.Table,
    groups: dict[str, StudyGroup],
    duplicates: dict[str, str],
    table_reports: dict,
    work: Path,
    out: str | Path,
    config: IngestConfig,
    secret: bytes,
) -> list[str]:
    """Plan the rows of the changed groups into ``groups``; write the task file of each of
    their studies still to build and return those keys, largest study first."""
    study_plan = plan(rows, plan_config(config), duplicates)
    tasks = study_tasks(study_plan.studies, rows, table_reports, config, secret)
    for study, task in zip(study_plan.studies, tasks, strict=True):
        groups[f"study:{study.study_uid}"].keys.append(task.key)
    group_of = dict(zip(rows["file_id"].to_pylist(), _row_groups(rows), strict=True))
    for reject in study_plan.rejects:
        groups[group_of[reject.file_id]].rejects.append(reject)
    todo, _ = pending_tasks(tasks, [task.key for task in tasks], out)
    todo.sort(key=lambda task: (-task.index_rows.num_rows, task.key))
    for task in todo:
        path = _task_path(work, task.key)
        write_bytes_atomic(path, pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL))
    return [task.key for task in todo]


def _remove_stale_files(work: Path, live: set[int]) -> None:
    """Remove the per-file outcomes of partitions that no longer hold files (and the single
    ``files.parquet`` file of outputs made before it was partitioned)."""
    path = work / FILES_FILE
    if path.is_file():
        path.unlink()
    for part in path.glob("part-*.parquet"):
        if int(part.stem.removeprefix("part-")) not in live:
            part.unlink()


def _write_files(work: Path, partition: int, files: pa.Table) -> bytes:
    path = work / FILES_FILE / f"part-{partition:04d}.parquet"
    encoded = parquet_bytes(files)
    write_bytes_atomic(path, encoded)
    return encoded


def _load_task(work: Path, key: str) -> StudyTask:
    return pickle.loads(_task_path(work, key).read_bytes())


def stage_planned_study(key: str, work: Path, out: str | Path, config: IngestConfig) -> StudyOutcome:
    """Build a study that :func:`plan_partition` planned (a Dask task)."""
    return stage_study(_load_task(work, key), out, config)


def reject_killing_planned(key: str, work: Path, out: str | Path, config: IngestConfig) -> StudyOutcome:
    return reject_killing_study(_load_task(work, key), out)


def account_partition(
    partition: int, units: Sequence[partitions.Unit], work: Path, out: str | Path
) -> IngestSummary:
    """Give every file of one index partition its one outcome (a Dask task): the plan's
    rejects and the outcomes of the partition's studies, written to
    ``files.parquet/part-NNNN.parquet``; return the partition's counts. Only the studies
    planned again have their outcome records read, unless the previous accounting cannot
    be reused."""
    pending_path, accounted_path, done_path = _plan_files(work, partition)
    # A task that ran to its end on a worker lost before its result came back runs again.
    planned = pickle.loads((pending_path if pending_path.exists() else accounted_path).read_bytes())
    previous = _previous_files(work, partition, planned)
    if previous is None:  # every file of the partition, with every group's outcomes
        groups = list(planned["groups"].values())
        file_ids = partitions.read_partition(work, partition, units, columns=["file_id"])
        files = _account_groups(file_ids, groups, out, partition)
    else:  # the previous part, with the rows of the groups planned again replaced
        reaccount = planned["reaccount"]
        groups = [planned["groups"][name] for name in reaccount["touched"] if name in planned["groups"]]
        files = _replace_groups(previous, groups, reaccount["dropped"], out, partition)
    encoded = _write_files(work, partition, files)
    for key in (key for group in groups for key in group.keys):
        _task_path(work, key).unlink(missing_ok=True)
    summary = summarize(files, out)
    counts = {name: getattr(summary, name) for name in RUN_COUNTS}
    planned["files_digest"] = hashlib.sha256(encoded).hexdigest()
    write_bytes_atomic(accounted_path, pickle.dumps(planned, protocol=pickle.HIGHEST_PROTOCOL))
    pending_path.unlink(missing_ok=True)
    write_bytes_atomic(done_path, json.dumps({"inputs": planned["inputs"], "counts": counts}).encode())
    return summary


def _account_groups(
    file_ids: pa.Table, groups: list[StudyGroup], out: str | Path, partition: int
) -> pa.Table:
    """:func:`account` of ``file_ids`` with the rejects of ``groups`` and the recorded
    outcomes of their studies."""
    outcomes = {key: read_outcome(out, key) for group in groups for key in group.keys}
    missing = [key for key, outcome in outcomes.items() if outcome is None]
    if missing:
        raise RuntimeError(
            f"partition {partition}: {len(missing)} studies have no outcome, e.g. {missing[0]}"
        )
    rejects = [reject for group in groups for reject in group.rejects]
    return account(file_ids, rejects, outcomes.values())


def _previous_files(work: Path, partition: int, planned: dict) -> pa.Table | None:
    """The partition's ``files.parquet`` part as the previous accounting wrote it, when the
    plan read only some groups (``reaccount``); None when it read every group or the part is
    not that one (then every file is accounted for again)."""
    reaccount = planned.get("reaccount")
    path = work / FILES_FILE / f"part-{partition:04d}.parquet"
    if reaccount is None or not path.exists():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != reaccount["files_digest"]:
        return None
    return partitions.read_file(pa.BufferReader(data))


def _replace_groups(
    previous: pa.Table, groups: list[StudyGroup], dropped: list[str], out: str | Path, partition: int
) -> pa.Table:
    """``previous`` without the rows of ``dropped`` (the groups' files as they were) and of the
    groups' files now, plus those files' new outcomes."""
    file_ids = pa.table({"file_id": pa.array([f for group in groups for f in group.files], pa.string())})
    new = _account_groups(file_ids, groups, out, partition)
    replaced = pa.array(sorted({*dropped, *file_ids["file_id"].to_pylist()}), pa.string())
    kept = previous.filter(pc.invert(pc.is_in(previous["file_id"], value_set=replaced)))
    return pa.concat_tables([kept, new]).sort_by("file_id").combine_chunks()


def read_dicom_study(source: str | os.PathLike, config: IngestConfig | None = None) -> Study:
    """The one study in a folder (or zip) of DICOM files, built in memory as ``run_ingest``
    builds it (same planning, resampling and de-identification, no report needed), for
    embedding a study that is not in a dataset. Its key is a pseudonym under a throwaway secret.
    """
    config = config or IngestConfig(allow_missing_report=True)
    rows = [index.index_file(source_file) for source_file in index.iter_source_files([str(source)])]
    index_table = index.rows_to_table(rows)
    study_plan = plan(index_table, plan_config(config))
    if len(study_plan.studies) != 1:
        found = len(study_plan.studies)
        reasons = sorted({reject.reason for reject in study_plan.rejects})
        raise ValueError(f"{source}: expected the files of one study, found {found} (rejects: {reasons})")
    (task,) = study_tasks(study_plan.studies, index_table, {}, config, secrets.token_bytes(32))
    study, outcomes = build_study(task, config)
    if study is None:
        reasons = sorted({outcome.reason for outcome in outcomes if outcome.reason})
        raise ValueError(f"{source}: the study was rejected ({', '.join(reasons)})")
    return study


def _prepare(out_dir: str | os.PathLike, secret_option: str | None, settings: dict) -> tuple[Path, bytes]:
    """Create ``out/_ingest``, resolve the secret, and check the settings of a resumed run."""
    out = out_dir if is_remote(out_dir) else Path(out_dir)
    ingest_dir(out).mkdir(parents=True, exist_ok=True)
    secret = deid.resolve_secret(secret_option, ingest_dir(out).parent)
    _check_config(ingest_dir(out), settings, secret)
    return out, secret


def _client(client, scheduler: str | None, workers: int | None, memory_limit: str):
    return contextlib.nullcontext(client) if client is not None else connect(scheduler, workers, memory_limit)


def _stage_all(
    client, progress: Progress, out: Path, tasks: Sequence, keys: Sequence[str], function, *args, if_killed
):
    """Run ``function(task, out, *args)`` for every study not done yet; all outcomes. A
    study whose task keeps killing its worker gets ``if_killed(task, out, *args)``."""
    todo, outcomes = pending_tasks(tasks, keys, out)
    bar = progress.add_task("build", total=len(tasks), completed=len(outcomes))
    runner = TaskRunner(client)
    for task in todo:
        runner.submit("study", function, task, out, *args, if_killed=if_killed)
    while runner.outstanding:
        outcomes.append(runner.next()[1])
        progress.advance(bar)
    return outcomes


RUN_FILE = "last_run.json"
RUN_COUNTS = ("files", "studies_staged", "studies_rejected", "outcomes", "reasons")


def _record_run(out: str | Path, summary: IngestSummary, digest: str = "") -> IngestSummary:
    """Record the counts of a finished run with the digest of its inputs (last, so that a
    re-run on the same inputs can stop after the index: :func:`unchanged_run`)."""
    if digest:
        counts = {name: getattr(summary, name) for name in RUN_COUNTS}
        record = json.dumps({"inputs": digest, **counts}, sort_keys=True).encode()
        write_bytes_atomic(ingest_dir(out) / RUN_FILE, record)
    return summary


def unchanged_run(out: str | os.PathLike, digest: str) -> IngestSummary | None:
    """The summary of a re-run whose inputs (``digest``) are those of the last finished run,
    with nothing staged since: the plan, and so every study, would be the same, and the
    dataset is up to date. None when there is anything to do."""
    path = ingest_dir(out) / RUN_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_bytes())
    if record.get("inputs") != digest or DatasetWriter(out).staged_keys():
        return None
    return IngestSummary(out_dir=out, **{name: record[name] for name in RUN_COUNTS})


# --- NIfTI collections -------------------------------------------------------------------


def nifti_settings(spec: NiftiTableSpec) -> dict:
    """The settings of a collection ingest that shape its samples (the root does not)."""
    settings = json.loads(json.dumps(asdict(spec)))
    del settings["root"]
    return settings


def stage_nifti_study(
    task: tuple[str, NiftiStudyPlan],
    out_dir: str | os.PathLike,
    secret: bytes,
    config_hash: str,
    codec: str = fmt.DEFAULT_CODEC,
) -> StudyOutcome:
    """Read one study of a collection and stage it; a volume that cannot be read rejects
    the study's files with ``unreadable_nifti``."""
    tune_allocator()
    key, study_plan = task
    paths = [str(volume.path) for volume in study_plan.volumes]
    try:
        study = build_nifti_study(study_plan, secret, config_hash)
        members = encode_study(study, codec=codec)
    except Exception as error:  # noqa: BLE001 - truncated or odd files raise many types
        message = f"{type(error).__name__}: {error}"
        outcome = StudyOutcome(
            key, False, _rejected(paths, key, "unreadable_nifti", message), task_inputs(task)
        )
        return _record_and_stage(out_dir, outcome, None)
    files = [FileOutcome(path, SCAN, key, scan.name) for path, scan in zip(paths, study.scans, strict=True)]
    return _record_and_stage(out_dir, StudyOutcome(key, True, files, task_inputs(task)), members)


@holds_out_lock
def run_nifti_ingest(
    table: pa.Table | str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: NiftiTableSpec | None = None,
    *,
    secret: str | None = None,
    max_shard_bytes: int = fmt.DEFAULT_MAX_SHARD_BYTES,
    codec: str = fmt.DEFAULT_CODEC,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str = "auto",
    client=None,
    progress: Progress | None = None,
) -> IngestSummary:
    """Ingest a NIfTI collection table (:mod:`hlip.ingest.nifti`) into shards at ``out_dir``.

    Same execution, resume and accounting as :func:`run_ingest`; the files accounted for
    are the volumes the table lists.
    """
    spec = spec or NiftiTableSpec()
    progress = progress or Progress(disable=True)
    fmt.slab_codec(codec)
    settings = {**nifti_settings(spec), "max_shard_bytes": max_shard_bytes, "codec": codec}
    out, key_secret = _prepare(out_dir, secret, settings)
    plans = plan_nifti_studies(table if isinstance(table, pa.Table) else Path(table), spec)
    keys = [deid.study_key(study_plan.study_id, key_secret) for study_plan in plans]
    config_hash = settings_hash(nifti_settings(spec))
    with _client(client, scheduler, workers, memory_limit) as client:
        tasks = list(zip(keys, plans, strict=True))
        outcomes = _stage_all(
            client, progress, out, tasks, keys, stage_nifti_study, key_secret, config_hash, codec,
            if_killed=reject_killing_study,
        )  # fmt: skip
        volumes = sorted({str(volume.path) for study_plan in plans for volume in study_plan.volumes})
        files = pa.table({"file_id": pa.array(volumes, pa.string())})
        version = DatasetWriter(out, max_shard_bytes=max_shard_bytes).finalize(ordered_map(client))
        files = account(files, [], outcomes)
        _remove_stale_files(ingest_dir(out), {0})
        _write_files(ingest_dir(out), 0, files)
        return combine([summarize(files, out)], out, version)
