"""``hlip-train``: parse a config and overrides, print the resolved config, call :func:`train`.

hlip-train --config demo-cpu --data shards/ --out runs/demo
hlip-train --config configs/ct-rate.toml --set lr=3e-5 --set 'ct_windows=[[-1150, 350], [-160, 240]]'
hlip-train --config runs/demo/config.json --resume auto
torchrun --nproc_per_node 8 -m hlip.train.cli --config ct-rate --data 'shards/ds-{000000..000099}.tar'
"""

from __future__ import annotations

import json
import logging
import os

import typer
from rich.console import Console

from hlip.model.checkpoint import CheckpointError
from hlip.shards.format import ShardFormatError
from hlip.train.config import ConfigError, load_config
from hlip.train.loop import TooManySkippedError, train

app = typer.Typer(add_completion=False, help="Pre-train an HLIP CLIP model on study shards.")

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ShardFormatError, TooManySkippedError)
"""Expected failures (what was asked cannot run): one line on stderr, exit 2, no traceback."""


def _fail(error: Exception) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def main(
    config: str = typer.Option(
        None, "--config", "-c", help="Preset name (demo-cpu, ct-rate, brain-mri) or TOML/JSON file."
    ),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override any config key: key=value (TOML literal)."
    ),
    data: list[str] = typer.Option(
        [], "--data", help="Training shards (dataset dir, glob, brace pattern, URL); repeatable."
    ),
    val_data: list[str] = typer.Option(
        [], "--val-data", help="Validation shards for zero-shot evaluation; repeatable."
    ),
    version: int = typer.Option(
        None, "--version", min=1, help="Version of the --data datasets (default: the latest)."
    ),
    out: str = typer.Option(None, "--out", help="Run directory."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(None, "--batch-size", help="Global batch (studies per optimizer step)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    workers: int = typer.Option(None, "--workers", help="DataLoader workers per rank."),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    resume: str = typer.Option(
        "", "--resume", help="Checkpoint file or run dir to continue from; 'auto' = last.pt of --out if any."
    ),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Train; every option is a shortcut for a ``--set`` of the same name."""
    shortcuts = {
        "out": out,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "num_workers": workers,
        "seed": seed,
        "device": device,
        "data_version": version,
    }
    overrides = list(set_)
    overrides += [f"{key}={json.dumps(value)}" for key, value in shortcuts.items() if value is not None]
    overrides += [f"data={json.dumps(data)}"] if data else []
    overrides += [f"val_data={json.dumps(val_data)}"] if val_data else []
    try:
        resolved = load_config(config, overrides)
    except USER_ERRORS as error:
        _fail(error)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=log_level.upper() if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    if rank == 0:
        Console(stderr=True).print_json(json.dumps(resolved.to_dict(), sort_keys=True))
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


if __name__ == "__main__":
    app()
