"""Micro-batches of one kind of study (batch_grouping): one kind per batch, no study lost or
repeated, and an exact resume with studies still waiting in their buckets."""

from __future__ import annotations

import dataclasses
from collections import Counter
from itertools import islice

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_support import fake_study, tiny_config

from hlip.shards.writer import write_dataset
from hlip.train.config import ConfigError
from hlip.train.data import DataState, build_train_loader
from hlip.train.grouping import MIXED, BatchGrouper, study_group

PATCH = (4, 8, 8)


class _Tokenizer:
    """Stands in for the text tokenizer where only the data order matters."""

    def __call__(self, texts):
        ids = torch.tensor([[len(t), sum(map(ord, t)) % 997] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def as_modality(study, modality: str):
    scans = [dataclasses.replace(scan, modality=modality) for scan in study.scans]
    return dataclasses.replace(study, modality=modality, scans=scans)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """27 studies in small shards: every third one MR (9), the others CT (18)."""
    studies = [as_modality(fake_study(i), "MR" if i % 3 == 0 else "CT") for i in range(27)]
    out = tmp_path_factory.mktemp("grouping") / "ds"
    write_dataset(out, studies, max_shard_bytes=40_000)
    return out, {s.key: s.modality for s in studies}


def loader(config, state):
    return build_train_loader(config, _Tokenizer(), PATCH, 0, 1, state, pin_memory=False)


def test_grouped_batches_hold_one_modality_and_each_study_once_per_epoch(mixed, tmp_path):
    dataset, modality = mixed
    config = tiny_config(dataset, tmp_path / "run", "batch_grouping=modality", "batch_size=4")
    batches = list(islice(loader(config, DataState()), 16))  # 64 samples: past epoch 1
    assert all(len({modality[k] for k in b.keys}) == 1 for b in batches)
    assert all(len(b) == 4 for b in batches)
    per_epoch = Counter(
        (epoch, key) for b in batches for key, (_, epoch, _) in zip(b.keys, b.positions, strict=True)
    )
    assert max(per_epoch.values()) == 1
    assert {key for epoch, key in per_epoch if epoch == 0} == set(modality)
    kinds = Counter(modality[k] for b in batches for k in b.keys)
    assert kinds["CT"] > kinds["MR"] > 0  # each kind in about its share of the data


@pytest.mark.parametrize("workers, share", [(0, 0.0), (2, 0.0), (0, 0.4)])
def test_resume_with_waiting_studies_continues_the_same_batches(mixed, tmp_path, workers, share):
    dataset, _ = mixed
    config = tiny_config(
        dataset,
        tmp_path / "run",
        "batch_grouping=modality",
        "batch_size=4",
        f"num_workers={workers}",
        f"mixed_batch_share={share}",
    )
    reference = list(islice(loader(config, DataState()), 20))
    waited = 0
    for stop in (3, 7, 12):  # inside epoch 0, across the epoch boundary, in epoch 1
        state = DataState()
        for batch in islice(loader(config, state), stop):
            state.advance(batch)
        saved = DataState.from_dict(state.to_dict())
        waited += sum(map(len, saved.waiting.values()))
        resumed = list(islice(loader(config, saved), 20 - stop))
        assert [b.keys for b in resumed] == [b.keys for b in reference[stop:]]
        assert torch.equal(resumed[-1].packed.patches, reference[-1].packed.patches)
    assert waited  # some stops left studies waiting in their buckets, which the resume read again


def test_a_mixed_share_of_studies_makes_mixed_batches(mixed, tmp_path):
    dataset, modality = mixed
    config = tiny_config(
        dataset, tmp_path / "run", "batch_grouping=modality", "batch_size=4", "mixed_batch_share=0.4"
    )
    batches = list(islice(loader(config, DataState()), 16))
    kinds = [len({modality[k] for k in b.keys}) for b in batches]
    assert 1 in kinds and 2 in kinds  # batches of one kind and mixed ones
    per_epoch = Counter(
        (epoch, key) for b in batches for key, (_, epoch, _) in zip(b.keys, b.positions, strict=True)
    )
    assert max(per_epoch.values()) == 1
    assert {key for epoch, key in per_epoch if epoch == 0} == set(modality)
    with pytest.raises(ConfigError, match="mixed_batch_share"):
        tiny_config(dataset, tmp_path / "run", "mixed_batch_share=1.5")


def test_no_grouping_keeps_the_stream_order(mixed, tmp_path):
    dataset, _ = mixed
    config = tiny_config(dataset, tmp_path / "run", "batch_grouping=none", "batch_size=4")
    keys = [k for b in islice(loader(config, DataState()), 6) for k in b.keys]
    positions = [p for b in islice(loader(config, DataState()), 6) for p in b.positions]
    assert positions == sorted(positions)  # read order, as without buckets
    assert len(set(keys)) == len(keys) == 24


def test_region_groups_head_ct_apart_from_chest_ct():
    chest = as_modality(fake_study(1), "CT")
    head = dataclasses.replace(chest, body_part="HEAD")
    described = dataclasses.replace(
        chest,
        body_part="",
        scans=[dataclasses.replace(s, series_description="Brain 5mm") for s in chest.scans],
    )
    assert study_group(chest, "region") == "CT:chest"
    assert study_group(head, "region") == study_group(described, "region") == "CT:head"
    assert study_group(head, "modality") == "CT" and study_group(head, "none") == MIXED


def test_unknown_grouping_is_a_config_error(mixed, tmp_path):
    with pytest.raises(ConfigError, match="batch_grouping"):
        tiny_config(mixed[0], tmp_path / "run", "batch_grouping=body")


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 5), groups=st.lists(st.sampled_from(["CT", "MR", "PT"]), max_size=60))
def test_grouper_hands_on_each_sample_once_in_batches_of_one_group(size, groups):
    """Every sample is handed on once or still waits (in read order); a handed-on batch is
    ``size`` samples of one group; fewer than ``size`` of a group wait."""
    grouper, batches = BatchGrouper(size), []
    for index, group in enumerate(groups, start=1):
        batches.append(grouper.add(group, {"key": f"k{index}", "group": group, "position": (0, 0, index)}))
    handed = [s["position"][2] for batch in batches for s in batch]
    waiting = grouper.waiting()
    assert sorted(handed + [index for _, _, index in waiting]) == list(range(1, len(groups) + 1))
    assert [index for _, _, index in waiting] == sorted(index for _, _, index in waiting)
    assert all(len(b) == size and len({s["group"] for s in b}) == 1 for b in batches if b)
    assert all(count < size for count in Counter(group for group, _, _ in waiting).values())


def test_a_study_already_waiting_in_its_group_goes_to_the_mixed_bucket():
    grouper = BatchGrouper(3)

    def add(group, key, index):
        return grouper.add(group, {"key": key, "position": (0, 0, index)})

    assert add("MR", "a", 1) == [] and add("MR", "a", 2) == []  # a small group: the same study again
    assert grouper.waiting() == [["MR", 0, 1], [MIXED, 0, 2]]
    batch = add("MR", "b", 3) + add("MR", "c", 4)
    assert [s["key"] for s in batch] == ["a", "b", "c"]
    assert grouper.waiting() == [[MIXED, 0, 2]]
