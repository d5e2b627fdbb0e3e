"""Studies from shards to training batches: filter, transform, tokenize, pack.

The pipeline, one stage per name (webdataset style):

``stream_studies`` (shards -> Study with lazy arrays, split over ranks x workers)
-> :class:`StudyFilter` -> :class:`StudyTransform` (crop, intensity, scan and text sampling)
-> :class:`Collate` (tokenize + :func:`hlip.model.packing.pack_studies`) -> :class:`Batch`.

Determinism, which exact resume relies on: the order of studies a reader sees is a pure
function of ``(seed, epoch, rank, worker)`` (the shard stream's shuffles are seeded by
those), and every random choice of the transform is drawn from a generator seeded by
``(seed, epoch, study key)``. A reader's position is therefore two integers, the epoch and
the number of studies consumed in it; resuming skips that many studies (their arrays are
never decoded) and reads again the few it had read but not yet batched
(:mod:`hlip.train.grouping`). :class:`TrainStream` chains epochs without end, so batches are always full,
ranks never wait for each other at an epoch boundary, and every study is used exactly once
per epoch (a batch may hold the end of one epoch and the start of the next).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hlip.model.packing import PatchBuffers, pack_studies
from hlip.model.text import split_sentences
from hlip.shards.format import Scan, Study
from hlip.shards.reader import read_slices
from hlip.train.config import TrainConfig
from hlip.train.grouping import MIXED, BatchGrouper, study_group
from hlip.train.windows import body_region, region_windows

log = logging.getLogger(__name__)

MAX_EMPTY_EPOCHS = 16
"""A reader that finds no study in this many epochs in a row stops (it has no share of the
data: fewer studies than ranks x workers); the other readers of its rank carry on."""

_HEADING = re.compile(r"^\s*([A-Za-z][A-Za-z &/-]{0,40}):\s*(.*)$")
"""A report section heading line ("FINDINGS:", "Clinical information: ..."), maybe with text."""


# --- per-study transform ----------------------------------------------------------------------


def report_sections(report: str) -> dict[str, str]:
    """Sections of a report by lower-case heading ("findings", "impression", ...); text
    before the first heading is under ``""``."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in report.splitlines():
        heading = _HEADING.match(line)
        if heading:
            current = heading.group(1).strip().lower()
            sections.setdefault(current, [])
            line = heading.group(2)
        if line.strip():
            sections[current].append(line.strip())
    return {name: "\n".join(lines) for name, lines in sections.items() if lines}


def select_sections(report: str, names: Sequence[str]) -> str:
    """The named sections of a report in the given order, or the whole report when it has
    none of them (reports without headings pass unchanged)."""
    if not names:
        return report
    sections = report_sections(report)
    chosen = [sections[name.lower()] for name in names if name.lower() in sections]
    return "\n".join(chosen) if chosen else report


def study_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of every random choice made for one study in one epoch."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, digest])


@dataclass(frozen=True)
class AxisCrop:
    """Along one axis: read source voxels ``[start, stop)`` and pad ``before``/``after`` them."""

    start: int
    stop: int
    before: int = 0
    after: int = 0


