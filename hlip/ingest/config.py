"""Ingest configuration: every knob that decides what a study's sample contains.

One :class:`IngestConfig` drives a whole run. Its :meth:`~IngestConfig.config_hash` is
stored in every study's JSON, so a dataset records how it was made, and it is written to
``_ingest/config.json`` so that a resumed run refuses to mix samples made two ways.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

from hlip.ingest.partitions import DEFAULT_PARTITIONS
from hlip.ingest.plan import PlanConfig
from hlip.ingest.volume import DEFAULT_TARGET_SPACING, NATIVE
from hlip.shards.format import DEFAULT_CODEC, DEFAULT_MAX_SHARD_BYTES, slab_codec

Spacing = tuple[float | None, float | None, float | None] | Literal["native"]
"""Target voxel spacing ``(d, h, w)`` in mm (None keeps that axis), or ``"native"``."""

REPORT_KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber")


def default_target_spacing() -> dict[str, Spacing]:
    """CT is resampled to 3 mm slices and 1 mm in-plane (the HLIP CT recipe); other
    modalities keep their native grid (:data:`hlip.ingest.volume.DEFAULT_TARGET_SPACING`)."""
    return dict(DEFAULT_TARGET_SPACING)


def settings_hash(settings: dict) -> str:
    """A sample's ``config_hash``: the first 16 hex digits of the sha256 of the settings
    that shaped it, as canonical JSON."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IngestConfig:
    """Settings of one ingest run.

    ``secret`` (the key of the pseudonymous study ids) is resolved by
    :func:`hlip.ingest.deid.resolve_secret`; it is not part of ``config_hash``, and a run
    records only a keyed check of it. The report table's path is not hashed either: where
    a file lives does not change a sample. Nor is ``codec`` (the slabs' Blosc codec,
    :data:`hlip.shards.format.SLAB_CODECS`), which changes bytes, not values; a resumed run
    must still use the same one, so that a dataset has one codec.

    ``max_study_voxels`` bounds the pixels a study's files may declare, checked before any is
    decoded (:func:`hlip.ingest.volume.check_decoded_size`); None derives it from the worker's
    memory. Like the table's path it is neither hashed nor checked on resume: it decides
    which studies are built, not what a sample holds.

    ``index_partitions`` splits the header index by study (:mod:`hlip.ingest.partitions`);
    it changes how the work is cut, never a sample, and may change between runs.
    ``trust_folder_times`` lets a re-run skip listing the folders whose modification times
    are unchanged (right for archives whose files are never rewritten in place); it too
    may change between runs.

    ``label_columns`` and ``label_prefixes`` allow report-table columns as labels
    (:func:`hlip.ingest.reports.choose_label_columns`); with neither, only 0/1 findings are.
    """

    target_spacing: Mapping[str, Spacing] = field(default_factory=default_target_spacing)
    min_slices: int = PlanConfig.min_slices
    report_table: str | None = None
    report_key_column: str = "StudyInstanceUID"
    report_text_columns: tuple[str, ...] = ("report",)
    label_columns: tuple[str, ...] | None = None
    label_prefixes: tuple[str, ...] = ()
    allow_missing_report: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    max_study_voxels: int | None = None
    codec: str = DEFAULT_CODEC
    secret: str | None = None
    index_partitions: int = DEFAULT_PARTITIONS
    trust_folder_times: bool = False

    def __post_init__(self) -> None:
        slab_codec(self.codec)
        if self.index_partitions < 1:
            raise ValueError("index_partitions must be at least 1")
        if self.report_key_column not in REPORT_KEY_COLUMNS:
            raise ValueError(
                f"report_key_column must be one of {REPORT_KEY_COLUMNS}, not {self.report_key_column!r}"
            )
        for modality, spacing in self.target_spacing.items():
            if spacing != NATIVE and (len(spacing) != 3 or any(v is not None and v <= 0 for v in spacing)):
                raise ValueError(f"target spacing of {modality} must be 'native' or three positive mm values")

    def hashed_fields(self) -> dict:
        """The settings that change a sample's content, in canonical JSON-able form
        (a modality set to "native" is left out: unlisted modalities stay native)."""
        spacing = {
            modality: [None if v is None else float(v) for v in s]
            for modality, s in sorted(self.target_spacing.items())
            if s != NATIVE
        }
        return {
            "target_spacing": spacing,
            "min_slices": self.min_slices,
            "report_key_column": self.report_key_column,
            "report_text_columns": list(self.report_text_columns),
            "label_columns": None if self.label_columns is None else list(self.label_columns),
            "label_prefixes": list(self.label_prefixes),
            "allow_missing_report": self.allow_missing_report,
        }

    def config_hash(self) -> str:
        return settings_hash(self.hashed_fields())

    def resume_fields(self) -> dict:
        """What must match for a run to resume in an existing output directory."""
        recorded = asdict(self)
        del recorded["secret"], recorded["report_table"], recorded["max_study_voxels"]
        del recorded["index_partitions"], recorded["trust_folder_times"]
        recorded["target_spacing"] = self.hashed_fields()["target_spacing"]
        for name in ("report_text_columns", "label_columns", "label_prefixes"):
            recorded[name] = self.hashed_fields()[name]
        return recorded
