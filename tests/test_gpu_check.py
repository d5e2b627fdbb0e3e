"""bench/gpu_check.py on CPU: its plumbing end to end (--dry-run) and the hlip-train runs it makes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from bench_support import BENCH, load_bench

from hlip.model.factory import resolve_model_config
from hlip.train.checkpoint import model_kwargs
from hlip.train.config import load_config

SCRIPT = BENCH / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_bench("gpu_check")


def test_dry_run_writes_every_section(tmp_path):
    """Accuracy, kernels, trunk steps eager and compiled, syncs and profile, in one markdown block
    (the hlip-train runs, two subprocesses of 15-25 s each here, are checked below by their config)."""
    out = tmp_path / "gpu.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--skip-train", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("#### GPU check: CPU (dry run)") and "| sdpa | 0.000e+00 | 0.000e+00 |" in text
    assert "| 2 | 2 | sdpa | eager | 32 |" in text and "| 2 | 2 | sdpa | compiled | 32 |" in text
    assert "Host synchronisations in one compiled auto step" in text and "| attention |" in text
    failed = [line for line in text.splitlines() if "failed" in line or "skipped" in line]
    assert all(line.startswith("| flex (candidate) |") for line in failed), failed  # no CPU backward


@pytest.mark.parametrize("dry", [True, False])
def test_train_runs_resolve_to_the_intended_config(gpu_check, tmp_path, dry):
    """The commands' presets and overrides load, and the ct-rate one runs on the built-in text
    tower (there is no CXR-BERT on the GPU machine)."""
    settings = ["attention=auto", "compile=true", "sync_debug=true"]
    command = gpu_check.train_command(dry, tmp_path / "shards", tmp_path / "run", settings, 50, 12)
    preset = command[command.index("--config") + 1]
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    config = load_config(preset, sets)
    assert (config.steps, config.num_workers, config.data) == (50, 12, [str(tmp_path / "shards")])
    assert config.attention == "auto" and config.compile and config.sync_debug
    model = resolve_model_config(config.model, **model_kwargs(config, "cuda"))
    assert model["text"]["path"] is None
    if not dry:
        assert config.model == "hlip-ct-rate" and config.batch_size == 16 and config.lock_text
        assert model["vision"]["name"] == "vit_base_singlescan_h2_token2744" and model["precision"] == "bf16"