def crop_axes(
    shape: Sequence[int], size: Sequence[int], rng: np.random.Generator | None, pad: bool = True
) -> list[AxisCrop]:
    """A window of ``size`` over a volume of ``shape``: random offsets when ``rng`` is given,
    centred otherwise; axes shorter than ``size`` are read whole and padded evenly (if ``pad``)."""
    axes = []
    for n, s in zip(shape, size, strict=True):
        if n >= s:
            start = int(rng.integers(0, n - s + 1)) if rng is not None else (n - s) // 2
            axes.append(AxisCrop(start, start + s))
        else:
            missing = s - n if pad else 0
            axes.append(AxisCrop(0, n, missing // 2, missing - missing // 2))
    return axes


def read_crop(scan: Scan, axes: Sequence[AxisCrop]) -> np.ndarray:
    """The crop's stored int16 voxels.

    Only the slabs of slices the window overlaps are decompressed (:func:`read_slices`), before
    anything is converted.
    """
    depth, *plane = axes
    slices = read_slices(scan.array, depth.start, depth.stop)
    return slices[(slice(None), *(slice(a.start, a.stop) for a in plane))]


@dataclass(frozen=True)
class UnitMap:
    """``stored value -> clip(stored * scale + offset, 0, ceiling)``: a scan's intensities to
    [0, 1], or up to ``ceiling`` for values above the range that maps to 1.

    Windowing and percentile normalisation are both affine then clipped, so each is one
    UnitMap, and with the standardisation folded in the whole intensity path is four
    in-place passes over the crop (cast to float32, multiply, add, clip).
    """

    scale: float
    offset: float
    ceiling: float = 1.0


def window_map(scan: Scan, low: float, high: float) -> UnitMap:
    """CT window in physical units (``low`` HU -> 0, ``high`` HU -> 1) on stored values."""
    width = high - low
    return UnitMap(scan.intensity_slope / width, (scan.intensity_intercept - low) / width)


PERCENTILE_SAMPLE = 1 << 17
"""Voxels sampled (a regular stride through the crop) to estimate percentiles quickly."""


def percentile_map(region: np.ndarray, low: float, high: float, ceiling: float = 1.0) -> UnitMap:
    """MR (or any non-HU) intensity: the ``low``/``high`` percentiles of the crop -> 0/1, and
    brighter voxels up to ``ceiling`` (1: clipped at the upper percentile, as HLIP does).

    Percentiles are estimated on a regular sample of the cropped region (reading the whole
    scan to normalise a crop would defeat slab-wise reading); they do not depend on the
    stored-to-physical scaling, so stored values are used as is. A constant crop maps to 0.
    """
    flat = region.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLE)]
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if not hi > lo:
        return UnitMap(0.0, 0.0)
    return UnitMap(1.0 / (hi - lo), -lo / (hi - lo), ceiling)


def _map_into(out: np.ndarray, region: np.ndarray, unit_map: UnitMap, mean: float, std: float) -> None:
    """``out[...] = (clip(region * scale + offset, 0, ceiling) - mean) / std`` for same-shaped arrays.

    Convert, then scale in place: numpy's casting multiply is slower than both passes."""
    np.copyto(out, region, casting="unsafe")
    np.multiply(out, np.float32(unit_map.scale / std), out=out)
    np.add(out, np.float32((unit_map.offset - mean) / std), out=out)
    np.clip(out, np.float32(-mean / std), np.float32((unit_map.ceiling - mean) / std), out=out)


def render(
    region: np.ndarray, unit_map: UnitMap, axes: Sequence[AxisCrop], mean: float, std: float
) -> np.ndarray:
    """``(clip(region * scale + offset, 0, ceiling) - mean) / std``, padded where ``axes`` say.

    Padding is the value of intensity 0 (as the reference pads [0, 1] volumes with 0 before
    standardising).
    """
    shape = [a.before + (a.stop - a.start) + a.after for a in axes]
    if shape == list(region.shape):
        out = np.empty(shape, np.float32)
    else:
        out = np.full(shape, -mean / std, dtype=np.float32)
    _map_into(
        out[tuple(slice(a.before, a.before + a.stop - a.start) for a in axes)], region, unit_map, mean, std
    )
    return out


@dataclass(frozen=True, eq=False)
class Crop:
    """One scan's crop as the model sees it, rendered where it is needed: the stored int16
    voxels the crop reads, its intensity map, its padding.

    Packing renders it (:meth:`tensor`) when it copies the crop into the batch, so a worker
    holds int16 crops, not float32 ones, until then. The intensity map runs in the crop's own
    order and packing then copies float32 into patch order: mapping straight into patch order
    took twice as long, numpy casting int16 to float32 in runs of one patch row (16 voxels).
    """

    region: np.ndarray
    unit_map: UnitMap
    axes: tuple[AxisCrop, ...]
    mean: float
    std: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.before + (a.stop - a.start) + a.after for a in self.axes)

    def tensor(self) -> torch.Tensor:
        """The rendered crop, float32 [D, H, W]."""
        return torch.from_numpy(render(self.region, self.unit_map, self.axes, self.mean, self.std))


def is_hounsfield(scan: Scan) -> bool:
    return scan.intensity_unit.upper() == "HU"


