"""The training data pipeline: crops, intensities, scan and text sampling, filters, the
exactly-once split over ranks and readers, resumable positions, and skipped bad studies."""

from __future__ import annotations

import dataclasses
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_support import corrupt_chunks, corrupt_json, fake_study, tiny_config, write_fake_dataset

from hlip.model.packing import pack_studies
from hlip.model.text import split_sentences
from hlip.shards.format import Scan, Study
from hlip.shards.reader import ShardDataset
from hlip.train.data import (
    AxisCrop,
    Crop,
    DataState,
    StudyFilter,
    StudyTransform,
    TrainStream,
    UnitMap,
    build_train_loader,
    count_studies,
    crop_axes,
    percentile_map,
    render,
    report_sections,
    select_sections,
)

MEAN, STD = 0.449, 0.226


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 studies in 12 small shards."""
    return write_fake_dataset(tmp_path_factory.mktemp("train-data") / "ds", 24, max_shard_bytes=40_000)


@pytest.fixture
def config(dataset, tmp_path):
    return tiny_config(dataset, tmp_path / "run")


def tensors(sample: dict) -> list[torch.Tensor]:
    """A transformed sample's scans, rendered (crops render when packed, else on demand)."""
    return [scan if isinstance(scan, torch.Tensor) else scan.tensor() for scan in sample["scans"]]


def all_studies(dataset) -> list[Study]:
    shards = ShardDataset(dataset)
    return [shards.open(key) for key in shards]


