"""The command-line convention every hlip tool follows (docs/cli.md describes it for users).

* Each tool is a group of subcommands; ``run`` does the tool's main work.
* What a command reads comes first, as arguments: sources for ``hlip-ingest``, the dataset
  directory for ``hlip-shards``, ``hlip-train`` and ``hlip-eval``.
* ``--out/-o`` is what it writes; ``--model/-m`` the model it uses (hlip-eval);
  ``--config/-c`` a preset or config file and ``--set/-s key=value`` an override of one of
  its keys (repeatable); ``--workers`` the worker processes beside the main one (0: all work
  in this process); ``--device`` the torch device, ``auto`` by default everywhere.
* ``--version`` prints hlip's version; ``-h/--help`` shows every option with its default.

The options shared by several tools are built here, so that their names and help agree.
"""

from __future__ import annotations

from typing import Any

import typer

from hlip import __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hlip {__version__}")
        raise typer.Exit()


def make_app(help: str) -> typer.Typer:
    """A tool's typer app: subcommands, ``--version``, ``-h`` and defaults in every help."""
    app = typer.Typer(
        help=help,
        no_args_is_help=True,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _tool(
        version: bool = typer.Option(
            False, "--version", callback=_print_version, is_eager=True, help="Print hlip's version and exit."
        ),
    ) -> None:
        pass

    return app


def out_option(help: str, default: Any = ..., **kwargs: Any) -> Any:
    return typer.Option(default, "--out", "-o", help=help, **kwargs)


def workers_option(default: int | None, what: str, **kwargs: Any) -> Any:
    """``--workers``: worker processes beside the main one doing ``what``; 0 = in this process."""
    return typer.Option(
        default, "--workers", min=0, help=f"Worker processes {what} (0: in this process).", **kwargs
    )


def device_option(default: str | None = "auto", **kwargs: Any) -> Any:
    return typer.Option(
        default,
        "--device",
        help="torch device: auto (the GPU when there is one), cpu, cuda, cuda:N.",
        **kwargs,
    )


def set_option(help: str) -> Any:
    return typer.Option([], "--set", "-s", help=f"{help} key=value (a TOML literal); repeatable.")
