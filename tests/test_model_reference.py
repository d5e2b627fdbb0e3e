"""The encoder against the published reference: fixture a, and a naive reading of SPEC.md.

``naive_features`` re-implements the reference forward for one study straight from
../shared/reference/SPEC.md, in float64, with Python loops over groups and dict-held cls tokens,
sharing no code with hlip.model. It is first checked against the fixture, then used as the oracle
for layouts the fixture does not cover (slice level, study-first, single-scan, N > M, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hlip.model import HierarchicalViT, from_reference
from hlip.model.checkpoint import vision_kwargs

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
CASES = ("n1", "n3", "n4", "n6_over", "n2_interp", "n1_odd", "bs2_n3")
KEY_DEPTH = {"study": 0, "scan": 1, "slice": 2}  # length of a group's key (n, z) at each level


def _load(name: str) -> dict:
    path = REFERENCE / name
    if not path.is_file():
        raise FileNotFoundError(f"reference data missing: {path} (shared/ must sit beside the repo)")
    return json.loads(path.read_text()) if path.suffix == ".json" else load_file(path)


@pytest.fixture(scope="module")
def fixture_a():
    config = _load("fixture_a/config.json")
    weights = _load("fixture_a/weights.safetensors")
    return config, weights, _load("fixture_a/expected.safetensors"), _load("inputs.safetensors")


# -- naive oracle -------------------------------------------------------------------------------


def _naive_block(sd: dict, i: int, x: torch.Tensor, heads: int) -> torch.Tensor:
    p, dim = f"blocks.{i}.", x.shape[1]
    y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    q, k, v = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).split(dim, dim=1)
    q, k, v = (t.reshape(len(x), heads, -1).transpose(0, 1) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim // heads), dim=-1) @ v
    x = x + att.transpose(0, 1).reshape(len(x), dim) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    y = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    hidden = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + hidden @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def naive_features(state, patch_size, heads, levels, volumes, rows=None, keep=None) -> torch.Tensor:
    """Reference forward_features of one study [N, D, H, W] -> [1 + tokens, C] (float64).

    ``levels`` names each block's level; ``rows`` fixes scan-table rows; ``keep`` [N, d, k] keeps
    k tokens (in-slice indices) of every slice, as patch dropout does.
    """
    sd = {name: t.double() for name, t in state.items()}
    dim = sd["cls_token"].shape[-1]
    num_scans = volumes.shape[0]
    grid = [s // p for s, p in zip(volumes.shape[1:], patch_size, strict=True)]
    crop = volumes[:, None, : grid[0] * patch_size[0], : grid[1] * patch_size[1], : grid[2] * patch_size[2]]
    x = F.conv3d(crop.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    x = x.permute(0, 2, 3, 4, 1)
    spatial = sd["spatial_posemb"]
    if list(spatial.shape[1:4]) != grid:
        spatial = F.interpolate(
            spatial.permute(0, 4, 1, 2, 3), size=grid, mode="trilinear", align_corners=False
        )
        spatial = spatial.permute(0, 2, 3, 4, 1)
    x = x + spatial
    if "sequential_posemb" in sd:
        table = sd["sequential_posemb"][0]
        if rows is not None:
            table = table[rows]
        elif num_scans > len(table):
            table = F.interpolate(table.T[None], size=num_scans, mode="linear", align_corners=False)[0].T
        x = x + table[:num_scans, None, None, None]
    patches = x.reshape(num_scans, grid[0], grid[1] * grid[2], dim)
    if keep is not None:
        patches = torch.gather(patches, 2, keep[..., None].expand(-1, -1, -1, dim))

    keys = {
        "study": [()],
        "scan": [(n,) for n in range(num_scans)],
        "slice": [(n, z) for n in range(num_scans) for z in range(grid[0])],
    }

    def regroup(cls: dict, old: str, new: str) -> dict:
        if KEY_DEPTH[new] < KEY_DEPTH[old]:  # merge: mean of the children's cls tokens
            return {
                key: torch.stack([v for k, v in cls.items() if k[: len(key)] == key]).mean(0)
                for key in keys[new]
            }
        return {key: cls[key[: KEY_DEPTH[old]]] for key in keys[new]}  # split: copy

    level = levels[0]
    cls = {key: sd["cls_token"].reshape(dim) for key in keys[level]}
    for i, new_level in enumerate(levels):
        cls, level = regroup(cls, level, new_level), new_level
        updated = patches.clone()
        for key in keys[level]:
            out = _naive_block(sd, i, torch.cat([cls[key][None], patches[key].reshape(-1, dim)]), heads)
            cls[key], updated[key] = out[0], out[1:].reshape(patches[key].shape)
        patches = updated
    cls = regroup(cls, level, "study")
    tokens = torch.cat([cls[()][None], patches.reshape(-1, dim)])
    return F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of realistic scale (LayerNorm ~1, Linear ~1/sqrt(fan_in)) so attention is not flat."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.05 * noise if name != "cls_token" else 0.5 * noise)
    return model.eval()


def model_levels(model: HierarchicalViT) -> list[str]:
    return [("slice", "scan", "study")[lvl] for lvl in model.block_levels]


# -- fixture a ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fixture_a_features_and_pooled(fixture_a, case):
    config, weights, expected, inputs = fixture_a
    model = from_reference(config["constructor_kwargs"], weights)
    rows = expected.get(f"{case}.seq_perm")
    with torch.no_grad():
        features = model.forward_features(inputs[case], scan_rows=rows)
        pooled = model(inputs[case], scan_rows=rows)
    torch.testing.assert_close(features, expected[f"{case}.features"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, expected[f"{case}.pooled"], atol=1e-4, rtol=0)


def test_fixture_a_intermediates_of_n3(fixture_a):
    """Block inputs/outputs around each regrouping match the reference's (cls first per group)."""
    config, weights, _, inputs = fixture_a
    debug = _load("fixture_a/debug.safetensors")
    model = from_reference(config["constructor_kwargs"], weights)
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__("patch_embed", out))
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(
            lambda m, a, out, i=i: seen.update({f"block{i}.in": a[0], f"block{i}.out": out})
        )
    with torch.no_grad():
        model.forward_features(inputs["n3"])
    for name, want in debug.items():
        if name.startswith("n3."):
            got = seen[name[3:]].reshape(want.shape)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=name)


