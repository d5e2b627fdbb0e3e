"""Where a dataset lives: a local directory or an object-store prefix (``s3://bucket/prefix``).

Writers and readers name files relative to the dataset root and call a :class:`Location`,
so the same code writes and reads a dataset on a local disk and through fsspec on an
object store. The two operations a dataset's consistency rests on are:

* :meth:`Location.write` puts a whole file at once: a local file is written under a
  temporary name, fsynced and renamed; an object-store PUT is atomic by itself;
* :meth:`Location.create` puts a file only if it does not exist yet, and says whether it
  did: a local hard link of a complete temporary file (``link`` fails on an existing
  name), or a PUT with ``If-None-Match: *`` on an object store. Two committers of the same
  dataset version therefore cannot both win.

Object-store credentials and endpoints come from the usual environment (``AWS_*`` variables,
``AWS_ENDPOINT_URL`` for an S3-compatible server) as s3fs reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import uuid
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_remote(root: str | os.PathLike) -> bool:
    """Whether ``root`` names an object store (``scheme://...``) rather than a local path."""
    text = os.fspath(root)
    return "://" in text and not text.startswith("file://")


class Location:
    """A dataset root; every name is a ``/``-separated path relative to it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.url = os.fspath(root).rstrip("/") or "/"
        # Listings are not cached: other processes add files (staged samples, versions).
        options = {"use_listings_cache": False} if is_remote(self.url) else {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        """The filesystem path of ``name`` (what ``self.fs`` takes)."""
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        """A path or URL of ``name`` that webdataset, fsspec or ``open`` accept."""
        return self.path(name) if self.local else f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def open(self, name: str, mode: str = "rb") -> IO[Any]:
        return self.fs.open(self.path(name), mode)

    def modified(self, name: str) -> str:
        """When ``name`` was last written, as UTC ISO 8601 to the second."""
        stamp = self.fs.modified(self.path(name))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.UTC)
        return stamp.astimezone(datetime.UTC).isoformat(timespec="seconds")

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def list(self, folder: str = "") -> list[str]:
        """Names (relative to the root) of the files directly in ``folder``; [] if none."""
        base = self.path(folder) if folder else self.root
        options = {} if self.local else {"refresh": True}
        try:
            entries = self.fs.ls(base, detail=False, **options)
        except FileNotFoundError:
            return []
        prefix = f"{folder}/" if folder else ""
        return sorted(prefix + entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def find(self) -> list[str]:
        """Names of every file under the root, in any folder, sorted."""
        start = len(self.root.rstrip("/")) + 1
        return sorted(path[start:] for path in self.fs.find(self.root))

    def write(self, name: str, data: bytes) -> None:
        """Put ``data`` at ``name`` as one whole file (replacing an older one)."""
        if self.local:
            from hlip.shards.writer import write_bytes_atomic

            path = Path(self.path(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def upload(self, local_path: Path, name: str) -> None:
        """Copy a complete local file to ``name`` (an object-store PUT, or a local rename)."""
        if self.local:
            target = Path(self.path(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_path, target)
        else:
            self.fs.put_file(str(local_path), self.path(name))

    def create(self, name: str, data: bytes) -> bool:
        """Put ``data`` at ``name`` only if nothing is there; False when something was."""
        if not self.local:
            try:
                self.fs.pipe_file(self.path(name), data, mode="create")
            except FileExistsError:
                return False
            except OSError as error:  # s3fs reports a failed precondition as a plain OSError
                if "PreconditionFailed" in str(error) or "412" in str(error):
                    return False
                raise
            return True
        from hlip.shards.writer import write_bytes_atomic

        target = Path(self.path(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        write_bytes_atomic(tmp, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete(self, name: str) -> None:
        """Remove the file ``name`` if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def delete_folder(self, name: str) -> None:
        """Remove the folder ``name`` and everything in it, if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(name), recursive=True)
