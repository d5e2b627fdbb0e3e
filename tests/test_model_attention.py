"""Attention backends on CPU: varlen's cumulative lengths, its plumbing against a CPU stand-in of
``varlen_attn``, ``auto``'s probe and fallback, and compiled blocks."""

from __future__ import annotations

import copy
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_model_reference import tiny_model

from hlip.model import attention, create_vision, pack_studies
from hlip.model.attention import Segments, compile_blocks, resolve_backend
from hlip.model.packing import SCAN, SLICE, STUDY

PATCH = (4, 8, 8)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    """CPU stand-in with ``torch.nn.attention.varlen.varlen_attn``'s contract: packed [T, H, D]
    inputs, int32 cumulative lengths from 0 (one more than segments), host-int maximum lengths
    that bound every segment; segment i's queries attend to segment i's keys only."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    assert isinstance(max_q, int) and isinstance(max_k, int)
    assert len(cu_seq_q) == len(cu_seq_k) and cu_seq_q[0] == cu_seq_k[0] == 0
    assert cu_seq_q[-1] == len(query) and cu_seq_k[-1] == len(key) == len(value)
    outputs = []
    for i in range(len(cu_seq_q) - 1):
        q = query[cu_seq_q[i] : cu_seq_q[i + 1]].transpose(0, 1)
        k, v = (t[cu_seq_k[i] : cu_seq_k[i + 1]].transpose(0, 1) for t in (key, value))
        assert q.shape[1] <= max_q and k.shape[1] <= max_k
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        outputs.append((weights @ v).transpose(0, 1))
    return torch.cat(outputs)


def random_studies(shapes, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen) for s in study] for study in shapes]


study_shapes = st.lists(
    st.lists(st.tuples(st.integers(4, 13), st.integers(8, 26), st.integers(8, 26)), min_size=1, max_size=3),
    min_size=1,
    max_size=3,
)


def group_lengths(scans_per_study, grids, kept_per_slice) -> dict[int, list[int]]:
    """Expected segment lengths (cls + patch tokens) per level, from the scans alone."""
    slices = [[kept] * grid[0] for grid, kept in zip(grids, kept_per_slice, strict=True)]
    per_scan = [sum(s) for s in slices]
    firsts = np.cumsum([0, *scans_per_study])
    per_study = [sum(per_scan[a:b]) for a, b in zip(firsts[:-1], firsts[1:], strict=True)]
    counts = {SLICE: [n for s in slices for n in s], SCAN: per_scan, STUDY: per_study}
    return {level: sorted(n + 1 for n in c) for level, c in counts.items()}


@settings(max_examples=25, deadline=None)
@given(shapes=study_shapes, rate=st.sampled_from([0.0, 0.25, 0.5, 0.9]), seed=st.integers(0, 2**16))
def test_cu_seqlens_and_max_len_follow_the_segments_of_every_level(shapes, rate, seed):
    """cu_seqlens = [0, cumsum(lengths)] and max_len = the longest segment, at every level, with and
    without patch dropout; lengths are the groups' token counts plus their cls token."""
    packed = pack_studies(random_studies(shapes, seed), PATCH)
    grids = packed.scan_grids
    per_slice = [g[1] * g[2] for g in grids]
    layouts = {0.0: (packed.layout, per_slice)}
    if rate:
        kept = [max(1, int(n * (1.0 - rate))) for n in per_slice]
        layouts[rate] = (packed.drop_tokens(rate)[1], kept)
    for layout, kept_per_slice in layouts.values():
        expected = group_lengths(packed.scans_per_study, grids, kept_per_slice)
        for level in (SLICE, SCAN, STUDY):
            segments = layout.levels[level].segments
            assert list(segments.lengths) == expected[level]
            cu = segments.cumulative("cpu")
            assert cu.dtype == torch.int32
            assert cu.tolist() == [0, *np.cumsum(expected[level]).tolist()]
            assert segments.max_len == max(expected[level]) and cu[-1] == segments.total
            assert segments.starts("cpu").tolist() == cu[:-1].tolist()
            assert torch.equal(segments.segment_ids("cpu").bincount(), torch.tensor(expected[level]))
            cu_q, max_q = segments.varlen_queries("cpu", first_only=True)
            assert cu_q.tolist() == list(range(len(expected[level]) + 1)) and max_q == 1


def test_segments_move_with_the_batch():
    segments = Segments.from_lengths([2, 5, 5])
    moved = segments.apply(lambda t: t.clone())
    assert moved.cu_seqlens is not segments.cu_seqlens and moved.cu_seqlens.tolist() == [0, 2, 7, 12]
    assert moved.cumulative("cpu") is moved.cu_seqlens  # already there: no copy


@pytest.fixture(scope="module", params=["token", "token+max"])
def every_level_model(request):
    model = tiny_model(["slice", "scan", "study", "scan"], max_num_scans=2, seed=5)
    model.pool = request.param
    return model


def _embed_and_grads(model, packed, backend):
    model.zero_grad(set_to_none=True)
    model.attn_backend = backend
    out = model.forward_packed(packed)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=6, deadline=None)
