"""``hlip-train``: train from a preset and overrides, list the config keys, export a model folder.

hlip-train run shards/ --config demo-cpu --out runs/demo
hlip-train run 'shards/ds-{000000..000099}.tar' --config ct-rate --set lr=3e-5
hlip-train run --config runs/demo/config.json --resume auto
hlip-train config --list
torchrun --nproc_per_node 8 -m hlip.train.cli run shards/ --config ct-rate
"""

from __future__ import annotations

import json
import logging
import os

import typer
from rich.console import Console
from rich.table import Table

from hlip.cli import device_option, make_app, out_option, set_option, workers_option
from hlip.model.checkpoint import CheckpointError
from hlip.shards.format import ShardFormatError
from hlip.train.config import ConfigError, TrainConfig, config_fields, load_config
from hlip.train.loop import TooManySkippedError, train

app = make_app("Pre-train an HLIP CLIP model on study shards; list config keys; export a model folder.")
console = Console()
errors = Console(stderr=True)

CONFIG = typer.Option(
    None, "--config", "-c", help="Preset name (demo-cpu, ct-rate, brain-mri) or TOML/JSON file."
)
SET = set_option("Override a config key (`hlip-train config --list` lists them):")
SUMMARY_KEYS = ("model", "steps", "batch_size", "lr", "device", "num_workers", "out")
"""Config keys printed in the console summary of a run (config.json in the run folder has all)."""


def _from_config(key: str) -> str:
    return f"the config's, else {getattr(TrainConfig(), key)}"


def overrides_of(options: dict[str, object], data: list[str], val_data: list[str]) -> list[str]:
    """The shortcut options as ``key=value`` overrides (after ``--set``, so they win)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in options.items() if value is not None]
    overrides += [f"data={json.dumps(data)}"] if data else []
    return overrides + ([f"val_data={json.dumps(val_data)}"] if val_data else [])


def summary_line(config: TrainConfig, preset: str | None, overrides: list[str]) -> str:
    """One line for the console: where the config came from and the keys people look for."""
    keys = " ".join(f"{key}={getattr(config, key)}" for key in SUMMARY_KEYS)
    sets = f" + {len(overrides)} override(s)" if overrides else ""
    return f"config {preset or 'defaults'}{sets}: {keys} data={len(config.data)} source(s)"


USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ShardFormatError, TooManySkippedError)
"""Expected failures (what was asked cannot run): one line on stderr, exit 2, no traceback."""


def _fail(error: Exception) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    data: list[str] = typer.Argument(
        None, help="Training shards: dataset dirs, globs, brace patterns, URLs (default: the config's)."
    ),
    config: str = CONFIG,
    set_: list[str] = SET,
    val_data: list[str] = typer.Option(
        [], "--val-data", help="Validation shards for zero-shot evaluation; repeatable."
    ),
    version: int = typer.Option(
        None, "--version", min=1, help="Version of the DATA datasets (default: the latest)."
    ),
    out: str = out_option("Run directory.", None, show_default=_from_config("out")),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps.", show_default=_from_config("steps")),
    batch_size: int = typer.Option(
        None,
        "--batch-size",
        help="Global batch (studies per optimizer step).",
        show_default=_from_config("batch_size"),
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate.", show_default=_from_config("lr")),
    workers: int = workers_option(
        None, "decoding studies per rank", show_default=_from_config("num_workers")
    ),
    seed: int = typer.Option(None, "--seed", help="Random seed.", show_default=_from_config("seed")),
    device: str = device_option(None, show_default=_from_config("device")),
    resume: str = typer.Option(
        "", "--resume", help="Checkpoint file or run dir to continue from; 'auto' = last.pt of --out if any."
    ),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Train; each option is a shortcut for the ``--set`` of its config key."""
    shortcuts = {"out": out, "steps": steps, "batch_size": batch_size, "lr": lr, "num_workers": workers}
    shortcuts |= {"seed": seed, "device": device, "data_version": version}
    overrides = list(set_) + overrides_of(shortcuts, data or [], val_data)
    resolved = _load(config, overrides)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=log_level.upper() if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    if rank == 0:
        errors.print(summary_line(resolved, config, overrides), highlight=False, soft_wrap=True)
        errors.print(f"full config: {resolved.run_dir / 'config.json'}", highlight=False, soft_wrap=True)
    try:
        result = train(resolved, resume=resume)
    except USER_ERRORS as error:
        _fail(error)
    if rank == 0:
        typer.echo(
            f"done: step {result.step}, loss {result.loss:.4f}, checkpoint {result.run_dir / 'checkpoints'}"
        )
        skipped = sum(result.skipped.values())
        reasons = ", ".join(f"{reason} ({n})" for reason, n in result.skipped.items())
        typer.echo(f"skipped studies: {skipped}" + (f": {reasons}" if reasons else ""))


@app.command("config")
def show_config(
    config: str = CONFIG,
    set_: list[str] = SET,
    list_keys: bool = typer.Option(
        False, "--list", "-l", help="List every config key with its type and default."
    ),
) -> None:
    """Print the resolved config of a preset and overrides as JSON, or (--list) every key."""
    if not list_keys:
        console.print_json(json.dumps(_load(config, list(set_)).to_dict(), sort_keys=True))
        return
    table = Table(title="hlip-train config keys (--set key=value, or a TOML/JSON file)")
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for field in config_fields():
        table.add_row(field.name, field.type, json.dumps(field.default), field.doc)
    console.print(table)


@app.command("export")
def export(
    run: str = typer.Argument(..., help="hlip-train run directory or checkpoint file."),
    out: str = out_option("Model folder to write (model.safetensors, config.json, text/)."),
) -> None:
    """Write a portable model folder: weights only, configs and tokenizer; hlip.load() reads it."""
    from hlip.pretrained import export_model_folder

    try:
        folder = export_model_folder(run, out)
    except (*USER_ERRORS, ValueError) as error:
        _fail(error)
    console.print(
        f"wrote {folder} (load it with hlip.load({str(folder)!r}) or hlip-eval run DATASET -m {folder})"
    )


def _load(config: str | None, overrides: list[str]) -> TrainConfig:
    """:func:`load_config`, with a bad preset, key or value as a one-line error."""
    try:
        return load_config(config, overrides)
    except USER_ERRORS as error:
        _fail(error)


if __name__ == "__main__":
    app()