def test_state_dict_names_and_shapes_match_reference(fixture_a):
    config, weights, _, _ = fixture_a
    model = HierarchicalViT(**vision_kwargs(config["constructor_kwargs"]))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == config["state_dict"]
    assert list(shapes) == list(config["state_dict"])  # same order too
    # Freshly built tables are the reference's sin-cos tables up to the last bit of float32:
    # numpy's float32 sine is vectorised per processor, and one CPU's rounding differs from
    # another's by an ulp (loaded tables are bit-exact: the next test).
    for name in ("spatial_posemb", "sequential_posemb"):
        torch.testing.assert_close(getattr(model, name).data, weights[name], rtol=0, atol=2.5e-7)
    assert not model.spatial_posemb.requires_grad and not model.sequential_posemb.requires_grad


def test_position_tables_are_loaded_not_regenerated(fixture_a):
    config, weights, _, _ = fixture_a
    altered = dict(weights, spatial_posemb=weights["spatial_posemb"] * 0.5 + 1.0)
    model = from_reference(config["constructor_kwargs"], altered)
    assert torch.equal(model.spatial_posemb, altered["spatial_posemb"])


def test_from_reference_is_strict(fixture_a):
    config, weights, _, _ = fixture_a
    with pytest.raises(RuntimeError, match="Missing"):
        from_reference(config["constructor_kwargs"], {k: v for k, v in weights.items() if k != "norm.bias"})
    with pytest.raises(RuntimeError, match="Unexpected"):
        from_reference(config["constructor_kwargs"], {**weights, "head.weight": torch.zeros(1)})
    for bad in ({"class_token": False}, {"reg_tokens": 1}, {"global_pool": "avg"}, {"window": 3}):
        with pytest.raises(ValueError):
            from_reference({**config["constructor_kwargs"], **bad}, weights)


@pytest.mark.parametrize("case", ["n3", "n2_interp", "n6_over"])
def test_naive_oracle_reproduces_fixture(fixture_a, case):
    """The test oracle itself is faithful (so the layout tests below can rely on it)."""
    config, weights, expected, inputs = fixture_a
    kw = config["constructor_kwargs"]
    levels = ["scan" if i in kw["scan_attn_indexes"] else "study" for i in range(kw["depth"])]
    got = naive_features(weights, kw["patch_size"], kw["num_heads"], levels, inputs[case][0, :, 0])
    torch.testing.assert_close(got.float(), expected[f"{case}.features"][0], atol=1e-4, rtol=0)


# -- layouts beyond the fixture -----------------------------------------------------------------

LAYOUTS = {
    "h3": ["slice", "scan", "study", "slice", "scan", "study"],
    "last_block_slice": ["scan", "study", "slice"],
    "first_block_study": ["study", "scan", "slice", "study", "scan"],
    "single_scan_slice_study": ["slice", "slice", "study"],
}


def tiny_model(levels: list[str], max_num_scans: int = 3, seed: int = 0) -> HierarchicalViT:
    idx = {lvl: [i for i, name in enumerate(levels) if name == lvl] for lvl in ("slice", "scan", "study")}
    model = HierarchicalViT(
        img_size=(8, 16, 16),
        patch_size=(4, 8, 8),
        embed_dim=24,
        depth=len(levels),
        num_heads=2,
        max_num_scans=max_num_scans,
        slice_attn_indexes=idx["slice"],
        scan_attn_indexes=idx["scan"],
        study_attn_indexes=idx["study"],
    )
    return randomize(model, seed)


def _check_against_naive(model: HierarchicalViT, volumes: torch.Tensor) -> None:
    with torch.no_grad():
        got = model.forward_features(volumes[None, :, None])[0]
        pooled = model(volumes[None, :, None])[0]  # its last block computes cls rows only
    want = naive_features(model.state_dict(), model.patch_size, 2, model_levels(model), volumes)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, want[0].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_named_layouts_match_naive(layout):
    single = layout.startswith("single_scan")
    model = tiny_model(LAYOUTS[layout], max_num_scans=1 if single else 3, seed=len(layout))
    volumes = torch.randn(2 if single else 3, 12, 20, 17, generator=torch.Generator().manual_seed(1))
    _check_against_naive(model, volumes)


@settings(max_examples=12, deadline=None)
@given(
    levels=st.lists(st.sampled_from(["slice", "scan", "study"]), min_size=1, max_size=4),
    num_scans=st.integers(1, 4),
    max_num_scans=st.sampled_from([1, 3]),
    shape=st.tuples(st.integers(4, 13), st.integers(8, 26), st.integers(8, 26)),
    seed=st.integers(0, 2**16),
)
def test_any_layout_matches_naive(levels, num_scans, max_num_scans, shape, seed):
    """Every transition (merge/split between any levels, at start/end) against the oracle."""
    model = tiny_model(levels, max_num_scans=max_num_scans, seed=seed)
    _check_against_naive(model, torch.randn(num_scans, *shape, generator=torch.Generator().manual_seed(seed)))
