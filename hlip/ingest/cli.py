"""``hlip-ingest``: DICOM archives (+ report tables) or NIfTI collections -> study shards.

This module only parses arguments and prints; the work is in :mod:`hlip.ingest.pipeline`
and the stage modules, so every command can be called from Python as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hlip.cli import make_app, out_option, workers_option
from hlip.ingest import pipeline
from hlip.ingest.config import IngestConfig, Spacing, default_target_spacing
from hlip.ingest.partitions import DEFAULT_PARTITIONS, INDEX_DIR
from hlip.shards.format import DEFAULT_CODEC, DEFAULT_MAX_SHARD_BYTES, SLAB_CODECS

app = make_app("Turn DICOM archives (+ report tables) or NIfTI collections into study shards.")
console = Console()

OUT = out_option(
    "Output dataset directory or object-store URL (s3://bucket/prefix); re-run to resume or grow it."
)
SCHEDULER = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler (tcp://host:8786).")
WORKERS = workers_option(None, "of the local Dask cluster", show_default="sized to the machine")
MEMORY_LIMIT = typer.Option("auto", "--memory-limit", help="Memory limit per LocalCluster worker, e.g. 6GiB.")
LABEL_COLUMN = typer.Option(
    [],
    "--label-column",
    help="Table column allowed as a label (repeatable). Default: only columns of 0/1 findings. "
    "Identifiers, dates and free text are refused.",
)
LABEL_PREFIX = typer.Option(
    [], "--label-prefix", help="Allow every table column whose name starts with this as a label (repeatable)."
)
INDEX_PARTITIONS = typer.Option(
    DEFAULT_PARTITIONS,
    "--index-partitions",
    help="Partitions of the header index, each planned by one task: about one per 50,000 files.",
)
CODEC = typer.Option(
    DEFAULT_CODEC,
    "--codec",
    help=f"Blosc codec of the voxel slabs: {' | '.join(SLAB_CODECS)}. lz4hc: about a fifth larger "
    "shards that decode several times faster, for CPU-bound training loaders.",
)


def parse_spacing(values: list[str]) -> dict[str, Spacing]:
    """``["CT=3,1,1", "MR=native"]`` -> target spacing per modality, over the defaults.

    A bare ``native`` keeps every modality's native grid (later ``MODALITY=...`` values
    still apply on top of it)."""
    spacing = default_target_spacing()
    for value in values:
        if value == "native":
            spacing = dict.fromkeys(spacing, "native")
            continue
        modality, sep, setting = value.partition("=")
        if not sep:
            raise typer.BadParameter(f"{value!r}: expected native, MODALITY=d,h,w or MODALITY=native")
        if setting == "native":
            spacing[modality.upper()] = "native"
            continue
        try:
            spacing[modality.upper()] = tuple(float(v) for v in setting.split(","))
        except ValueError:
            raise typer.BadParameter(f"{value!r}: spacing must be three numbers in mm (d,h,w)") from None
    return spacing


@contextlib.contextmanager
def _user_errors():
    """Print refusals (another config in --out, a bad report table, ...) without a traceback."""
    try:
        yield
    except (ValueError, FileExistsError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def version_line(summary: pipeline.IngestSummary) -> str:
    """What this run committed: a new dataset version, or nothing (an unchanged re-run)."""
    if summary.version is None:
        return "0 new studies: the dataset is up to date (no new version)"
    rebuilt = f", {summary.studies_superseded} rebuilt" if summary.studies_superseded else ""
    return f"version {summary.version}: {summary.studies_added} new studies{rebuilt}"


def print_summary(summary: pipeline.IngestSummary) -> None:
    """Outcome counts, then reject reasons with their meaning."""
    outcomes = Table(title=f"Ingest of {summary.out_dir}", show_footer=True)
    outcomes.add_column("outcome", footer="files")
    outcomes.add_column("files", justify="right", footer=str(summary.files))
    for outcome, count in summary.outcomes.items():
        outcomes.add_row(outcome, str(count))
    console.print(outcomes)
    console.print(f"studies: {summary.studies_staged} in the dataset, {summary.studies_rejected} rejected")
    console.print(version_line(summary))
    if summary.reasons:
        reasons = Table(title="Rejected files by reason")
        for column in ("reason", "files", "meaning"):
            reasons.add_column(column, justify="right" if column == "files" else "left")
        for reason, count in summary.reasons.items():
            reasons.add_row(reason, str(count), pipeline.REASONS.get(reason, ""))
        console.print(reasons)
    console.print(f"per-file outcomes: {pipeline.ingest_dir(summary.out_dir) / pipeline.FILES_FILE}")


@app.command()
def run(
    sources: list[Path] = typer.Argument(..., exists=True, help="Folders, files or zip exports to ingest."),
    out: str = OUT,
    reports: Path | None = typer.Option(
        None, "--reports", exists=True, help="Report table (CSV, TSV, Parquet or JSON lines)."
    ),
    report_key: str = typer.Option(
        "StudyInstanceUID", help="Report table column: StudyInstanceUID|AccessionNumber."
    ),
    report_column: list[str] = typer.Option(["report"], help="Report text column(s), joined in order."),
    label_column: list[str] = LABEL_COLUMN,
    label_prefix: list[str] = LABEL_PREFIX,
    allow_missing_report: bool = typer.Option(False, help="Keep studies without a report (empty text)."),
    spacing: list[str] = typer.Option(
        [], help="Target spacing per modality, e.g. CT=3,1,1 or MR=native; native alone: every modality."
    ),
    min_slices: int = typer.Option(IngestConfig.min_slices, help="Fewest slices a scan may have."),
    max_shard_bytes: int = typer.Option(DEFAULT_MAX_SHARD_BYTES, help="Size bound of one shard."),
    max_study_voxels: int | None = typer.Option(
        None, help="Most pixels a study's files may declare (default: worker memory / 16 bytes)."
    ),
    codec: str = CODEC,
    secret: str | None = typer.Option(None, help="Key of the study pseudonyms (else $HLIP_DEID_SECRET)."),
    index_partitions: int = INDEX_PARTITIONS,
    trust_folder_times: bool = typer.Option(
        False,
        help="On a re-run, skip listing folders whose modification time is unchanged "
        "(for archives whose files are never rewritten in place).",
    ),
    scheduler: str | None = SCHEDULER,
    workers: int | None = WORKERS,
    memory_limit: str = MEMORY_LIMIT,
) -> None:
    """Index, plan, build and write shards; print what happened to every file."""
    with _user_errors():
        config = IngestConfig(
            target_spacing=parse_spacing(spacing),
            min_slices=min_slices,
            report_table=str(reports) if reports else None,
            report_key_column=report_key,
            report_text_columns=tuple(report_column),
            label_columns=tuple(label_column) if label_column else None,
            label_prefixes=tuple(label_prefix),
            allow_missing_report=allow_missing_report,
            max_shard_bytes=max_shard_bytes,
            max_study_voxels=max_study_voxels,
            codec=codec,
            secret=secret,
            index_partitions=index_partitions,
            trust_folder_times=trust_folder_times,
        )
    with _user_errors(), _progress() as progress:
        summary = pipeline.run_ingest(
            sources, out, config, scheduler, workers=workers, memory_limit=memory_limit, progress=progress
        )
    print_summary(summary)


@app.command()
def index(
    sources: list[Path] = typer.Argument(..., exists=True, help="Folders, files or zip exports to index."),
    out: Path = out_option("Folder to write the partitioned index into (contains PHI)."),
    index_partitions: int = INDEX_PARTITIONS,
    scheduler: str | None = SCHEDULER,
    workers: int | None = WORKERS,
    memory_limit: str = MEMORY_LIMIT,
) -> None:
    """Parse the header of every file into a partitioned Parquet index (no pixels are read)."""
    with _progress() as progress, pipeline.connect(scheduler, workers, memory_limit) as client:
        runner = pipeline.TaskRunner(client)
        summaries = pipeline.index_archive(sources, out, index_partitions, runner, progress, exclude=[out])
    files = sum(summary.files for summary in summaries)
    console.print(
        f"{files} files indexed into {out / INDEX_DIR} (read it whole with pyarrow.parquet.read_table)"
    )


@app.command()
def plan(
    index_file: Path = typer.Argument(..., exists=True, metavar="INDEX", help="An index file or folder."),
    min_slices: int = typer.Option(IngestConfig.min_slices, help="Fewest slices a scan may have."),
) -> None:
    """Show the studies, scans and rejected files that an index plans into."""
    import pyarrow.parquet as pq

    from hlip.ingest.plan import plan as plan_index

    result = plan_index(pq.read_table(index_file), pipeline.plan_config(IngestConfig(min_slices=min_slices)))
    studies = Table(title=f"{len(result.studies)} studies")
    for column in ("study", "modality", "scan", "files", "series", "description"):
        studies.add_column(column)
    for study in result.studies:
        for scan in study.scans:
            studies.add_row(
                study.study_uid, study.modality, scan.name, str(len(scan.files)),
                str(scan.series_number), scan.series_description,
            )  # fmt: skip
    console.print(studies)
    rejects = Table(title=f"{len(result.rejects)} rejected files")
    for column in ("reason", "files", "example"):
        rejects.add_column(column)
    by_reason: dict[str, list] = {}
    for reject in result.rejects:
        by_reason.setdefault(reject.reason, []).append(reject)
    for reason, items in sorted(by_reason.items()):
        rejects.add_row(reason, str(len(items)), f"{items[0].file_id}: {items[0].message}")
    console.print(rejects)


@app.command()
def nifti(
    table: Path = typer.Argument(..., exists=True, help="Collection table (CSV, Parquet, JSONL)."),
    out: str = OUT,
    study_column: str = typer.Option(
        "study_id", help="Column of the study id (rows sharing it are one study)."
    ),
    volume_column: str = typer.Option("volumes", help="Column of the volume path(s), ';'-separated."),
    report_column: list[str] = typer.Option(["report"], help="Report text column(s), joined in order."),
    label_column: list[str] = LABEL_COLUMN,
    label_prefix: list[str] = LABEL_PREFIX,
    modality: str = typer.Option("CT", help="Modality of rows without a 'modality' column."),
    body_part: str = typer.Option("", help="BodyPartExamined of every study."),
    ct_rate_volumes: Path | None = typer.Option(
        None,
        exists=True,
        file_okay=False,
        help="CT-RATE: the folder of volumes; TABLE is then its reports CSV.",
    ),
    ct_rate_labels: Path | None = typer.Option(
        None, exists=True, help="CT-RATE: multi-abnormality labels CSV."
    ),
    ct_rate_metadata: Path | None = typer.Option(None, exists=True, help="CT-RATE: metadata CSV (rescale)."),
    max_shard_bytes: int = typer.Option(DEFAULT_MAX_SHARD_BYTES, help="Size bound of one shard."),
    codec: str = CODEC,
    secret: str | None = typer.Option(None, help="Key of the study pseudonyms (else $HLIP_DEID_SECRET)."),
    scheduler: str | None = SCHEDULER,
    workers: int | None = WORKERS,
    memory_limit: str = MEMORY_LIMIT,
) -> None:
    """Ingest studies given as NIfTI volumes listed in a table (e.g. CT-RATE)."""
    from hlip.ingest import nifti as collections

    labels = {"label_columns": tuple(label_column) or None, "label_prefixes": tuple(label_prefix)}
    if ct_rate_volumes is not None:
        source = collections.ct_rate_table(table, ct_rate_volumes.resolve(), ct_rate_labels, ct_rate_metadata)
        spec = dataclasses.replace(collections.CT_RATE_SPEC, **labels)
    else:
        source = table
        spec = collections.NiftiTableSpec(
            study_column=study_column,
            volume_column=volume_column,
            text_columns=tuple(report_column),
            modality=modality,
            body_part=body_part,
            **labels,
        )
    with _user_errors(), _progress() as progress:
        summary = pipeline.run_nifti_ingest(
            source, out, spec, secret=secret, max_shard_bytes=max_shard_bytes, codec=codec, scheduler=scheduler,
            workers=workers, memory_limit=memory_limit, progress=progress,
        )  # fmt: skip
    print_summary(summary)


@app.command()
def synth(
    out: Path = out_option("Directory for the archive and reports.csv."),
    studies: int = typer.Option(24, "--studies", help="Number of studies."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
    ct_matrix: int | None = typer.Option(None, "--ct-matrix", help="CT in-plane matrix (e.g. 512)."),
    kinds: str = typer.Option(
        "CT,MR",
        "--kinds",
        help="Study kinds, taken in turn: CT (chest CT), MR (brain MR), CT-HEAD (head CT).",
    ),
    lesion_scale: float = typer.Option(
        1.0,
        "--lesion-scale",
        min=0.25,
        max=2.0,
        help="Scale of the planted lesions' sizes (0.25-2; reports state the sizes).",
    ),
    workers: int | None = workers_option(None, "writing studies side by side", show_default="one per core"),
) -> None:
    """Write a synthetic uncurated DICOM archive with a report table (fake PHI included)."""
    from hlip.synth import STUDY_KINDS, Sizes, make_archive

    modalities = [k.strip().upper() for k in kinds.split(",") if k.strip()]
    unknown = sorted(set(modalities) - set(STUDY_KINDS))
    if unknown or not modalities:
        raise typer.BadParameter(f"unknown study kinds {unknown}; choose from {', '.join(STUDY_KINDS)}")
    make_archive(
        out,
        studies,
        seed,
        modalities=modalities,
        sizes=Sizes(lesion_scale=lesion_scale),
        ct_matrix=ct_matrix,
        workers=(os.cpu_count() or 1) if workers is None else workers,
    )
    console.print(f"wrote a synthetic archive of {studies} studies to {out}")


if __name__ == "__main__":
    app()
