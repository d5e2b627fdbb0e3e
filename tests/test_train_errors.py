"""Expected failures of a training run: one line, no traceback, no half-made run folder;
damaged shards are counted by reason, and a configurable share of them stops the run."""

from __future__ import annotations

import builtins
import pickle

import pytest
from train_support import corrupt_chunks, corrupt_json, tiny_config, tiny_overrides, write_fake_dataset
from typer.testing import CliRunner

from hlip.model.checkpoint import CheckpointError, load_torch_file
from hlip.shards.reader import ShardDataset
from hlip.train.cli import app
from hlip.train.loop import TooManySkippedError, train

runner = CliRunner()


class _RunsCode:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self):
        return builtins.print, ("pwned",)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_fake_dataset(tmp_path_factory.mktemp("errors") / "ds", 8)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """12 studies, 3 of them damaged (one JSON, two voxel members)."""
    path = write_fake_dataset(tmp_path_factory.mktemp("damaged") / "ds", 12, max_shard_bytes=60_000)
    keys = sorted(ShardDataset(path).keys())
    corrupt_json(path, keys[1])
    corrupt_chunks(path, keys[4])
    corrupt_chunks(path, keys[7])
    return path


def one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()  # the resolved config (JSON) may come first
    assert lines[-1].startswith("error: ") and text in lines[-1], result.output
    assert sum(line.startswith("error: ") for line in lines) == 1


def invoke(overrides: list[str]):
    return runner.invoke(app, ["run", "--config", "demo-cpu", *(x for o in overrides for x in ("--set", o))])


def test_a_pickle_that_runs_code_is_refused_as_a_checkpoint(tmp_path, dataset):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": _RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"not an hlip checkpoint \(refusing to unpickle code\)"):
        load_torch_file(evil)
    run = tmp_path / "run"
    result = invoke(tiny_overrides(dataset, run, "steps=1", f'init_checkpoint="{evil}"'))
    one_line_error(result, "not an hlip checkpoint (refusing to unpickle code)")
    assert "pwned" not in result.output and not run.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        load_torch_file(garbage)


def test_an_unknown_config_key_is_one_line_with_a_suggestion(tmp_path, dataset):
    run = tmp_path / "run"
    result = invoke(tiny_overrides(dataset, run, "stpes=3"))
    one_line_error(result, "unknown config key 'stpes'; did you mean steps")
    assert not run.exists()


@pytest.mark.parametrize("data", ["missing-dir", "missing/ds-{000000..000003}.tar", "missing/*.tar"])
def test_data_that_does_not_exist_is_one_line_and_writes_no_run_folder(tmp_path, data):
    run = tmp_path / "run"
    result = invoke(tiny_overrides([tmp_path / data], run, "steps=1"))
    one_line_error(result, "no such dataset folder or shard file")
    assert not run.exists()


def test_skipped_studies_are_counted_by_reason_at_the_end(damaged, tmp_path):
    config = tiny_config(damaged, tmp_path / "run", "steps=6", "shuffle_buffer=0", "max_skipped_share=1")
    result = train(config)
    assert set(result.skipped) == {
        "ShardFormatError: zarr.zip: entry is damaged",  # the two studies whose voxels are zeroed
        "ShardFormatError: sample JSON does not parse",
    }, result.skipped
    assert sum(result.skipped.values()) >= 3


def test_a_share_of_skipped_studies_above_the_limit_stops_the_run(damaged, tmp_path):
    config = tiny_config(damaged, tmp_path / "run", "steps=6", "shuffle_buffer=0", "max_skipped_share=0.1")
    with pytest.raises(
        TooManySkippedError, match=r"studies read were skipped \(\d+% > max_skipped_share 10%\)"
    ):
        train(config)
