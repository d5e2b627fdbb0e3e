"""CT windows per body region: the region read from metadata, the windows the transform applies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_train_data import MEAN, STD, ct_scan, tensors

from hlip.shards.format import Study
from hlip.train.config import TrainConfig
from hlip.train.data import StudyTransform
from hlip.train.windows import REGION_WINDOWS, body_region, region_windows

CONFIG = TrainConfig.from_dict({"img_size": [8, 16, 16], "max_scans": 4})


@pytest.mark.parametrize(
    ("body_part", "description", "fallback", "region"),
    [
        ("HEAD", "", "", "head"),
        ("BRAIN", "Axial 5mm", "", "head"),
        ("", "CT HEAD W/O 5mm", "", "head"),
        ("", "Brain_Std 2.5", "", "head"),  # words split at punctuation and digits
        ("CHEST", "Axial 5mm", "head", "chest"),  # metadata wins over the fallback
        ("", "THORAX 1.0 B70f", "", "chest"),
        ("", "Lung 1mm", "", "chest"),
        ("ABDOMEN", "Portal venous", "", ""),
        ("", "Axial 5mm", "head", "head"),  # nothing named: the configured fallback
        ("", "HEADLINE", "", ""),  # a word, not a substring
        ("CHEST", "Brain window", "", "chest"),  # BodyPartExamined before the description
    ],
)
def test_body_region_from_metadata(body_part, description, fallback, region):
    assert body_region(body_part, description, fallback) == region


def test_region_windows_fall_back_to_the_default():
    default = [[-1000.0, 1000.0]]
    assert region_windows("head", REGION_WINDOWS, default) == REGION_WINDOWS["head"]
    assert region_windows("", REGION_WINDOWS, default) == default
    assert region_windows("chest", {"head": [[0, 80]]}, default) == default


def _study(body_part: str, description: str = "", hu: int = 60) -> Study:
    scan = dataclasses.replace(ct_scan(np.full((8, 16, 16), hu)), series_description=description)
    return Study(key="k", modality="CT", scans=[scan], report="Text.", body_part=body_part)


def _levels(transform: StudyTransform, study: Study) -> list[float]:
    """The [0, 1] level each windowed copy of the (uniform) scan takes."""
    return [round(float(t.mean()) * STD + MEAN, 4) for t in tensors(transform(study))]


def test_head_ct_gets_brain_subdural_and_bone_windows_chest_ct_the_chest_window():
    transform = StudyTransform(CONFIG, train=False)
    # blood (60 HU): brain window [0, 80] -> 0.75, subdural [-20, 180] -> 0.4, bone [-800, 2000] -> 0.3071
    assert _levels(transform, _study("HEAD")) == [0.75, 0.4, 0.3071]
    assert _levels(transform, _study("", "CT BRAIN 5mm")) == [0.75, 0.4, 0.3071]
    assert _levels(transform, _study("CHEST")) == [0.8067]  # [-1150, 350]
    assert _levels(transform, _study("")) == [0.8067]  # no region named: ct_windows


def test_configured_region_windows_and_fallback_region():
    custom = dataclasses.replace(
        CONFIG, ct_region_windows={"head": [[0.0, 120.0]]}, ct_windows=[[-100.0, 100.0]], ct_region="head"
    )
    transform = StudyTransform(custom, train=False)
    assert _levels(transform, _study("HEAD")) == [0.5]
    assert _levels(transform, _study("")) == [0.5]  # ct_region: unnamed CT is taken as head
    assert _levels(transform, _study("CHEST")) == [0.8]  # chest has no entry now: ct_windows


def test_head_windows_count_against_max_scans():
    study = _study("HEAD")
    study.scans = study.scans * 2
    transform = StudyTransform(CONFIG, train=False)
    assert len(transform(study)["scans"]) == 3  # the second scan's three windows do not fit
    assert transform.tensors_per_scan(study.scans[0], "HEAD") == 3


@pytest.mark.parametrize(
    "change",
    [
        {"ct_region_windows": {"head": [[80.0, 0.0]]}},
        {"ct_region_windows": {"head": []}},
        {"ct_region": "knee"},
    ],
)
def test_bad_region_settings_are_rejected(change):
    with pytest.raises(ValueError, match="ct_region"):
        TrainConfig.from_dict(change).validate()


def test_a_mixed_archive_gets_its_windows_from_the_headers(tmp_path):
    """Head CT, chest CT and brain MR from one synthetic archive, ingested as a user would:
    the demo preset windows each without any window set by hand."""
    from test_ingest_pipeline import SMALL, small_config

    from hlip.ingest import pipeline
    from hlip.shards.reader import ShardDataset
    from hlip.synth import make_archive
    from hlip.train.config import load_config

    archive = make_archive(
        tmp_path / "archive", n_studies=3, seed=2, modalities=("CT-HEAD", "CT", "MR"), sizes=SMALL
    )
    pipeline.run_ingest([archive.root], tmp_path / "shards", small_config(archive), workers=0)
    dataset = ShardDataset(tmp_path / "shards")
    transform = StudyTransform(load_config("demo-cpu").resolve(), train=False)
    windows = {}
    keys = dataset.keys()
    for key in keys:
        study = dataset[key]
        windows[(study.modality, study.body_part)] = {
            transform.tensors_per_scan(scan, study.body_part) for scan in study.scans
        }
    assert windows == {("CT", "HEAD"): {3}, ("CT", "CHEST"): {1}, ("MR", "HEAD"): {1}}
