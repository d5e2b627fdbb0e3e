"""Stream studies from shards with webdataset, split exactly across ranks and workers.

Every (rank, DataLoader worker) pair is one *consumer*. The shard list is permuted with
a generator seeded by ``(seed, epoch)`` (identical on every consumer), then split by
rank and then by worker. Each split hands out whole shards while there are at least as
many shards as consumers; otherwise the consumers that share a shard each take every
k-th sample of it. Both rules partition the samples, so each study is read by exactly
one consumer per epoch whatever the shard, rank and worker counts.

webdataset's ``WebDataset`` class is not used directly: it shuffles shards after the
node/worker split (so a consumer would see the same shards every epoch) and drops the
per-shard information a sample-level split needs. The pipeline below is built from its
stages instead (``url_opener`` for local paths and ``pipe:``/http URLs, ``group_by_keys``,
``shuffle``), with no empty check: a consumer with nothing to read yields nothing. Tar
members are listed by :func:`tar_files`, which reads a local shard's members in one call
each.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import group_by_keys, url_opener

from hlip.shards import format as fmt
from hlip.shards.format import ShardFormatError
from hlip.shards.reader import ShardDataset, decode_study
from hlip.shards.storage import Location, is_remote
from hlip.shards.versions import VERSIONS_DIR

log = logging.getLogger(__name__)

UrlSource = str | os.PathLike | ShardDataset | Sequence[str | os.PathLike]


def is_dataset(text: str) -> bool:
    """Whether ``text`` names a dataset root (local or object store) rather than shards."""
    if text.startswith("pipe:") or text.endswith(".tar") or (not is_remote(text) and not os.path.isdir(text)):
        return False
    location = Location(text)
    return location.exists(fmt.MANIFEST_FILE) or bool(location.list(VERSIONS_DIR))


def resolve_sources(source: UrlSource, version: int | None = None) -> list[str | ShardDataset]:
    """``source`` as a list of datasets (opened at ``version``) and plain shard URLs."""
    if isinstance(source, ShardDataset):
        return [source]
    if isinstance(source, Sequence) and not isinstance(source, str):
        return [item for part in source for item in resolve_sources(part, version)]
    text = os.fspath(source)
    if is_dataset(text):
        return [ShardDataset(text, version=version)]
    if os.path.isdir(text):
        return sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
    if (
        not text.startswith("pipe:")
        and "://" not in text
        and glob.has_magic(text.replace("{", "").replace("}", ""))
    ):
        return sorted(glob.glob(text))
    return wds.shardlists.expand_urls(text)


def locate(source: UrlSource, version: int | None = None) -> tuple[list[str], dict[str, frozenset[str]]]:
    """The shard URLs of ``source`` and, for its datasets, the keys each shard serves at
    ``version`` (:func:`dataset_members`): what a :class:`StudyStream` reads."""
    items = resolve_sources(source, version)
    return _urls(items), dataset_members(items)


def expand_urls(source: UrlSource, version: int | None = None) -> list[str]:
    """Shard URLs from a dataset (local directory or object-store URL, via its manifest at
    ``version``), a ShardDataset, a glob, brace notation (``ds-{000000..000009}.tar``),
    ``::``-joined lists, or a list of these."""
    return _urls(resolve_sources(source, version))


def _urls(items: Sequence[str | ShardDataset]) -> list[str]:
    return [
        url for item in items for url in (item.shard_paths() if isinstance(item, ShardDataset) else [item])
    ]


def dataset_members(items: Sequence[str | ShardDataset]) -> dict[str, frozenset[str]]:
    """``shard URL -> keys`` that the datasets among ``items`` read from each of their
    shards: a study rebuilt in a later version leaves its old sample in an older shard."""
    members: dict[str, set[str]] = {}
    for item in items:
        if isinstance(item, ShardDataset):
            for key, shard in item.where().items():
                members.setdefault(item.location.uri(shard), set()).add(key)
    return {url: frozenset(keys) for url, keys in members.items()}


@dataclass(frozen=True)
class ShardPart:
    """The samples of shard ``url`` whose index ``i`` satisfies ``i % stride == offset``."""

    url: str
    stride: int = 1
    offset: int = 0


def split_parts(parts: list[ShardPart], index: int, count: int) -> list[ShardPart]:
    """Consumer ``index`` of ``count``: whole parts when there are enough, else a
    sample-level share of one part. Over all indices the result partitions ``parts``."""
    if count <= 1 or not parts:
        return parts
    if len(parts) >= count:
        return parts[index::count]
    which = index % len(parts)
    part = parts[which]
    sharing = len(range(which, count, len(parts)))
    share = index // len(parts)
    return [ShardPart(part.url, part.stride * sharing, part.offset + part.stride * share)]


_META_MEMBER = re.compile(r"__[^/]*__($|/)")
"""Names of tar members that are not sample files (webdataset's convention)."""


def tar_files(source: dict[str, Any], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The regular files of one opened shard as ``{"fname", "data", "__url__"}`` records,
    which webdataset's ``group_by_keys`` groups into samples.

    A seekable shard (a local file) is read member by member with one read call each;
    streams (``pipe:``, http) go through tarfile's stream mode, which reads 10 KiB records
    and joins them: about 2 ms of a training worker's CPU per 2 MB scan. A shard that
    stops parsing (truncated, corrupt header) goes to ``handler`` with its URL as the
    exception's last argument, and the rest of that shard is skipped. tarfile takes a cut
    or damaged header for the end of the archive; a seekable shard is therefore also checked
    to end with the end-of-archive block, so that its lost tail is reported. (A stream cut
    inside a header ends quietly, as in webdataset; a cut inside a member raises.)
    """
    stream, url = source["stream"], source["url"]
    seekable = getattr(stream, "seekable", None)
    seekable = seekable is not None and seekable()
    try:
        with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
            for info in tar:
                if info.isreg() and not _META_MEMBER.match(info.name):
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                tar.members = []  # not kept: a shard holds thousands of members
            if seekable:
                stream.seek(tar.offset)
                if stream.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    raise tarfile.ReadError(f"truncated tar: no end-of-archive block at byte {tar.offset}")
    except (tarfile.TarError, OSError, EOFError) as error:
        error.args = (*error.args, url)
        handler(error)
    finally:
        stream.close()


def open_shard(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` of one shard: object-store URLs (``s3://``) through fsspec
    (a seekable file, read member by member), everything else through webdataset."""
    scheme = url.split("://", 1)[0] if is_remote(url) else ""
    if not scheme or scheme in gopen_schemes:
        yield from url_opener([{"url": url}], handler=handler)
        return
    try:
        stream = fsspec.open(url, "rb").open()
    except OSError as error:
        error.args = (*error.args, url)
        handler(error)
        return
    yield {"url": url, "stream": stream}


def iter_part(part: ShardPart, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__`` and member bytes) of one shard part."""
    files = (record for source in open_shard(part.url, handler) for record in tar_files(source, handler))
    for index, sample in enumerate(group_by_keys(files, handler=handler)):
        if index % part.stride == part.offset:
            yield sample


class ErrorCounter:
    """Counts samples skipped by a stream with ``skip_errors``, summed over DataLoader
    workers (shared memory), and passes each ``(key or url, exception)`` to ``callback``."""

    def __init__(self, callback: Callable[[str, Exception], None] | None = None) -> None:
        self._count = multiprocessing.Value("q", 0)
        self.callback = callback

    @property
    def count(self) -> int:
        return int(self._count.value)

    def record(self, where: str, error: Exception) -> None:
        with self._count.get_lock():
            self._count.value += 1
        log.warning("skipped %s: %s", where, error)
        if self.callback is not None:
            self.callback(where, error)


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StudyStream(IterableDataset):
    """An IterableDataset of Study objects (or raw samples); see :func:`stream_studies`."""

    def __init__(
        self,
        urls: list[str],
        *,
        shuffle_buffer: int = 0,
        shardshuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        decode: bool = True,
        skip_errors: bool = False,
        keys: Collection[str] | None = None,
        members: dict[str, frozenset[str]] | None = None,
        errors: ErrorCounter | None = None,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.urls = list(urls)
        self.shuffle_buffer = shuffle_buffer
        self.shardshuffle = shardshuffle
        self.seed = seed
        self.epoch = epoch
        self.rank, self.world_size = rank, world_size
        self.decode = decode
        self.skip_errors = skip_errors
        self.keys = None if keys is None else frozenset(keys)
        self.members = members or {}
        self.errors = errors if errors is not None else ErrorCounter()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (takes effect when DataLoader workers restart)."""
        self.epoch = epoch

    def consumer(self) -> tuple[int, int, int, int]:
        """``(rank, world_size, worker, num_workers)`` of the current process."""
        rank, world_size = (self.rank, self.world_size) if self.rank is not None else _distributed_rank()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world_size, worker, num_workers

    def parts(self) -> list[ShardPart]:
        """This consumer's share of the epoch's (shuffled) shard list."""
        parts = [ShardPart(url) for url in self.urls]
        if self.shardshuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(parts))
            parts = [parts[i] for i in order]
        rank, world_size, worker, num_workers = self.consumer()
        return split_parts(split_parts(parts, rank, world_size), worker, num_workers)

    def _handler(self, error: Exception) -> bool:
        if not self.skip_errors:
            raise error
        self.errors.record(str(error.args[-1]) if error.args else "shard", error)
        return True

    def samples(self) -> Iterator[dict[str, Any]]:
        """Raw samples of this consumer, after the key filter and the shuffle buffer."""
        samples = (s for part in self.parts() for s in iter_part(part, self._handler))
        if self.members:
            samples = (s for s in samples if s["__key__"] in self.members.get(s["__url__"], (s["__key__"],)))
        if self.keys is not None:
            samples = (s for s in samples if s["__key__"] in self.keys)
        if self.shuffle_buffer > 0:
            rank, _, worker, _ = self.consumer()
            seed = int(np.random.default_rng([self.seed, self.epoch, rank, worker]).integers(2**63))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(samples)
        return samples

    def __iter__(self) -> Iterator[Any]:
        for sample in self.samples():
            if not self.decode:
                yield sample
                continue
            key = sample["__key__"]
            members = {ext: sample[ext] for ext in fmt.MEMBERS if ext in sample}
            try:
                study = decode_study(key, members)
            except Exception as error:
                if not self.skip_errors:
                    raise ShardFormatError(f"study {key!r} in {sample.get('__url__')}: {error}") from error
                self.errors.record(key, error)
                continue
            yield study


def stream_studies(
    source: UrlSource,
    *,
    shuffle_buffer: int = 0,
    shardshuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    decode: bool = True,
    skip_errors: bool = False,
    keys: Collection[str] | None = None,
    on_error: Callable[[str, Exception], None] | None = None,
    version: int | None = None,
) -> StudyStream:
    """Stream the studies of ``source`` as an IterableDataset for a DataLoader.

    ``source`` is a dataset directory, a (filtered) :class:`ShardDataset`, a glob, brace
    notation, or a list of paths/URLs (anything webdataset opens, ``pipe:`` included).
    ``rank``/``world_size`` default to torch.distributed when it is initialised.
    ``shardshuffle`` permutes shards per ``(seed, epoch)``; ``shuffle_buffer`` > 0 adds a
    sample shuffle. Use ``DataLoader(stream, batch_size=None)`` to receive Study objects.
    With ``skip_errors`` bad samples are skipped and counted in ``stream.errors`` (and
    passed to ``on_error``); otherwise the first one raises ShardFormatError naming it.
    ``keys`` restricts the stream to those studies (a filtered ShardDataset does it too).
    A dataset is read at ``version`` (default: its latest; :mod:`hlip.shards.versions`):
    only the samples that version holds, not the older samples of studies it rebuilt.
    """
    urls, members = locate(source, version)
    if not urls:
        raise FileNotFoundError(f"no shards found for {source!r}")
    return StudyStream(
        urls,
        shuffle_buffer=shuffle_buffer,
        shardshuffle=shardshuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        decode=decode,
        skip_errors=skip_errors,
        keys=keys,
        members=members,
        errors=ErrorCounter(on_error),
    )
