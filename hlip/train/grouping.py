"""Micro-batches of one kind of study (``batch_grouping``), with an exact resume.

In a contrastive batch that mixes brain MR and chest CT, most pairs are told apart by the
modality alone; a finding within one kind of study (a hematoma against a brain mass, a
nodule against a clear chest) drives the loss only through the few pairs of that kind.
Grouping gives every micro-batch one kind of study ("modality": CT, MR; "region": modality
and body region, head CT apart from chest CT), so every negative of a pair is a study of the
same kind. Over the stream each kind is still seen in proportion to its share of the data.

A reader's samples wait in one bucket per kind until a micro-batch of them has arrived; that
micro-batch is then handed on whole, so the DataLoader's batches of ``micro_batch_size``
consecutive samples are exactly these groups. What still waits when a batch is handed on is
listed as ``[group, epoch, index]`` (where each waiting study was read): a checkpoint stores
the list, and a resumed reader re-reads those studies into the same buckets before it goes
on, so the resumed run sees the same batches as the uninterrupted one.

A study whose key already waits in its bucket (a kind with fewer studies than a batch in the
reader's share of an epoch) goes to the mixed bucket instead, so no batch holds the same
study twice because of grouping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hlip.train.windows import body_region

if TYPE_CHECKING:
    from hlip.shards.format import Study

BATCH_GROUPINGS = ("none", "modality", "region")
MIXED = ""
"""The bucket of studies of no grouping (``batch_grouping = "none"``) and of repeated keys."""


def study_group(study: Study, grouping: str) -> str:
    """The bucket of ``study`` under ``grouping`` (one of :data:`BATCH_GROUPINGS`)."""
    if grouping == "none":
        return MIXED
    modality = study.modality.upper()
    if grouping == "modality":
        return modality
    descriptions = " ".join(scan.series_description for scan in study.scans)
    return f"{modality}:{body_region(study.body_part, descriptions)}"


class BatchGrouper:
    """Buckets of transformed samples (each with ``key`` and ``position = (reader, epoch,
    index)``), handed on ``size`` at a time from one bucket."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buckets: dict[str, list[dict[str, Any]]] = {}

    def add(self, group: str, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Put ``sample`` in its bucket; the bucket's samples when that makes a micro-batch, else []."""
        if any(waiting["key"] == sample["key"] for waiting in self.buckets.get(group, [])):
            group = MIXED
        bucket = self.restore(group, sample)
        if len(bucket) < self.size:
            return []
        return self.buckets.pop(group)

    def restore(self, group: str, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Put back a sample that waited in ``group`` when the checkpoint was taken."""
        bucket = self.buckets.setdefault(group, [])
        bucket.append(sample)
        return bucket

    def waiting(self) -> list[list[Any]]:
        """``[group, epoch, index]`` of every waiting sample, in the order they were read."""
        entries = [
            [group, *sample["position"][1:]] for group, bucket in self.buckets.items() for sample in bucket
        ]
        return sorted(entries, key=lambda entry: (entry[1], entry[2]))
