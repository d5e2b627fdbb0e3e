"""The loop's pieces: schedule, weight-decay groups, non-finite losses (raise or skip)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from train_support import tiny_config, write_fake_dataset

from hlip.train import loop
from hlip.train.config import load_config
from hlip.train.loop import NonFiniteLossError, WarmupCosine, build_optimizer, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_fake_dataset(tmp_path_factory.mktemp("loop") / "ds", 8)


def test_warmup_then_cosine_to_the_floor():
    config = load_config("demo-cpu", ["lr=1e-3", "min_lr=1e-4", "warmup_steps=4", "steps=14"])
    schedule = WarmupCosine(config, total_steps=14)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    values = [schedule(s) for s in range(3, 15)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_weight_decay_on_norms_biases_and_temperature():
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.norm = nn.LayerNorm(4)
    model.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
    model.logit_scale = nn.Parameter(torch.tensor(2.0))
    model.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    config = load_config("demo-cpu", ["weight_decay=0.2"])
    decay, no_decay = build_optimizer(model, config).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {"proj.weight", "cls_token"}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "logit_scale",
    }


def test_text_lr_applies_to_the_text_tower_and_follows_the_schedule():
    model = nn.Module()
    model.visual = nn.Linear(4, 4)
    model.text = nn.Module()
    model.text.transformer = nn.Linear(4, 4)
    model.text.proj = nn.Linear(4, 4, bias=False)  # new weights: the trunk's rate
    config = load_config("demo-cpu", ["lr=1e-3", "text_lr=1e-5", "warmup_steps=2", "min_lr=0"])
    optimizer = build_optimizer(model, config)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    lr_of = {n: group_of[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lr_of == {
        "visual.weight": 1e-3,
        "visual.bias": 1e-3,
        "text.transformer.weight": 1e-5,
        "text.transformer.bias": 1e-5,
        "text.proj.weight": 1e-3,
    }
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(config, 10))
    optimizer.step()  # no gradients: nothing moves
    scheduler.step()  # step 1 of the warmup: both at their peak
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3, 1e-5}
    unset = build_optimizer(model, load_config("demo-cpu", ["lr=1e-3", "text_lr=0"]))
    assert {g["lr"] for g in unset.param_groups} == {1e-3}


class NanAtStep(nn.Module):
    """The real loss, except NaN on one call (counted from 1)."""

    def __init__(self, loss: nn.Module, bad_call: int) -> None:
        super().__init__()
        self.loss, self.bad_call, self.calls = loss, bad_call, 0

    def forward(self, **features):
        self.calls += 1
        value = self.loss(**features)
        return value * float("nan") if self.calls == self.bad_call else value


@pytest.fixture
def nan_at_step_2(monkeypatch):
    real = loop.create_loss
    monkeypatch.setattr(loop, "create_loss", lambda *args: NanAtStep(real(*args), bad_call=2))


def test_nan_loss_stops_with_step_and_study_keys(dataset, tmp_path, nan_at_step_2):
    config = tiny_config(dataset, tmp_path / "run", "steps=3", "nan_policy='raise'", "log_keys=true")
    with pytest.raises(NonFiniteLossError, match="step 2") as error:
        train(config)
    step2 = [
        json.loads(line)["key"]
        for line in (tmp_path / "run" / "keys-rank0.jsonl").read_text().splitlines()
        if json.loads(line)["step"] == 2
    ]
    assert len(step2) == config.batch_size and all(key in str(error.value) for key in step2)


def test_nan_loss_skip_policy_drops_the_update_and_goes_on(dataset, tmp_path, nan_at_step_2):
    config = tiny_config(
        dataset, tmp_path / "run", "steps=3", "nan_policy='skip'", "checkpoint_every=1", "keep_checkpoints=3"
    )
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["finite"] for r in records] == [True, False, True]
    assert math.isnan(records[1]["loss"]) and math.isfinite(result.loss)
    checkpoints = tmp_path / "run" / "checkpoints"
    before, after = (torch.load(checkpoints / f"step-{s:08d}.pt", weights_only=True)["model"] for s in (1, 2))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN step changed no weight
