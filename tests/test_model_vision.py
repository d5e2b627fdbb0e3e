"""HierarchicalViT construction, presets, scan codes and checkpoint helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_model_reference import randomize
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hlip.model import VISION_PRESETS, HierarchicalViT, create_vision, from_reference, trunk_state_dict
from hlip.model.vision import block_levels

PUBLISHED = (
    "vit_base_singlescan_h2_token2744",
    "vit_base_multiscan_h2_token588",
    "vit_base_multiscan_h2_token1176",
    "vit_base_multiscan_h3_token1176",
)


def meta_model(name: str, **overrides) -> HierarchicalViT:
    with torch.device("meta"):
        return create_vision(name, **overrides)


def test_published_token1176_matches_spec_parameter_count_and_shapes():
    model = meta_model("vit_base_multiscan_h2_token1176")
    assert sum(p.numel() for p in model.parameters()) == 87_564_288
    fixed = [p.numel() for p in model.parameters() if not p.requires_grad]
    assert sum(fixed) == 6 * 14 * 14 * 768 + 40 * 768
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["cls_token"] == (1, 1, 768)
    assert shapes["spatial_posemb"] == (1, 6, 14, 14, 768)
    assert shapes["sequential_posemb"] == (1, 40, 768)
    assert shapes["patch_embed.proj.weight"] == (768, 1, 8, 16, 16)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["blocks.11.mlp.fc2.weight"] == (768, 3072)
    assert len(shapes) == 3 + 2 + 12 * 12 + 2


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_presets_layouts(name):
    model = meta_model(name)
    assert model.embed_dim == 768 and len(model.blocks) == 12
    assert model.block_levels[2::3] == (2, 2, 2, 2)  # blocks 2, 5, 8, 11 attend over the study
    tokens = {"588": 588, "1176": 1176, "2744": 2744}[name.rsplit("token", 1)[1]]
    assert model.grid_size[0] * model.grid_size[1] * model.grid_size[2] == tokens
    assert ("sequential_posemb" in model.state_dict()) == (model.max_num_scans > 1)


def test_single_scan_model_has_no_scan_table_and_accepts_several_scans():
    model = create_vision("vit_nano_multiscan_h3", max_num_scans=1).eval()
    assert "sequential_posemb" not in model.state_dict()
    x = torch.randn(1, 3, 1, 8, 16, 16)
    with torch.no_grad():
        out = model(x)
        swapped = model(x[:, [2, 0, 1]])
    torch.testing.assert_close(out, swapped, atol=1e-5, rtol=0)  # scans are unordered without codes


def test_eval_is_deterministic_whatever_the_batch_size():
    """Deliberate difference from the reference: B > 1 in eval uses rows 0..N-1, not randperm."""
    model = randomize(create_vision("vit_nano_multiscan_h3"), seed=0)
    x = torch.randn(2, 3, 1, 8, 16, 16)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(2)])
        over = model(torch.randn(2, 6, 1, 8, 16, 16))  # N > M with B > 1: interpolated, no assert
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert over.shape == (2, 48)


def test_explicit_scan_rows_select_table_rows():
    model = randomize(create_vision("vit_nano_multiscan_h3"), seed=1)
    x = torch.randn(1, 2, 1, 8, 16, 16)
    with torch.no_grad():
        default = model(x)
        explicit = model(x, scan_rows=torch.tensor([0, 1]))
        other = model(x, scan_rows=torch.tensor([3, 1]))
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, other)
    for bad in ([0, 1, 2], [0, 4]):  # one row per scan, within the 4-row table
        with pytest.raises(ValueError, match="scan_rows"):
            model(x, scan_rows=torch.tensor(bad))


def test_random_scan_sampling_only_in_training():
    model = create_vision("vit_nano_multiscan_h3", scan_pos_sampling="random")
    table = model.sequential_posemb[0]
    model.train()
    torch.manual_seed(0)
    draws = [model._scan_codes([3, 2], None, "cpu") for _ in range(20)]
    rows = [[int((table == code).all(1).nonzero()) for code in codes] for codes in draws]
    assert all(len(set(r[:3])) == 3 and len(set(r[3:])) == 2 for r in rows)  # distinct per study
    assert len({tuple(r) for r in rows}) > 1
    model.eval()
    assert torch.equal(model._scan_codes([3, 2], None, "cpu"), table[[0, 1, 2, 0, 1]])


def test_invalid_configurations_are_refused():
    with pytest.raises(ValueError, match="block 1"):
        block_levels(3, [0], [], [2])  # block 1 in no set
    with pytest.raises(ValueError, match="block 0"):
        block_levels(2, [0], [0], [1])  # block 0 in two sets
    with pytest.raises(ValueError, match="outside"):
        block_levels(2, [0], [1], [5])
    with pytest.raises(ValueError, match="divisible by 6"):
        create_vision("vit_nano_multiscan_h3", embed_dim=64, num_heads=2)
    with pytest.raises(KeyError, match="unknown vision preset"):
        create_vision("vit_huge")
    with pytest.raises(ValueError, match="pool must be one of"):
        create_vision("vit_nano_multiscan_h3", pool="mean")


def test_token_max_pool_adds_the_maximum_of_the_normed_patch_tokens_to_the_cls_token():
    """``pool="token+max"`` = the normed cls token of ``forward_features`` plus the maximum over
    the study's normed patch tokens; gradients reach the patch embedding through both."""
    model = randomize(create_vision("vit_nano_multiscan_h3", pool="token+max"), seed=4).eval()
    x = torch.randn(2, 2, 1, 8, 16, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model(x)
    torch.testing.assert_close(pooled, features[:, 0] + features[:, 1:].amax(1), atol=1e-5, rtol=0)
    model.train()
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_open_clip_checkpoint_trunk_loads_into_encoder(tmp_path):
    """A released training file: DDP 'module.' prefix, visual.trunk.* beside head and text keys."""
    source = randomize(create_vision("vit_nano_multiscan_h3"), seed=2)
    state = {f"module.visual.trunk.{k}": v for k, v in source.state_dict().items()}
    state.update(
        {"module.visual.head.proj.weight": torch.zeros(8, 48), "module.logit_scale": torch.zeros(())}
    )
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "epoch_1.pt")
    checkpoint = torch.load(tmp_path / "epoch_1.pt", map_location="cpu", weights_only=True)
    loaded = from_reference(VISION_PRESETS["vit_nano_multiscan_h3"], trunk_state_dict(checkpoint))
    x = torch.randn(1, 2, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), atol=0, rtol=0)
    with pytest.raises(KeyError, match="visual.trunk"):
        trunk_state_dict({"state_dict": {"module.text.proj.weight": torch.zeros(1)}})


def test_tiny_cpu_preset_runs_forward_and_backward():
    model = create_vision("vit_tiny_multiscan_h2").train()
    packed = model.pack([[torch.randn(32, 96, 96)] * 2, [torch.randn(24, 80, 96)]])
    out = model.forward_packed(packed)
    assert out.shape == (2, 192)
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None and model.spatial_posemb.grad is None


def _bench_module(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_flop_count_matches_torch_flop_counter():
    """The analytic FLOPs behind the GPU check's MFU equal what torch counts for the same forward."""
    gpu_check = _bench_module("gpu_check")
    model = create_vision("vit_nano_multiscan_h3").eval()
    packed = model.pack(gpu_check.make_studies(model, [1, 3, 2], seed=0, vary_depth=True))
    # The math SDPA kernel is made of bmm calls, which the counter sees (the CPU flash one it does not).
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.forward_packed(packed)
    assert gpu_check.trunk_flops(model, packed) == counter.get_total_flops()
