"""The command-line convention shared by the four tools (docs/cli.md)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from hlip import __version__
from hlip.evaluate.cli import app as eval_app
from hlip.ingest.cli import app as ingest_app
from hlip.shards.cli import app as shards_app
from hlip.train.cli import app as train_app

APPS = {"hlip-ingest": ingest_app, "hlip-shards": shards_app, "hlip-train": train_app, "hlip-eval": eval_app}
SHARED = {"--out": ["--out", "-o"], "--set": ["--set", "-s"], "--config": ["--config", "-c"]}
runner = CliRunner()


def options_of(app: typer.Typer):
    """(tool command, option) for every option of every subcommand."""
    group = get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            yield name, param


@pytest.mark.parametrize("tool", APPS)
def test_every_tool_prints_its_version(tool):
    result = runner.invoke(APPS[tool], ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"hlip {__version__}"


@pytest.mark.parametrize("tool", APPS)
def test_shared_options_have_one_spelling_and_meaning(tool):
    for command, param in options_of(APPS[tool]):
        where = f"{tool} {command} {param.opts}"
        for long, spelling in SHARED.items():
            if long in param.opts:
                assert sorted(param.opts) == sorted(spelling), where
        if "--device" in param.opts:
            assert param.default in ("auto", None), where  # None: the config's, whose default is auto
        if "--workers" in param.opts:
            assert "in this process" in param.help, where
        assert "--checkpoint" not in param.opts and "--data" not in param.opts, where


def test_train_config_list_shows_keys_types_and_defaults():
    result = runner.invoke(train_app, ["config", "--list"], terminal_width=200)
    assert result.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert {"lr", "steps", "device", "ct_windows"} <= set(rows)
    assert "float" in rows["lr"] and "0.0001" in rows["lr"] and "Peak learning rate" in rows["text_lr"]


def test_train_config_prints_the_resolved_config_and_refuses_unknown_keys():
    result = runner.invoke(train_app, ["config", "-c", "demo-cpu", "-s", "lr=0.5"])
    assert result.exit_code == 0 and json.loads(result.output)["lr"] == 0.5
    result = runner.invoke(train_app, ["config", "-c", "demo-cpu", "-s", "lrr=0.5"])
    assert result.exit_code == 2 and "unknown config key 'lrr'" in result.output


def test_committed_cli_reference_is_the_generated_one():
    from pathlib import Path

    from hlip.cli_docs import markdown

    committed = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert committed == markdown(), "docs/cli.md is stale: python -m hlip.cli_docs > docs/cli.md"
