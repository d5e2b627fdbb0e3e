"""TrainConfig: presets, overrides, validation, round trip through the saved run config."""

from __future__ import annotations

import math

import pytest

from hlip.resources import PRESETS, shipped_names
from hlip.train.config import ConfigError, TrainConfig, load_config, parse_value, save_config


@pytest.mark.parametrize("name", ["demo-cpu", "ct-rate", "brain-mri"])
def test_presets_resolve_to_the_model_grid(name):
    config = load_config(name)
    from hlip.model.factory import MODEL_PRESETS
    from hlip.model.presets import VISION_PRESETS

    vision = VISION_PRESETS[MODEL_PRESETS[config.model]["vision"]["name"]]
    assert tuple(config.img_size) == tuple(vision["img_size"])
    assert config.batch_size % config.accum_steps == 0


def test_published_settings_of_the_paper_presets():
    ct, mri = load_config("ct-rate"), load_config("brain-mri")
    assert ct.model == "hlip-ct-rate" and ct.ct_windows == [[-1150.0, 350.0]]
    assert ct.lock_text and ct.lr == pytest.approx(1e-5) and ct.batch_size == 64
    assert mri.model == "hlip-brain-mri" and mri.max_scans == 8 and mri.patch_drop_rate == 0.5
    assert mri.text_prefix.startswith("This MRI study shows")


def test_overrides_are_typed_and_applied_in_order():
    config = load_config(
        "demo-cpu",
        [
            "lr=3e-4",
            "steps=7",
            "data=shards",  # a lone string becomes a one-item list
            "ct_windows=[[-1000, 400], [-160, 240]]",  # ints become floats
            "lock_text=true",
            "model_overrides.text={context_length = 32}",
            "lr=1e-3",
        ],
    )
    assert config.lr == 1e-3 and config.steps == 7 and config.data == ["shards"]
    assert config.ct_windows == [[-1000.0, 400.0], [-160.0, 240.0]]
    assert isinstance(config.ct_windows[0][0], float)
    assert config.lock_text is True
    assert config.model_overrides == {"text": {"context_length": 32}, "vision": {"pool": "token+max"}}


def test_parse_value_falls_back_to_the_raw_string():
    assert parse_value("1e-4") == 1e-4
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("runs/x") == "runs/x"
    assert (
        parse_value("pipe:curl -s http://h/ds-{000000..000009}.tar")
        == "pipe:curl -s http://h/ds-{000000..000009}.tar"
    )


@pytest.mark.parametrize(
    "override, error",
    [
        ("learning_rate=1", ConfigError),
        ("steps=abc", ConfigError),
        ("lr.x=1", ConfigError),
        ("max_skipped_share=2", ConfigError),
        ("text_mode=words", ValueError),
        ("ct_windows=[[350, -1150]]", ValueError),
        ("img_size=[1, 2]", ValueError),
        ("mr_percentiles=[99, 1]", ValueError),
    ],
)
def test_bad_values_fail_at_load_time(override, error):
    with pytest.raises(error):
        load_config("demo-cpu", [override])


def test_micro_batch_must_divide_evenly():
    config = load_config("demo-cpu", ["batch_size=12", "accum_steps=2"])
    assert config.micro_batch_size(2) == 3
    with pytest.raises(ValueError, match="multiple"):
        config.micro_batch_size(5)


def test_saved_config_reloads_identically(tmp_path):
    config = load_config("demo-cpu", ["seed=3", "data=x", "model_overrides.text={context_length = 32}"])
    path = save_config(config, tmp_path)
    again = load_config(str(path))
    assert again == config
    assert again.max_logit_scale == pytest.approx(math.log(100))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="demo-cpu"):
        load_config("no-such-preset")


def test_every_shipped_config_file_parses():
    names = shipped_names(PRESETS)
    assert set(names) >= {"demo-cpu", "ct-rate", "brain-mri"}
    for name in names:
        assert isinstance(load_config(name), TrainConfig)
