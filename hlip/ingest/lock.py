"""One ingest at a time per output dataset: a lock file at ``<out>/_ingest.lock``.

The lock is a small JSON file naming its holder (host, process id, start time), created
with create-if-absent semantics (:meth:`hlip.shards.storage.Location.create`: an exclusive
hard link locally, a conditional PUT on an object store), and removed when the ingest ends,
however it ends short of being killed.

A lock left by a killed ingest is *stale*. It is taken over automatically when its holder
ran on this host and that process is gone; a lock held from another host cannot be judged
from here, so the error names the holder and the file to delete once no ingest runs there.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator

from hlip.shards.format import LOCK_FILE
from hlip.shards.storage import Location

__all__ = ["LOCK_FILE", "IngestLocked", "ingest_lock"]


class IngestLocked(FileExistsError):
    """Another ingest holds the output's lock."""


def _holder() -> dict:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(holder: dict) -> bool:
    """Whether the holder ran on this host and its process is gone."""
    return holder.get("host") == socket.gethostname() and not _process_alive(int(holder.get("pid", 0)))


def _read_holder(location: Location) -> dict:
    try:
        holder = json.loads(location.read_bytes(LOCK_FILE))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"host": "?", "pid": "?", "started": "?"}
    return holder if isinstance(holder, dict) else {}


def _acquire(location: Location, record: bytes) -> None:
    for _ in range(2):
        if location.create(LOCK_FILE, record):
            return
        holder = _read_holder(location)
        if holder and not _is_stale(holder):
            raise IngestLocked(
                f"another ingest holds {location}: pid {holder.get('pid')} on {holder.get('host')} "
                f"since {holder.get('started')}; wait for it, or delete {location.uri(LOCK_FILE)} "
                "if no ingest runs there"
            )
        location.delete(LOCK_FILE)  # stale (or removed meanwhile): take it over once
    raise IngestLocked(f"could not take the lock {location.uri(LOCK_FILE)}: another ingest keeps taking it")


@contextlib.contextmanager
def ingest_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``<out>/_ingest.lock`` for the block; IngestLocked names another holder."""
    location = Location(out)
    created = location.local and not os.path.exists(location.root)
    if created:
        os.makedirs(location.root)
    record = json.dumps(_holder(), sort_keys=True).encode()
    try:
        _acquire(location, record)
        yield
    finally:
        if location.exists(LOCK_FILE) and location.read_bytes(LOCK_FILE) == record:
            location.delete(LOCK_FILE)
        if created and not os.listdir(location.root):
            os.rmdir(location.root)  # a run refused before it wrote anything leaves no folder