class StudyTransform:
    """Study -> ``dict(scans=[float32 Tensor[D, H, W], ...], text=str, key=str, labels=dict)``.

    Training (``train=True``): a random subset of up to ``max_scans`` scans in random order,
    a random crop of ``img_size`` per scan (centred with ``random_crop = false``), and the report text per ``text_mode``. Evaluation:
    the first ``max_scans`` scans in stored order, centre crops and the full report, so the
    same study always gives the same tensors. Scans smaller than the crop are padded.

    Intensities: HU scans are windowed with each window of their body region (``ct_region_windows``,
    else ``ct_windows``: :mod:`hlip.train.windows`; several windows become
    several scans with ``ct_window_mode="scans"``, or are averaged with ``"mean"``: the encoder
    has one input channel); other scans map their ``mr_percentiles`` to [0, 1], clipped at
    ``mr_ceiling``. Then ``(x - intensity_mean) / intensity_std`` as HLIP does (padding is 0
    before this step).
    """

    def __init__(self, config: TrainConfig, train: bool) -> None:
        if not config.img_size:
            config = TrainConfig.from_dict(config.to_dict()).resolve()
        self.config = config
        self.train = train

    def __call__(self, study: Study, epoch: int = 0) -> dict[str, Any]:
        rng = study_rng(self.config.seed, epoch, study.key) if self.train else None
        if not study.scans:
            raise ValueError(f"study {study.key!r} has no scans")
        scans = [
            tensor
            for scan in self.select_scans(study, rng)
            for tensor in self.scan_tensors(scan, rng, study.body_part)
        ]
        return {
            "scans": scans,
            "text": self.text(study.report, rng),
            "key": study.key,
            "labels": dict(study.labels),
        }

    def ct_windows(self, scan: Scan, body_part: str) -> list[list[float]]:
        """The HU windows of a CT scan's body region (:mod:`hlip.train.windows`)."""
        region = body_region(body_part, scan.series_description, self.config.ct_region)
        return region_windows(region, self.config.ct_region_windows, self.config.ct_windows)

    def tensors_per_scan(self, scan: Scan, body_part: str = "") -> int:
        several = is_hounsfield(scan) and self.config.ct_window_mode == "scans"
        return len(self.ct_windows(scan, body_part)) if several else 1

    def select_scans(self, study: Study, rng: np.random.Generator | None) -> list[Scan]:
        """Scans in random (training) or stored order, kept while their tensors fit ``max_scans``."""
        scans = study.scans
        order = rng.permutation(len(scans)) if rng is not None else range(len(scans))
        chosen, used = [], 0
        for i in order:
            needed = self.tensors_per_scan(scans[i], study.body_part)
            if chosen and used + needed > self.config.max_scans:
                continue
            chosen.append(scans[i])
            used += needed
        return chosen

    def scan_tensors(
        self, scan: Scan, rng: np.random.Generator | None, body_part: str = ""
    ) -> list[Crop | torch.Tensor]:
        crop_rng = rng if self.config.random_crop else None
        axes = crop_axes(scan.shape, self.config.img_size, crop_rng, pad=self.config.pad_to_size)
        region = read_crop(scan, axes)
        mean, std = self.config.intensity_mean, self.config.intensity_std
        if not is_hounsfield(scan):
            maps = [percentile_map(region, *self.config.mr_percentiles, self.config.mr_ceiling)]
        else:
            maps = [window_map(scan, low, high) for low, high in self.ct_windows(scan, body_part)]
        if len(maps) > 1 and self.config.ct_window_mode == "mean":
            units = [render(region, unit_map, axes, 0.0, 1.0) for unit_map in maps]
            return [torch.from_numpy((np.mean(units, axis=0, dtype=np.float32) - mean) / std)]
        return [Crop(region, unit_map, tuple(axes), mean, std) for unit_map in maps]

    def text(self, report: str, rng: np.random.Generator | None) -> str:
        """The report (evaluation, ``full``), its sentences shuffled, one random sentence, or a
        random half of its sentences in random order (``subset``), from the ``text_sections`` of
        the report when it has them.

        ``subset`` trains the text tower on short texts of a few statements as well as on
        whole reports, so that a user's one-line prompt lands where training texts were."""
        report = select_sections(report, self.config.text_sections).strip()
        sentences = split_sentences(report)
        mode = self.config.text_mode
        if rng is not None and sentences and mode in ("shuffle", "subset"):
            order = rng.permutation(len(sentences))
            if mode == "subset":
                order = order[: max(1, int(rng.binomial(len(sentences), 0.5)))]
            report = " ".join(sentences[i] for i in order)
        elif rng is not None and sentences and mode == "sentence":
            report = sentences[int(rng.integers(len(sentences)))]
        return self.config.text_prefix + report


