"""``hlip-eval``: zero-shot classification, retrieval and linear probe of a trained model.

Only argument parsing and printing live here; the work is :func:`hlip.evaluate.run.run_evaluation`
and :func:`hlip.evaluate.embed.embed_dataset`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from hlip.cli import device_option, make_app, out_option, set_option, workers_option

app = make_app("Evaluate an HLIP model: zero-shot classification, report retrieval, linear probe.")
console = Console()
errors = Console(stderr=True)

MODEL = typer.Option(
    ...,
    "--model",
    "-m",
    help="hlip-train run directory or checkpoint, exported model folder, or a published HLIP file with --preset.",
)
DATA = typer.Argument(..., help="Shard dataset directory or object-store URL (s3://...).")
VERSION = typer.Option(None, "--version", min=1, help="Dataset version to read (default: the latest).")
PRESET = typer.Option(None, "--preset", help="Model preset of a published (open_clip layout) checkpoint.")
TEXT_MODEL = typer.Option(None, "--text-model", help="Local directory of the text encoder a preset needs.")
BATCH = typer.Option(
    8, "--batch-size", "-b", min=1, help="Studies per forward pass (results do not depend on it)."
)
WORKERS = workers_option(0, "decoding studies")
DEVICE = device_option()
SETTINGS = set_option("Override a transform key of the model's config (e.g. max_scans=4):")


class _EmbeddingProgress:
    """A progress bar that appears with the first embedded batch, so that input errors
    (reported before any study is embedded) are not preceded by an empty bar."""

    def __enter__(self):
        self.bar = Progress(
            TextColumn("[bold]embedding studies"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("embed", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _fail(error: Exception) -> None:
    errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[Exception], ...]:
    from hlip.evaluate.embed import EvalInputError
    from hlip.evaluate.labels import LabelError
    from hlip.evaluate.prompts import PromptsError
    from hlip.model.checkpoint import CheckpointError

    return EvalInputError, LabelError, PromptsError, CheckpointError, FileNotFoundError


@app.command()
def run(
    data: str = DATA,
    model: str = MODEL,
    out: Path = out_option("Output directory (metrics.json, report.md, plots/)."),
    prompts: str = typer.Option(
        None,
        "--prompts",
        "-p",
        help="Prompts or benchmark TOML, or a shipped one by name (synth, ct-rate, ...).",
    ),
    calibrate: str = typer.Option(
        None,
        "--calibrate",
        help="Labelled shards other than --data (training or validation studies): each label's "
        "threshold for sensitivity/specificity/balanced accuracy is chosen on their zero-shot scores.",
    ),
    ground: str = typer.Option(
        "auto",
        "--ground",
        help="Shards whose reports ground the zero-shot prompts in their own sentences and reports (no "
        "labels read); 'auto': the model's training shards when readable here; 'none': the prompts alone.",
    ),
    tasks: str = typer.Option(
        "zeroshot,retrieval", "--tasks", help="Comma-separated: zeroshot,retrieval,probe."
    ),
    labels: str = typer.Option(None, "--labels", help="Label table (CSV/Parquet) keyed by study key."),
    label_key: str = typer.Option("key", "--label-key", help="Key column of the label table."),
    preset: str = PRESET,
    text_model: str = TEXT_MODEL,
    template_set: str = typer.Option(None, "--template-set", help="Use this template set for every label."),
    only: str = typer.Option(
        None, "--only", help="Comma-separated labels/tasks of the prompts file to score."
    ),
    batch_size: int = BATCH,
    workers: int = WORKERS,
    device: str = DEVICE,
    settings: list[str] = SETTINGS,
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the 95% CIs."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds of the linear probe."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and probe splits."),
    version: int = VERSION,
) -> None:
    """Embed the studies, run the tasks and write metrics.json, report.md and plots."""
    from hlip.evaluate.run import EvalOptions, run_evaluation

    options = EvalOptions(
        checkpoint=model,
        data=data,
        version=version,
        out=str(out),
        prompts=prompts,
        calibrate=calibrate,
        ground=ground,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        labels=labels,
        label_key=label_key,
        preset=preset,
        text_model=text_model,
        template_set=template_set,
        only=[n.strip() for n in only.split(",") if n.strip()] if only else (),
        batch_size=batch_size,
        workers=workers,
        device=device,
        settings=settings,
        bootstrap=bootstrap,
        folds=folds,
        seed=seed,
    )
    try:
        with _EmbeddingProgress() as progress:
            outcome = run_evaluation(options, progress=progress)
    except _user_errors() as error:
        _fail(error)
    _print_summary(outcome)


def _print_summary(outcome) -> None:
    from hlip.evaluate.report import summary_rows

    table = Table(title="hlip-eval", show_lines=False)
    for column in ("task", "measure", "value"):
        table.add_column(column, no_wrap=True)
    for row in summary_rows(outcome.metrics):
        table.add_row(*row)
    console.print(table)
    for warning in outcome.metrics.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"report:     {outcome.files.report}", soft_wrap=True)
    console.print(f"metrics:    {outcome.files.metrics}", soft_wrap=True)
    console.print(f"embeddings: {outcome.embeddings}", soft_wrap=True)
    for path in outcome.extra:
        console.print(f"scores:     {path}", soft_wrap=True)
    for path in outcome.files.plots:
        console.print(f"plot:       {path}", soft_wrap=True)


@app.command()
def embed(
    data: str = DATA,
    model: str = MODEL,
    out: Path = out_option("Output Parquet file (embeddings.parquet)."),
    preset: str = PRESET,
    text_model: str = TEXT_MODEL,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    device: str = DEVICE,
    settings: list[str] = SETTINGS,
    version: int = VERSION,
) -> None:
    """Write one row per study: key, labels, image and report embeddings (L2-normalised)."""
    from hlip.evaluate.embed import embed_dataset, load_model

    try:
        loaded = load_model(model, preset=preset, text_path=text_model, overrides=settings, device=device)
        with _EmbeddingProgress() as progress:
            embeddings = embed_dataset(
                loaded, data, batch_size=batch_size, num_workers=workers, progress=progress, version=version
            )
    except _user_errors() as error:
        _fail(error)
    path = embeddings.save(out)
    console.print(f"{len(embeddings)} studies, {embeddings.image.shape[1]}-d embeddings -> {path}")


@app.command()
def presets() -> None:
    """List the model presets that --preset accepts (for published open_clip-layout checkpoints)."""
    from hlip.model.factory import MODEL_PRESETS

    table = Table(title="model presets")
    for column in ("preset", "vision", "embed dim", "text encoder", "context"):
        table.add_column(column, overflow="fold")
    for name, config in MODEL_PRESETS.items():
        text = config["text"]
        encoder = text.get("requires") or text.get("path") or "built-in MiniLM"
        table.add_row(
            name, config["vision"]["name"], str(config["embed_dim"]), encoder, str(text["context_length"])
        )
    console.print(table)


if __name__ == "__main__":
    app()
