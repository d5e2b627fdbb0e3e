"""Object storage: ingest into ``s3://``, inspect, stream and grow it there.

Runs against a real S3-compatible server (moto's server mode, on a random loopback port),
reached through s3fs exactly as a user's bucket would be: only the endpoint differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import fsspec
import pytest
from test_ingest_pipeline import SMALL, small_config
from typer.testing import CliRunner

from hlip.ingest import pipeline
from hlip.ingest.lock import LOCK_FILE, IngestLocked
from hlip.shards.cli import app as shards_app
from hlip.shards.reader import ShardDataset
from hlip.shards.stream import stream_studies
from hlip.synth import make_archive

BUCKET = "hlip-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket on a moto server at 127.0.0.1:<random port>; AWS_* variables point at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        pipeline.WORK_ENV: str(tmp_path_factory.mktemp("work")),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("synth") / "archive", 4, seed=3, sizes=SMALL)


def _digests(url: str) -> dict[str, str]:
    """sha256 of every object (or file) under ``url``, by relative name."""
    fs, root = fsspec.core.url_to_fs(url)
    return {
        path[len(root) + 1 :]: hashlib.sha256(fs.cat_file(path)).hexdigest()
        for path in sorted(fs.find(root))
        if not path[len(root) + 1 :].startswith(pipeline.INGEST_DIR)
    }


def test_ingest_into_s3_inspect_stream_and_rerun(s3, archive, tmp_path):
    url = f"{s3}/ds"
    summary = pipeline.run_ingest([archive.root], url, small_config(archive), workers=0)
    assert summary.version == 1 and summary.studies_staged == len(archive.studies)
    local = tmp_path / "local"
    pipeline.run_ingest([archive.root], local, small_config(archive), workers=0)
    remote = _digests(url)
    assert remote == _digests(str(local))  # the same bytes on a disk and in a bucket
    assert not any(name.startswith("_staging") or name == LOCK_FILE for name in remote)

    runner = CliRunner()
    listed = runner.invoke(shards_app, ["ls", url])
    assert listed.exit_code == 0, listed.output
    dataset = ShardDataset(url)
    assert all(key in listed.output for key in dataset)
    verified = runner.invoke(shards_app, ["verify", url])
    assert verified.exit_code == 0 and f"{len(dataset)} studies verified" in verified.output

    streamed = {study.key: study for study in stream_studies(url, shardshuffle=False)}
    assert sorted(streamed) == dataset.keys()
    for key, study in streamed.items():
        opened = dataset.open(key)
        assert study.report == opened.report
        assert [s.array[...].tobytes() for s in study.scans] == [s.array[...].tobytes() for s in opened.scans]

    again = pipeline.run_ingest([archive.root], url, small_config(archive), workers=0)
    assert again.version is None and _digests(url) == remote


def test_a_lock_held_on_s3_refuses_a_second_ingest(s3, archive):
    url = f"{s3}/locked"
    fs, root = fsspec.core.url_to_fs(url)
    holder = {"host": "another-host", "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps(holder).encode())
    with pytest.raises(IngestLocked, match="pid 4242 on another-host"):
        pipeline.run_ingest([archive.root], url, small_config(archive), workers=0)
    assert not fs.exists(f"{root}/_versions")
    assert Path(pipeline.ingest_dir(url)).parent.parent == Path(os.environ[pipeline.WORK_ENV])