# --- batching ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch. Unpacks as ``packed, tokens, keys`` (the agreed collate result);
    the other fields are for bookkeeping (labels for evaluation, positions for resume)."""

    packed: Any
    tokens: dict[str, torch.Tensor]
    keys: list[str]
    texts: list[str] = field(default_factory=list)
    labels: list[dict[str, Any]] = field(default_factory=list)
    positions: list[tuple[int, int, int]] = field(default_factory=list)
    """Per study: (reader, epoch, studies consumed by that reader in that epoch)."""
    skipped: dict[int, int] = field(default_factory=dict)
    """Per reader: studies it skipped so far (undecodable or failing the transform)."""
    skip_reasons: dict[int, dict[str, int]] = field(default_factory=dict)
    """Per reader: those skips by reason (:func:`skip_reason`)."""
    waiting: dict[int, list[list[Any]]] = field(default_factory=dict)
    """Per reader: the studies read but not yet batched, ``[group, epoch, index]``
    (:mod:`hlip.train.grouping`)."""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.packed, self.tokens, self.keys))

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        self.packed = self.packed.to(device, non_blocking=non_blocking)
        self.tokens = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tokens.items()}
        return self

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (``pin_memory=True``) so host-to-GPU copies can overlap."""
        self.packed = self.packed.pin_memory()
        self.tokens = {k: v.pin_memory() for k, v in self.tokens.items()}
        return self