@given(shapes=study_shapes, seed=st.integers(0, 2**16))
def test_varlen_path_equals_sdpa_forward_and_gradients(every_level_model, shapes, seed):
    """The real varlen path (backend ``varlen_cpu``) with the kernel replaced by the CPU stand-in.

    Gradients are compared under cls pooling only: the patch maximum routes each feature's
    gradient to one token, and two kernels' fp32 rounding can pick another token where two
    patch values tie to 1e-7, a true difference of subgradient, not of the attention path."""
    model = every_level_model
    packed = model.pack(random_studies(shapes, seed))
    sdpa, sdpa_grads = _embed_and_grads(model, packed, "sdpa")
    with (
        mock.patch.dict(attention.BACKENDS, {"varlen_cpu": attention.varlen_attention}),
        mock.patch.object(attention, "_varlen_kernel", lambda: reference_varlen_attn),
    ):
        varlen, varlen_grads = _embed_and_grads(model, packed, "varlen_cpu")
    model.attn_backend = "auto"
    torch.testing.assert_close(varlen, sdpa, atol=1e-5, rtol=1e-5)
    assert varlen_grads.keys() == sdpa_grads.keys()
    if model.pool != "token":
        return
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_explicit_backends_refuse_what_they_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("varlen", cpu)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        resolve_backend("varlen", cuda, torch.float32)
    assert resolve_backend("varlen", cuda, torch.bfloat16) == "varlen"


def test_auto_on_cpu_is_sdpa_without_a_probe():
    with mock.patch.object(attention, "probe_backends", side_effect=AssertionError("probed on CPU")):
        assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"


def _fake(result=None, error=None):
    def attend(q, k, v, segments, first_only=False):
        if error is not None:
            raise error
        return q * result

    return attend


@pytest.mark.parametrize(
    "backends, expected",
    [
        ({"varlen": _fake(error=ImportError("no varlen_attn")), "xformers": _fake(1.0)}, ("xformers",)),
        ({"varlen": _fake(1.0), "xformers": _fake(error=RuntimeError("no kernel for sm_90"))}, ("varlen",)),
        ({"varlen": _fake(error=ImportError("old torch")), "xformers": _fake(error=ImportError("none"))}, ()),
    ],
)
def test_probe_leaves_out_backends_that_fail(backends, expected):
    with mock.patch.dict(attention.BACKENDS, backends), torch.no_grad():  # as from an eval forward
        timings = attention.probe_backends(torch.device("cpu"), heads=1, head_dim=4, dtype=torch.float32)
    assert tuple(timings) == expected and all(t >= 0 for t in timings.values())


@pytest.mark.parametrize(
    "timings, dtype, expected",
    [
        ({"varlen": 2.0, "xformers": 1.0}, torch.bfloat16, "xformers"),
        ({"varlen": 1.0, "xformers": 2.0}, torch.bfloat16, "varlen"),
        ({"varlen": 1.0, "xformers": 2.0}, torch.float32, "xformers"),  # varlen takes half dtypes only
        ({"varlen": 1.0}, torch.float32, "sdpa"),
        ({}, torch.bfloat16, "sdpa"),
    ],
)
def test_auto_on_cuda_picks_the_fastest_probed_backend_then_sdpa(timings, dtype, expected, caplog):
    attention._auto_ranking.cache_clear()
    try:
        with mock.patch.object(attention, "probe_backends", return_value=timings), caplog.at_level("INFO"):
            assert resolve_backend("auto", torch.device("cuda"), dtype, heads=3, head_dim=7) == expected
    finally:
        attention._auto_ranking.cache_clear()
    assert "attention auto on cuda" in caplog.text


def test_compiled_blocks_equal_eager_with_bounded_graphs():
    """Varied batches (token counts, one or several studies, train with drop path and eval) run
    through a handful of graphs, with the eager model's outputs and gradients."""
    eager = create_vision("vit_nano_multiscan_h3", drop_path_rate=0.2)
    compiled = copy.deepcopy(eager)
    counter = compile_blocks(compiled.blocks, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    graphs = []
    for i, scans in enumerate([[1], [2, 1], [1, 1], [2, 2, 2, 1]]):
        studies = [
            [torch.randn(8 + 4 * (j % 2), 16, 16 + 8 * (i % 2), generator=gen) for j in range(n)]
            for n in scans
        ]
        packed = eager.pack(studies)
        for train in (True, False):
            results = []
            for model in (eager, compiled):
                model.train(train)
                model.zero_grad(set_to_none=True)
                torch.manual_seed(i)
                out = model.forward_packed(packed)
                out.sum().backward()
                results.append((out.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
            (out_e, grads_e), (out_c, grads_c) = results
            torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-5)
            for grad_c, grad_e in zip(grads_c, grads_e, strict=True):
                torch.testing.assert_close(grad_c, grad_e, atol=1e-6, rtol=1e-5)
        graphs.append(counter.graphs)
    # qkv; residual+mlp with and without drop path, each for many rows and for the one pooled row
    # of a single-study batch. Every later batch reuses them.
    assert graphs[0] == graphs[-1] <= 5
