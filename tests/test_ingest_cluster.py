"""Ingest on clusters as users run them: separate ``dask scheduler`` and ``dask worker``
processes, workers killed mid-build (a retry, never a corrupt or repeated sample), and a
study that kills its worker every time (a ``resource_limit`` reject; the rest goes on)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_ingest_pipeline import SMALL, files_table, output_bytes, small_config

from hlip.ingest import deid, pipeline
from hlip.shards.reader import ShardDataset
from hlip.synth import make_archive

REPO = Path(__file__).resolve().parents[1]
START_S = 60
"""Upper bound on a scheduler or worker process start (fails loudly beyond it)."""


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("synth") / "archive", 3, seed=11, sizes=SMALL)


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    pipeline.run_ingest([archive.root], out, small_config(archive), workers=0)
    return out


def _key(archive, n: int) -> str:
    return deid.study_key(archive.studies[n].study_uid, b"test-secret")


def _environment() -> dict:
    """This checkout first on the path of every process the tests start."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=_environment(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    process.stderr.close()


def _dask(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "distributed.cli.dask_" + arguments[0], *arguments[1:]]


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, workers: int = 2):
    """``dask scheduler`` and ``dask worker`` as their own processes on a random local
    port; yields the scheduler's address."""
    from distributed import Client

    scheduler_file = tmp_path / "scheduler.json"
    scheduler = _start(
        _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(scheduler_file))
    )  # fmt: skip
    processes = [scheduler]
    try:
        deadline = time.monotonic() + START_S
        while not scheduler_file.exists() and scheduler.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scheduler_file.exists(), scheduler.stderr.read().decode()[-2000:]
        address = json.loads(scheduler_file.read_text())["address"]
        processes.append(
            _start(
                _dask("worker", address, "--nworkers", str(workers), "--nthreads", "1", "--no-dashboard",
                      "--memory-limit", "2GiB")
            )
        )  # fmt: skip
        with Client(address) as client:
            client.wait_for_workers(workers, timeout=START_S)
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


def _ingest_command(archive, out: Path, address: str) -> list[str]:
    return [
        sys.executable, "-m", "hlip.ingest.cli", "run", str(archive.root), "--out", str(out),
        "--reports", str(archive.reports_csv), "--spacing", "CT=5,4,4", "--secret", "test-secret",
        "--scheduler", address,
    ]  # fmt: skip


def test_ingest_through_separate_scheduler_and_worker_processes(archive, reference, tmp_path):
    """``hlip-ingest run --scheduler`` on a cluster of its own processes: the bytes of the
    serial run."""
    out = tmp_path / "out"
    with dask_cluster(tmp_path) as address:
        command = _ingest_command(archive, out, address)
        subprocess.run(command, check=True, env=_environment(), stdout=subprocess.DEVNULL, timeout=600)
    assert output_bytes(out) == output_bytes(reference)
    assert files_table(out) == files_table(reference)


def test_a_client_killed_mid_run_resumes_to_the_same_bytes(archive, reference, tmp_path):
    """SIGKILL the ``hlip-ingest`` process once its first study is built, then run the same
    command again: it takes over the dead run's lock, keeps what was done and ends with the
    bytes of an uninterrupted run."""
    out = tmp_path / "out"
    outcomes = out / pipeline.INGEST_DIR / pipeline.OUTCOMES_DIR
    with dask_cluster(tmp_path) as address:
        command = _ingest_command(archive, out, address)
        client = _start(command)
        deadline = time.monotonic() + 300
        while client.poll() is None and not any(outcomes.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()
        client.stderr.close()
        assert any(outcomes.glob("*.json")) and not (out / "_versions").exists(), "not killed mid-run"
        subprocess.run(command, check=True, env=_environment(), stdout=subprocess.DEVNULL, timeout=600)
    assert output_bytes(out) == output_bytes(reference)
    assert files_table(out) == files_table(reference)


def test_killed_workers_cost_a_retry_and_a_study_that_always_kills_is_rejected(archive, reference, tmp_path):
    """One study kills its worker (SIGKILL) on the first try only: it is built on the
    retry, into the same bytes. Another kills it on every try: after
    ``allowed-failures`` it becomes a ``resource_limit`` reject and the run finishes."""
    import dask
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import WorkerPlugin

    once, always, marker = _key(archive, 0), _key(archive, 1), tmp_path / "killed-once"

    class KillOnBuild(WorkerPlugin):
        """Makes this worker process die while building the chosen studies."""

        def setup(self, worker):
            from hlip.ingest import pipeline as worker_pipeline

            build = worker_pipeline.build_study

            def killing_build(task, config):
                if task.key == always or (task.key == once and not marker.exists()):
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                return build(task, config)

            worker_pipeline.build_study = killing_build

    out = tmp_path / "out"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(KillOnBuild())
        summary = pipeline.run_ingest([archive.root], out, small_config(archive), client=client)
    assert marker.exists()
    expected = ShardDataset(reference)
    dataset = ShardDataset(out)
    assert sorted(dataset.keys()) == sorted(key for key in expected if key != always)
    for key in dataset:
        assert dataset.read_members(key, verify=True) == expected.read_members(key, verify=True)
    assert summary.studies_staged == len(archive.studies) - 1 and summary.studies_rejected == 1
    rows = {row["file_id"]: row for row in files_table(out)}
    assert rows.keys() == {row["file_id"] for row in files_table(reference)}
    always_rows = [row for row in rows.values() if row["study_key"] == always]
    assert always_rows and {row["reason"] for row in always_rows} == {"resource_limit"}