class Collate:
    """Samples -> :class:`Batch`: tokenize the texts and pack the scans (no padding).

    ``patch_size`` is the encoder's (``model.visual.trunk.patch_size``): packing cuts the
    scans into patches once, here, in the DataLoader worker, into ``buffers`` if given
    (:func:`worker_collate`).
    """

    def __init__(
        self, tokenizer: Any, patch_size: Sequence[int], buffers: PatchBuffers | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.patch_size = tuple(patch_size)
        self.buffers = buffers

    def __call__(self, samples: Sequence[dict[str, Any]]) -> Batch:
        skipped: dict[int, int] = {}
        reasons: dict[int, dict[str, int]] = {}
        waiting: dict[int, list[list[Any]]] = {}
        for sample in samples:
            waiting.update(sample.get("waiting", {}))
            for reader, n in sample.get("skipped", {}).items():
                if n >= skipped.get(reader, 0):
                    skipped[reader] = n
                    reasons[reader] = sample.get("skip_reasons", {}).get(reader, {})
        return Batch(
            packed=pack_studies([sample["scans"] for sample in samples], self.patch_size, self.buffers),
            tokens=self.tokenizer([sample["text"] for sample in samples]),
            keys=[sample["key"] for sample in samples],
            texts=[sample["text"] for sample in samples],
            labels=[sample["labels"] for sample in samples],
            positions=[sample["position"] for sample in samples if "position" in sample],
            skipped=skipped,
            skip_reasons=reasons,
            waiting=waiting,
        )


def collate(samples: Sequence[dict[str, Any]], tokenizer: Any, patch_size: Sequence[int]) -> Batch:
    """Functional form of :class:`Collate`."""
    return Collate(tokenizer, patch_size)(samples)


def worker_collate(tokenizer: Any, patch_size: Sequence[int], workers: int, prefetch_factor: int) -> Collate:
    """The collate of a DataLoader with ``workers`` processes: with workers, batches are packed
    into reused shared-memory buffers, one per batch that can be in flight (prefetched, in use,
    being pinned)."""
    buffers = PatchBuffers(workers, prefetch_factor + 2) if workers > 0 else None
    return Collate(tokenizer, patch_size, buffers)


# --- filtering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySummary:
    """What the filters look at; built from a Study or from a manifest row alike."""

    modality: str
    body_part: str
    n_scans: int
    label_names: frozenset[str]
    report_chars: int

    @classmethod
    def of_study(cls, study: Study) -> StudySummary:
        labels = frozenset(k for k, v in study.labels.items() if v is not None)
        return cls(study.modality, study.body_part, len(study.scans), labels, len(study.report.strip()))

    @classmethod
    def of_manifest_row(cls, row: dict[str, Any]) -> StudySummary:
        labels = json.loads(row.get("labels") or "{}")
        names = frozenset(k for k, v in labels.items() if v is not None)
        return cls(row["modality"], row["body_part"] or "", row["n_scans"], names, row["report_length"])


@dataclass(frozen=True)
class StudyFilter:
    """Keeps the studies a config asks for (modality, body part, scan count, labels, report)."""

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    min_scans: int = 1
    labels: tuple[str, ...] = ()
    min_report_chars: int = 1

    @classmethod
    def from_config(cls, config: TrainConfig) -> StudyFilter:
        return cls(
            tuple(m.upper() for m in config.filter_modality),
            tuple(b.upper() for b in config.filter_body_part),
            config.filter_min_scans,
            tuple(config.filter_labels),
            config.filter_min_report_chars,
        )

    def accepts(self, summary: StudySummary) -> bool:
        return (
            (not self.modality or summary.modality.upper() in self.modality)
            and (not self.body_part or summary.body_part.upper() in self.body_part)
            and summary.n_scans >= self.min_scans
            and all(name in summary.label_names for name in self.labels)
            and summary.report_chars >= self.min_report_chars
        )

    def __call__(self, study: Study) -> bool:
        return self.accepts(StudySummary.of_study(study))


def require_sources(sources: Sequence[str], option: str = "--data") -> None:
    """Fail at once, in one line, when a local source names nothing: a dataset folder, shard
    file or pattern that does not exist (remote URLs and ``pipe:`` commands are the
    stream's to open). Without this a wrong path surfaces deep inside the DataLoader."""
    from hlip.shards.stream import expand_urls

    if not sources:
        raise FileNotFoundError(f"no training data: give {option} (a dataset folder, shard files or URLs)")
    for source in sources:
        if "://" in source or source.startswith("pipe:"):
            continue
        urls = expand_urls(source)
        if not urls or not all(os.path.exists(url) for url in urls):
            raise FileNotFoundError(f"{option} {source}: no such dataset folder or shard file(s)")


def count_studies(sources: Sequence[str], study_filter: StudyFilter, version: int = 0) -> int | None:
    """Studies passing the filter, from the manifests of the datasets at ``version`` (0: the
    latest); None when a source is not a dataset."""
    from hlip.shards.reader import ShardDataset
    from hlip.shards.stream import is_dataset

    total = 0
    for source in sources:
        if not is_dataset(source):
            return None
        rows = ShardDataset(source, version=version or None).manifest.select(
            ["modality", "body_part", "n_scans", "labels", "report_length"]
        )
        total += sum(study_filter.accepts(StudySummary.of_manifest_row(r)) for r in rows.to_pylist())
    return total


# --- the endless, resumable training stream ----------------------------------------------------


@dataclass
class DataState:
    """A rank's position in its data stream; saved in checkpoints for exact resume.

    ``positions[r] = (epoch, consumed)`` for reader ``r`` (a logical DataLoader worker);
    ``batches`` counts the micro-batches this rank has taken, which fixes which reader the
    DataLoader's round-robin serves next; ``waiting[r]`` lists the studies reader ``r`` had
    read but not yet batched (:mod:`hlip.train.grouping`), which a resume reads again.
    """

    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    batches: int = 0
    skipped: dict[int, int] = field(default_factory=dict)
    skip_reasons: dict[int, dict[str, int]] = field(default_factory=dict)
    waiting: dict[int, list[list[Any]]] = field(default_factory=dict)

    def advance(self, batch: Batch) -> None:
        for reader, epoch, consumed in batch.positions:
            self.positions[reader] = max(self.positions.get(reader, (0, 0)), (epoch, consumed))
        self.waiting.update(batch.waiting)
        for reader, n in batch.skipped.items():
            if n >= self.skipped.get(reader, 0):
                self.skipped[reader] = n
                self.skip_reasons[reader] = dict(batch.skip_reasons.get(reader, {}))
        self.batches += 1

    @property
    def epoch(self) -> int:
        """The earliest epoch any reader of this rank is still in."""
        return min((epoch for epoch, _ in self.positions.values()), default=0)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def reasons(self) -> Counter:
        """This rank's skips by reason, over its readers."""
        return sum((Counter(reasons) for reasons in self.skip_reasons.values()), Counter())

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": {str(r): list(p) for r, p in self.positions.items()},
            "batches": self.batches,
            "skipped": {str(r): n for r, n in self.skipped.items()},
            "skip_reasons": {str(r): dict(reasons) for r, reasons in self.skip_reasons.items()},
            "waiting": {str(r): entries for r, entries in self.waiting.items()},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataState:
        return cls(
            {int(r): (int(p[0]), int(p[1])) for r, p in values.get("positions", {}).items()},
            int(values.get("batches", 0)),
            {int(r): int(n) for r, n in values.get("skipped", {}).items()},
            {int(r): dict(reasons) for r, reasons in values.get("skip_reasons", {}).items()},
            {
                int(r): [[str(g), int(e), int(i)] for g, e, i in entries]
                for r, entries in values.get("waiting", {}).items()
            },
        )


def _reader_stream_class():
    """A shard stream whose DataLoader-worker identity is the *logical* reader.

    ``hlip.shards.stream.StudyStream`` splits shards by the physical worker id; after a
    resume, physical worker ``p`` plays reader ``(p + batches) % num_workers`` so the
    round-robin continues where it stopped. Overriding ``consumer`` is all that takes.
    """
    from hlip.shards.stream import StudyStream

    class ReaderStream(StudyStream):
        def __init__(self, *args: Any, reader: int, num_readers: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.reader, self.num_readers = reader, num_readers

        def consumer(self) -> tuple[int, int, int, int]:
            return self.rank, self.world_size, self.reader, self.num_readers

    return ReaderStream


class TrainStream(IterableDataset):
    """Transformed training samples of one rank, epoch after epoch, from a given position.

    Each DataLoader worker is one reader with its own share of every epoch's shards; each
    sample carries ``position = (reader, epoch, consumed)`` and the reader's skip count, so
    the training loop knows exactly what it has used (prefetched samples do not count).
    Samples leave in micro-batches of one kind (:class:`~hlip.train.grouping.BatchGrouper`;
    one kind for all with ``batch_grouping = "none"``), each with the list of what still waits.
    """

    def __init__(
        self, config: TrainConfig, rank: int, world_size: int, state: DataState | None = None
    ) -> None:
        super().__init__()
        from hlip.shards.stream import locate

        self.config = config
        self.urls, self.members = locate(config.data, config.data_version or None)
        if not self.urls:
            raise FileNotFoundError(f"no training shards found in {config.data}")
        self.rank, self.world_size = rank, world_size
        self.state = state or DataState()
        self.transform = StudyTransform(config, train=True)
        self.keep = StudyFilter.from_config(config)
        self.skipped = 0
        self.skip_reasons: Counter = Counter()

    def _count_skip(self, where: str, error: Exception) -> None:
        self.skipped += 1
        self.skip_reasons[skip_reason(error, where)] += 1

    def reader(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return (worker + self.state.batches) % num_workers, num_workers

    def studies(self, reader: int, num_readers: int, epoch: int) -> Iterator[Study]:
        """This reader's share of one epoch, filtered, in its deterministic order."""
        from hlip.shards.stream import ErrorCounter

        stream = _reader_stream_class()(
            self.urls,
            shuffle_buffer=self.config.shuffle_buffer,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            skip_errors=True,
            errors=ErrorCounter(self._count_skip),
            members=self.members,
            reader=reader,
            num_readers=num_readers,
        )
        return (study for study in stream if self.keep(study))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, num_readers = self.reader()
        start_epoch, skip = self.state.positions.get(reader, (0, 0))
        waiting = {(e, i): group for group, e, i in self.state.waiting.get(reader, [])}
        self.skipped = self.state.skipped.get(reader, 0)
        self.skip_reasons = Counter(self.state.skip_reasons.get(reader, {}))
        grouper = BatchGrouper(self.config.micro_batch_size(self.world_size))
        empty_epochs = 0
        for epoch in count(min([start_epoch, *(e for e, _ in waiting)])):
            replayed = [i for e, i in waiting if e == epoch] if epoch < start_epoch else []
            if epoch < start_epoch and not replayed:
                continue
            consumed = 0
            for consumed, study in enumerate(self.studies(reader, num_readers, epoch), start=1):
                if (epoch, consumed) <= (start_epoch, skip):  # read before the resumed checkpoint
                    sample = (
                        self.sample(study, epoch, reader, consumed) if (epoch, consumed) in waiting else None
                    )
                    if sample is not None:
                        grouper.restore(waiting[epoch, consumed], sample)
                    if epoch < start_epoch and consumed >= max(replayed):
                        break
                    continue
                sample = self.sample(study, epoch, reader, consumed)
                if sample is not None:
                    batch = grouper.add(self.group(study, epoch), sample)
                    if batch:
                        batch[-1]["waiting"] = {reader: grouper.waiting()}  # what the batch leaves behind
                    yield from batch
            if epoch < start_epoch:
                continue
            empty_epochs = empty_epochs + 1 if consumed == 0 else 0
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                log.warning(
                    "rank %d reader %d: no studies in %d epochs; stopping", self.rank, reader, empty_epochs
                )
                return

    def group(self, study: Study, epoch: int) -> str:
        """The bucket of ``study`` in ``epoch``: its kind, or mixed for ``mixed_batch_share``
        of the studies (a draw of its own, apart from the transform's)."""
        share = self.config.mixed_batch_share
        if share and study_rng(self.config.seed, epoch, f"mixed:{study.key}").random() < share:
            return MIXED
        return study_group(study, self.config.batch_grouping)

    def sample(self, study: Study, epoch: int, reader: int, consumed: int) -> dict[str, Any] | None:
        """The transformed study with where it was read, or None (counted and logged with its
        key) when it fails."""
        try:
            sample = self.transform(study, epoch)
        except Exception as error:
            log.warning("rank %d: skipped study %s: %s", self.rank, study.key, error)
            self._count_skip(study.key, error)
            return None
        sample["position"] = (reader, epoch, consumed)
        sample["skipped"] = {reader: self.skipped}
        sample["skip_reasons"] = {reader: dict(self.skip_reasons)}
        return sample


def skip_reason(error: Exception, key: str = "") -> str:
    """What a skipped study's error was, in words shared by every study it hit: the error
    type and the gist of its first line, without the study's key, quoted values, paths or
    what follows a bracket (``ShardFormatError: zarr.zip: entry is damaged``)."""
    message = str(error).splitlines()[0] if str(error) else ""
    message = re.sub(r"^study '[^']*'( scan '[^']*')?:?\s*", "", message)
    if key:
        message = message.replace(key, "")
    message = re.sub(r"'[^']*'|\S*/\S*", "", re.split(r"\s[(\[]", message, maxsplit=1)[0])
    parts = [" ".join(part.split()) for part in message.split(": ")]
    gist = ": ".join(parts[:2]) if len(parts[0]) <= 12 else parts[0]
    return f"{type(error).__name__}: {gist}" if gist.strip(": ") else type(error).__name__


def build_train_loader(
    config: TrainConfig,
    tokenizer: Any,
    patch_size: Sequence[int],
    rank: int,
    world_size: int,
    state: DataState,
    pin_memory: bool,
) -> DataLoader:
    """The rank's DataLoader of micro-batches, starting at ``state``."""
    workers = config.num_workers
    return DataLoader(
        TrainStream(config, rank, world_size, state),
        batch_size=config.micro_batch_size(world_size),
        num_workers=workers,
        collate_fn=worker_collate(tokenizer, patch_size, workers, config.prefetch_factor),
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=config.prefetch_factor if workers > 0 else None,
        # A private generator: creating the iterator must not draw from the global torch RNG,
        # whose state a resumed run restores from the checkpoint.
        generator=torch.Generator().manual_seed(config.seed),
    )
