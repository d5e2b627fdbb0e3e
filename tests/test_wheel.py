"""The built wheel works outside the clone: synth -> ingest -> 2 training steps -> export -> eval."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANO = [
    'model_overrides.vision={name = "vit_nano_multiscan_h3"}',
    "model_overrides.text={context_length = 16}",
]


def sh(*args, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_wheel_runs_the_four_tools_outside_the_clone(tmp_path):
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    sh(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("hlip-*.whl")
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip()
    # the dependencies (torch included) come from this interpreter's site-packages, not a download
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    located = sh(python, "-c", "import hlip; print(hlip.__file__)", cwd=work)
    assert str(venv) in located and str(ROOT) not in located
    bin_ = venv / "bin"
    sh(bin_ / "hlip-ingest", "synth", "--out", "archive", "--studies", "4", "--ct-matrix", "64", cwd=work)
    sh(bin_ / "hlip-ingest", "run", "archive", "--reports", "archive/reports.csv", "-o", "shards",
       "--spacing", "CT=10,8,8", "--spacing", "MR=10,5.2,5.2", "--workers", "0", cwd=work)  # fmt: skip
    sets = [
        item for s in [*NANO, "batch_size=2", "progress=false", "tensorboard=false"] for item in ("-s", s)
    ]
    sh(bin_ / "hlip-train", "run", "shards", "-c", "demo-cpu", "--steps", "2", "-o", "run", *sets, cwd=work)
    sh(bin_ / "hlip-train", "export", "run", "-o", "model", cwd=work)
    out = sh(bin_ / "hlip-eval", "run", "shards", "-m", "model", "--tasks", "retrieval", "--bootstrap", "10",
             "-o", "eval", cwd=work)  # fmt: skip
    prompts = sh(
        python,
        "-c",
        "from hlip.evaluate.prompts import load_prompts; print(load_prompts('synth').source)",
        cwd=work,
    )
    assert prompts.startswith(str(venv))
    assert (work / "eval" / "metrics.json").is_file(), out