# --- crops ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 60), min_size=3, max_size=3),
    size=st.lists(st.integers(1, 40), min_size=3, max_size=3),
    seed=st.one_of(st.none(), st.integers(0, 2**16)),
    pad=st.booleans(),
)
def test_crop_window_stays_inside_and_fills_the_grid(shape, size, seed, pad):
    rng = None if seed is None else np.random.default_rng(seed)
    for n, s, axis in zip(shape, size, crop_axes(shape, size, rng, pad), strict=True):
        assert 0 <= axis.start < axis.stop <= n
        assert axis.stop - axis.start == min(n, s)
        assert axis.before + axis.after == (max(0, s - n) if pad else 0)
        assert abs(axis.before - axis.after) <= 1
        if rng is None and n >= s:
            assert axis.start == (n - s) // 2


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=3, max_size=3),
    pads=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=3, max_size=3),
    scale=st.floats(-0.01, 0.01),
    offset=st.floats(-2, 2),
    ceiling=st.sampled_from([1.0, 1.5, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_render_is_the_float32_formula_exactly(shape, pads, scale, offset, ceiling, seed):
    """``clip(float32(stored) * scale' + offset', low, high)`` voxel for voxel, bit for bit
    (in float32, as the reference computes it), and the value of intensity 0 in the padding."""
    region = np.random.default_rng(seed).integers(-32768, 32767, shape, endpoint=True).astype(np.int16)
    axes = [AxisCrop(0, n, before, after) for n, (before, after) in zip(shape, pads, strict=True)]
    out = render(region, UnitMap(scale, offset, ceiling), axes, MEAN, STD)
    low, high = np.float32(-MEAN / STD), np.float32((ceiling - MEAN) / STD)
    want = np.full([n + a + b for n, (a, b) in zip(shape, pads, strict=True)], low, np.float32)
    inner = tuple(slice(a, a + n) for n, (a, _) in zip(shape, pads, strict=True))
    scaled = region.astype(np.float32) * np.float32(scale / STD) + np.float32((offset - MEAN) / STD)
    want[inner] = np.clip(scaled, low, high)
    assert out.dtype == np.float32 and np.array_equal(out.view(np.int32), want.view(np.int32))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 13), min_size=3, max_size=3),
    size=st.lists(st.integers(3, 13), min_size=3, max_size=3),
    scale=st.floats(-0.01, 0.01),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_crops_render_into_packed_patches_as_their_tensors_pack(shape, size, scale, offset, seed):
    """Rendering straight into patch order (a view of the region, no float32 crop) packs the
    same bits as rendering the crop and packing the tensor, padded or not, with voxels past
    the last whole patch dropped."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-2000, 2000, [n + 3 for n in shape]).astype(np.int16)
    axes = tuple(crop_axes(volume.shape, size, rng))
    region = volume[tuple(slice(a.start, a.stop) for a in axes)]  # a strided view, as read_crop gives
    crops = [Crop(region, UnitMap(scale, offset), axes, MEAN, STD) for _ in range(2)]
    patch = (2, 2, 3)
    direct = pack_studies([crops[:1], crops[1:]], patch).patches
    via_tensors = pack_studies([[crops[0].tensor()], [crops[1].tensor()]], patch).patches
    assert np.array_equal(direct.numpy().view(np.int32), via_tensors.numpy().view(np.int32))


def ct_scan(values: np.ndarray, name: str = "ct") -> Scan:
    return Scan(
        name=name, array=values.astype(np.int16), spacing=(1.0, 1.0, 1.0), affine=np.eye(4), modality="CT"
    )


def test_ct_window_padding_and_standardisation(config):
    config = dataclasses.replace(config, img_size=[4, 6, 6])
    volume = np.full((2, 6, 8), -1150)
    volume[:, :, 4:] = 350  # right half at the top of the window
    study = Study(key="k", modality="CT", scans=[ct_scan(volume)], report="Text.")
    (scan,) = tensors(StudyTransform(config, train=False)(study))
    assert scan.shape == (4, 6, 6) and scan.dtype == torch.float32
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    # depth 2 -> padded by one slice on each side with 0 before standardisation
    assert torch.allclose(scan[0], torch.full((6, 6), low)) and torch.allclose(
        scan[3], torch.full((6, 6), low)
    )
    # width 8 centre-cropped to columns 1..6: three at -1150 HU, three at 350 HU
    assert torch.allclose(scan[1, :, :3], torch.tensor(low)) and torch.allclose(
        scan[1, :, 3:], torch.tensor(high)
    )


def test_several_windows_become_scans_or_their_mean(config):
    study = Study(
        key="k",
        modality="CT",
        scans=[ct_scan(np.full((8, 16, 16), 40), f"s{i}") for i in range(3)],
        report="Text.",
    )
    windows = [[-1000.0, 1000.0], [0.0, 80.0]]
    as_scans = StudyTransform(dataclasses.replace(config, ct_windows=windows, max_scans=4), train=True)(study)
    assert len(tensors(as_scans)) == 4  # two source scans x two windows fit max_scans = 4
    levels = sorted({round(float(s.mean()) * STD + MEAN, 3) for s in tensors(as_scans)})
    assert levels == [0.5, 0.52]
    mean = StudyTransform(
        dataclasses.replace(config, ct_windows=windows, ct_window_mode="mean"), train=False
    )(study)
    assert len(tensors(mean)) == 3
    assert float(tensors(mean)[0].mean()) * STD + MEAN == pytest.approx(0.51, abs=1e-4)


def test_non_hu_scans_use_percentiles(config):
    rng = np.random.default_rng(0)
    mr = dataclasses.replace(
        ct_scan(rng.integers(0, 3000, size=(8, 16, 16))), intensity_unit="", modality="MR"
    )
    flat = dataclasses.replace(ct_scan(np.full((8, 16, 16), 7)), intensity_unit="", modality="MR")
    study = Study(key="k", modality="MR", scans=[mr, flat], report="Text.")
    hlip_map = dataclasses.replace(config, mr_percentiles=[0.5, 99.5], mr_ceiling=1.0)
    varied, constant = tensors(StudyTransform(hlip_map, train=False)(study))
    unit = varied * STD + MEAN
    assert float(unit.min()) == pytest.approx(0.0, abs=1e-5) and float(unit.max()) == pytest.approx(
        1.0, abs=1e-5
    )
    assert torch.allclose(constant, torch.tensor((0 - MEAN) / STD))


def test_mr_ceiling_keeps_a_small_bright_lesion_brighter_than_the_tissue_around_it(config):
    """A lesion brighter than everything else but under 0.5% of the crop: clipped at the upper
    percentile it takes the brightest tissue's value; with a ceiling of 2 it stays above it,
    and the tissue below the upper percentile maps exactly as before."""
    values = np.random.default_rng(3).normal(500, 20, size=(8, 32, 32))
    values[3:5, 10:13, 10:13] = 900  # 18 of 8192 voxels
    scan = dataclasses.replace(ct_scan(values), intensity_unit="", modality="MR")
    study = Study(key="k", modality="MR", scans=[scan], report="Text.")
    grid = dataclasses.replace(config, img_size=[8, 32, 32], mr_percentiles=[0.5, 99.5])
    clipped, kept = (
        tensors(StudyTransform(dataclasses.replace(grid, mr_ceiling=ceiling), train=False)(study))[0]
        for ceiling in (1.0, 2.0)
    )
    lesion = (slice(3, 5), slice(10, 13), slice(10, 13))
    tissue = torch.from_numpy(values < np.percentile(values, 99))
    assert torch.equal(clipped[tissue], kept[tissue])
    assert float(kept[lesion].min()) > float(clipped[lesion].max()) == float(clipped.max())


def test_a_lower_upper_percentile_keeps_a_bright_lesion_from_dimming_the_crop(config):
    """HLIP maps the crop's 99.5th percentile to 1: a bright lesion of 0.43% of the crop lifts
    that percentile and dims every other voxel, so the whole crop tells that a lesion is there
    (a shortcut a model learns before the lesion itself). The 90th percentile lies in normal
    tissue and barely moves; a ceiling of 3 keeps the lesion brighter than the tissue."""
    rng = np.random.default_rng(11)
    values = np.where(np.arange(32)[None, None, :] < 16, rng.normal(500, 50, (8, 32, 32)), 5.0)
    lesioned = values.copy()
    lesioned[2:5, 4:7, 4:7] = 1100  # 35 of the 8192 voxels, all in the tissue half
    lesioned[5:7, 10:12, 2:4] = 1100
    study = Study(key="k", modality="MR", scans=[], report="Text.")
    tissue = torch.from_numpy((lesioned == values) & (values > 100))

    def mapped(volume, percentiles, ceiling):
        scan = dataclasses.replace(ct_scan(volume), intensity_unit="", modality="MR")
        grid = dataclasses.replace(
            config, img_size=[8, 32, 32], mr_percentiles=percentiles, mr_ceiling=ceiling
        )
        return (
            tensors(StudyTransform(grid, train=False)(dataclasses.replace(study, scans=[scan])))[0] * STD
            + MEAN
        )

    for percentiles, ceiling, moved in (([0.5, 99.5], 2.0, (0.03, 1.0)), ([0.5, 90.0], 3.0, (0.0, 0.01))):
        before, after = mapped(values, percentiles, ceiling), mapped(lesioned, percentiles, ceiling)
        dimmed = float(1 - (after[tissue] / before[tissue]).median())
        assert moved[0] <= dimmed <= moved[1], (percentiles, dimmed)
        assert float(after[2:5, 4:7, 4:7].min()) > float(after[tissue].max())


def test_crops_read_only_the_slabs_they_need(dataset, config):
    """A crop of 8 slices decodes at most two 8-slice slabs of a scan, not the whole scan."""
    study = ShardDataset(dataset).open(ShardDataset(dataset).keys()[0])
    deep = dataclasses.replace(config, img_size=[8, 16, 16])
    store = study.scans[0].array.store
    StudyTransform(deep, train=True)(dataclasses.replace(study, scans=study.scans[:1]))
    chunk_reads = [key for key in store.key_reads if "/c/" in key]
    assert 1 <= len(chunk_reads) <= 2
    slabs = -(-study.scans[0].shape[0] // 8)
    assert slabs >= 2


# --- scans and text ----------------------------------------------------------------------------------


def test_training_samples_are_a_function_of_seed_epoch_and_key(config):
    study = fake_study(3, shape=(20, 30, 30), max_scans=3)
    train = StudyTransform(dataclasses.replace(config, text_mode="sentence"), train=True)
    first, again, other_epoch = train(study, epoch=0), train(study, epoch=0), train(study, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(again), strict=True))
    assert first["text"] == again["text"]
    different = [not torch.equal(a, b) for a, b in zip(tensors(first), tensors(other_epoch), strict=False)]
    assert any(different) or len(tensors(first)) != len(tensors(other_epoch))
    evaluation = StudyTransform(config, train=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(tensors(evaluation(study)), tensors(evaluation(study, 5)), strict=True)
    )


def test_scan_sampling_random_subset_in_training_first_ones_in_evaluation(config):
    scans = [ct_scan(np.full((8, 16, 16), 100 * i), f"s{i}") for i in range(6)]
    study = Study(key="k", modality="CT", scans=scans, report="Text.")
    limited = dataclasses.replace(config, max_scans=3, ct_windows=[[-1000.0, 1000.0]])
    levels = lambda sample: [round(float(s.mean()) * STD + MEAN, 2) for s in tensors(sample)]  # noqa: E731
    assert levels(StudyTransform(limited, train=False)(study)) == [0.5, 0.55, 0.6]
    seen = [tuple(levels(StudyTransform(limited, train=True)(study, epoch=e))) for e in range(8)]
    assert all(len(set(s)) == 3 for s in seen) and len(set(seen)) > 1


def test_text_modes(config):
    report = "No cube.\nLungs are clear! Heart normal. "
    study = Study(key="k", modality="CT", scans=[ct_scan(np.zeros((8, 16, 16)))], report=report)
    sentences = split_sentences(report)
    assert sentences == ["No cube.", "Lungs are clear!", "Heart normal."]
    full = StudyTransform(dataclasses.replace(config, text_mode="sentence", text_prefix="CT: "), train=False)
    assert full(study)["text"] == "CT: " + report.strip()
    one = StudyTransform(dataclasses.replace(config, text_mode="sentence"), train=True)
    assert {one(study, e)["text"] for e in range(20)} == set(sentences)
    shuffled = StudyTransform(dataclasses.replace(config, text_mode="shuffle"), train=True)
    texts = {shuffled(study, e)["text"] for e in range(20)}
    assert len(texts) > 1 and all(sorted(split_sentences(t)) == sorted(sentences) for t in texts)
    subset = StudyTransform(dataclasses.replace(config, text_mode="subset"), train=True)
    parts = [split_sentences(subset(study, e)["text"]) for e in range(60)]
    assert all(p and len(set(p)) == len(p) and set(p) <= set(sentences) for p in parts)  # no repeats
    assert {len(p) for p in parts} == {1, 2, 3}  # from one statement to the whole report
    assert len({tuple(p) for p in parts if len(p) == 2}) > 2  # in varying choice and order


# --- filters ---------------------------------------------------------------------------------------


def test_filters_agree_between_manifest_and_studies(dataset):
    studies = all_studies(dataset)
    rules = [
        StudyFilter(min_scans=2),
        StudyFilter(modality=("MR",)),
        StudyFilter(labels=("cube",), min_report_chars=10),
        StudyFilter(labels=("missing",)),
        StudyFilter(body_part=("CHEST",), min_scans=3),
    ]
    for rule in rules:
        assert count_studies([str(dataset)], rule) == sum(rule(s) for s in studies)
    assert 0 < count_studies([str(dataset)], rules[0]) < len(studies)
    assert count_studies(["pipe:cat x.tar"], rules[0]) is None


# --- the split over ranks and readers -------------------------------------------------------------------


@pytest.mark.parametrize("world_size, readers", [(1, 1), (2, 1), (2, 2), (3, 4), (8, 4)])
def test_every_study_once_per_epoch_over_ranks_and_readers(config, dataset, world_size, readers):
    """12 shards for up to 32 consumers: whole shards or shares of one, never a loss or repeat."""
    config = dataclasses.replace(config, filter_min_scans=2)
    expected = sorted(s.key for s in all_studies(dataset) if len(s.scans) >= 2)
    for epoch in (0, 1):
        keys = [
            study.key
            for rank in range(world_size)
            for reader in range(readers)
            for study in TrainStream(config, rank, world_size).studies(reader, readers, epoch)
        ]
        assert sorted(keys) == expected


def test_one_shard_shared_by_more_readers_than_studies(tmp_path, config):
    tiny = write_fake_dataset(tmp_path / "one", 3)
    config = dataclasses.replace(config, data=[str(tiny)])
    shares = [[s.key for s in TrainStream(config, r, 2).studies(w, 2, 0)] for r in range(2) for w in range(2)]
    assert sorted(k for share in shares for k in share) == sorted(ShardDataset(tiny).keys())
    assert [] in shares  # four readers, three studies: one reader is idle, none repeats


def keys_of(batches):
    return [batch.keys for batch in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_from_a_data_state_continues_the_same_sequence(config, workers):
    """Stop after k micro-batches, restart from the saved DataState: the rest is identical."""
    config = dataclasses.replace(config, num_workers=workers, batch_size=5)
    patch = (4, 8, 8)

    def loader(state):
        return build_train_loader(config, tokenizer, patch, 0, 1, state, pin_memory=False)

    reference = list(islice(loader(DataState()), 11))  # 55 studies: more than two epochs of 24
    state = DataState()
    for batch in islice(loader(state), 4):
        state.advance(batch)
    resumed = list(islice(loader(DataState.from_dict(state.to_dict())), 7))
    assert keys_of(resumed) == keys_of(reference[4:])
    assert torch.equal(resumed[-1].packed.patches, reference[-1].packed.patches)
    assert resumed[-1].tokens["input_ids"].equal(reference[-1].tokens["input_ids"])
    by_epoch = Counter((e, k) for b in reference for k, (_, e, _) in zip(b.keys, b.positions, strict=True))
    assert max(by_epoch.values()) == 1
    assert len([1 for (e, _) in by_epoch if e == 0]) == 24 and len([1 for (e, _) in by_epoch if e == 1]) == 24


class _Tokenizer:
    """Stands in for the text tokenizer where only the data order matters."""

    def __call__(self, texts):
        ids = torch.tensor([[len(t), sum(map(ord, t)) % 997] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


tokenizer = _Tokenizer()


# --- bad studies -------------------------------------------------------------------------------------


def test_undecodable_studies_are_skipped_and_counted(tmp_path, config, caplog):
    dataset = write_fake_dataset(tmp_path / "bad", 10, max_shard_bytes=60_000)
    keys = sorted(ShardDataset(dataset).keys())
    corrupt_json(dataset, keys[2])
    corrupt_chunks(dataset, keys[5])
    config = dataclasses.replace(config, data=[str(dataset)])
    samples = list(islice(iter(TrainStream(config, 0, 1)), 16))  # all 8 good ones of epoch 0 and 1
    epoch0 = [s["key"] for s in samples if s["position"][1] == 0]
    assert sorted(epoch0) == sorted(set(keys) - {keys[2], keys[5]})
    assert samples[len(epoch0) - 1]["skipped"] == {0: 2}
    assert samples[-1]["skipped"] == {0: 4}  # the same two, again in epoch 1
    warned = {(r.name, k) for r in caplog.records for k in (keys[2], keys[5]) if k in r.getMessage()}
    assert ("hlip.train.data", keys[5]) in warned and ("hlip.shards.stream", keys[2]) in warned


def test_report_sections_pick_findings_and_impression():
    report = (
        "EXAMINATION:\nCT CHEST, [DATE].\n\nFINDINGS:\nNo pulmonary nodules.\nSmall left effusion.\n\n"
        "Impression: 1. Small left effusion.\n2. No nodule."
    )
    sections = report_sections(report)
    assert sections["examination"] == "CT CHEST, [DATE]."
    assert sections["impression"] == "1. Small left effusion.\n2. No nodule."
    chosen = select_sections(report, ["Findings", "impression"])
    assert split_sentences(chosen) == [
        "No pulmonary nodules.",
        "Small left effusion.",
        "1. Small left effusion.",
        "2. No nodule.",
    ]
    assert select_sections("Plain text without headings.", ["findings"]) == "Plain text without headings."
    assert select_sections(report, []) == report


def test_percentiles_are_estimated_on_a_sample_of_large_crops():
    rng = np.random.default_rng(1)
    region = rng.normal(500, 100, size=(48, 96, 96)).astype(np.int16)  # 442368 voxels: every 3rd is read
    unit = percentile_map(region, 0.5, 99.5)
    lo, hi = np.percentile(region, [0.5, 99.5])
    assert -unit.offset / unit.scale == pytest.approx(lo, rel=0.02)
    assert (1 - unit.offset) / unit.scale == pytest.approx(hi, rel=0.02)
