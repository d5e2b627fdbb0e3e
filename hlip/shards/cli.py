"""``hlip-shards``: list, summarise, show, verify and export study-shard datasets.

This module only parses arguments and prints; the work is in :mod:`hlip.shards.inspect`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hlip.shards import inspect
from hlip.shards.format import ShardFormatError
from hlip.shards.reader import ShardDataset

app = typer.Typer(
    help="Inspect, verify and export hlip study-shard datasets.", no_args_is_help=True, add_completion=False
)
console = Console()

DATASET = typer.Argument(..., help="Dataset directory or object-store URL (s3://bucket/prefix).")
KEY = typer.Argument(..., help="Study key.")
VERSION = typer.Option(None, "--version", min=1, help="Dataset version to read (default: the latest).")


def _open(path: str, version: int | None = None) -> ShardDataset:
    try:
        return ShardDataset(path, version=version)
    except ShardFormatError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None


def _require_key(dataset: ShardDataset, key: str) -> None:
    if key not in dataset:
        console.print(f"[red]error:[/red] no study {key!r} in {dataset.path}")
        raise typer.Exit(2)


@app.command("ls")
def ls(path: str = DATASET, version: int | None = VERSION) -> None:
    """The dataset's versions, then its studies with modality, report length, and each
    scan's name and shape (d x h x w)."""
    dataset = _open(path, version)
    versions = Table(title=f"{path}: versions")
    for column in ("version", "created", "added", "superseded", "shards", "studies"):
        versions.add_column(column, justify="left" if column == "created" else "right")
    for row in inspect.list_versions(dataset):
        versions.add_row(*(str(value) for value in row.values()))
    console.print(versions)
    table = Table(title=f"{path} version {dataset.version.number} ({len(dataset)} studies)")
    for column in ("key", "modality", "scans", "report chars"):
        table.add_column(column, justify="right" if column == "report chars" else "left")
    for row in inspect.list_studies(dataset):
        table.add_row(row["key"], row["modality"], "\n".join(row["scans"]), str(row["report_length"]))
    console.print(table)


@app.command()
def stats(
    path: str = DATASET,
    png: Path | None = typer.Option(None, "--png", help="Also write the histograms as a PNG."),
    version: int | None = VERSION,
) -> None:
    """Counts and histograms of scans per study, slices, spacing and report length."""
    summary = inspect.dataset_stats(_open(path, version))
    console.print(inspect.stats_text(summary), highlight=False)
    if png is not None:
        inspect.stats_png(summary, png)
        console.print(f"wrote {png}")


@app.command()
def show(
    path: str = DATASET,
    key: str = KEY,
    png: Path = typer.Option(..., "--png", help="Montage PNG to write."),
    slices: int = typer.Option(6, "--slices", min=1, help="Slices per scan in the montage."),
    window: str = typer.Option("soft", "--window", help=f"CT window: {', '.join(inspect.CT_WINDOWS)}."),
    version: int | None = VERSION,
) -> None:
    """Metadata, report, and a PNG montage of evenly spaced slices (one row per scan)."""
    if window not in inspect.CT_WINDOWS:
        raise typer.BadParameter(f"--window must be one of {', '.join(inspect.CT_WINDOWS)}")
    dataset = _open(path, version)
    _require_key(dataset, key)
    study = dataset.open(key)
    summary = inspect.study_summary(study)
    scans = summary.pop("scans")
    console.print_json(json.dumps(summary))
    table = Table(title="scans")
    for column in scans[0] if scans else ():
        table.add_column(column)
    for scan in scans:
        table.add_row(*(str(value) for value in scan.values()))
    console.print(table)
    console.rule("report")
    console.print(study.report or "(empty)", highlight=False)
    inspect.montage_png(study, png, n_slices=slices, ct_window=window)
    console.print(f"wrote {png}")


@app.command()
def verify(path: str = DATASET, version: int | None = VERSION) -> None:
    """Check every member's sha256, the schema, and decode every array; exit 1 on failure."""
    dataset = _open(path, version)
    with Progress(
        TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("verify", total=len(dataset))
        report = inspect.verify_dataset(path, lambda n: progress.advance(task, n), dataset.version.number)
    if report.ok:
        console.print(f"[green]ok[/green]: {report.studies} studies verified")
        return
    table = Table(title=f"{len(report.failed_keys())} of {report.studies} studies failed")
    table.add_column("study")
    table.add_column("problem")
    for problem in report.problems:
        table.add_row(problem.key or "(dataset)", problem.message)
    console.print(table)
    raise typer.Exit(1)


@app.command()
def export(
    path: str = DATASET,
    key: str = KEY,
    out: Path = typer.Option(..., "--out", help="Directory for <scan>.nii.gz, report.txt, study.json."),
    version: int | None = VERSION,
) -> None:
    """One NIfTI per scan (RAS affine), the report and the study metadata."""
    dataset = _open(path, version)
    _require_key(dataset, key)
    try:
        written = inspect.export_study(dataset, key, out)
    except (ShardFormatError, OSError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(1) from None
    for name in written:
        console.print(f"wrote {name}")
