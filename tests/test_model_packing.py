"""Padding-free packing: a packed batch must give every study exactly what it gets alone."""

from __future__ import annotations

import math
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_model_reference import model_levels, naive_features, tiny_model

from hlip.model import attention, create_vision, pack_studies
from hlip.model.attention import Segments, resolve_backend
from hlip.model.packing import SCAN, SLICE, STUDY, PatchBuffers, RowGather, TokenLayout
from hlip.model.vision import POOLS

PATCH = (4, 8, 8)


def scan_shapes(max_scans: int = 3):
    """One study: 1..max_scans scans of 1..3 patches per axis plus remainder voxels."""
    shape = st.tuples(st.integers(4, 13), st.integers(8, 26), st.integers(8, 26))
    return st.lists(shape, min_size=1, max_size=max_scans)


def make_studies(shapes, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen) for s in study] for study in shapes]


def dense_mask_attention(q, k, v, segments: Segments, first_only: bool = False):
    """Oracle backend: one SDPA over the whole sequence with a [T, T] block-diagonal mask."""
    ids = segments.segment_ids(q.device)
    mask = ids[:, None] == ids[None, :]
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask)
    out = out[0].transpose(0, 1)
    return out[segments.starts(q.device)] if first_only else out


MODELS = {
    "h3": ["slice", "scan", "study"],
    "study_first_slice_last": ["study", "scan", "study", "slice"],
}


@pytest.fixture(scope="module", params=[(name, pool) for name in sorted(MODELS) for pool in POOLS])
def model(request):
    name, pool = request.param
    model = tiny_model(MODELS[name], max_num_scans=2, seed=3)
    model.pool = pool
    return model


@settings(max_examples=8, deadline=None)
@given(shapes=st.lists(scan_shapes(), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_packed_batch_equals_each_study_alone(model, shapes, seed):
    """Scans of any grid, studies of any scan count (also > M): batch == alone == dense mask."""
    studies = make_studies(shapes, seed)
    with torch.no_grad():
        batch = model.forward_packed(model.pack(studies))
        alone = torch.cat([model.forward_packed(model.pack([study])) for study in studies])
        with mock.patch.dict(attention.BACKENDS, {"dense_mask": dense_mask_attention}):
            model.attn_backend = "dense_mask"
            try:
                masked = model.forward_packed(model.pack(studies))
            finally:
                model.attn_backend = "auto"
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch, masked, atol=1e-5, rtol=0)
    for study, embedding in zip(studies, batch, strict=True):
        if len({s.shape for s in study}) == 1:  # the reference's dense input can hold it
            with torch.no_grad():
                dense = model(torch.stack(study)[None, :, None])
            torch.testing.assert_close(embedding, dense[0], atol=1e-5, rtol=0)


@settings(max_examples=10, deadline=None)
@given(
    scans=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    data=st.data(),
)
def test_layout_regroup_keeps_tokens_and_moves_cls(scans, data):
    """Patch tokens survive any regrouping in order; cls is the children's mean / the parent's copy;
    each group's patch maximum is over its own patch tokens."""
    n_scans = sum(scans)
    depth = data.draw(st.lists(st.integers(1, 3), min_size=n_scans, max_size=n_scans))
    per_slice = data.draw(st.lists(st.integers(1, 4), min_size=n_scans, max_size=n_scans))
    layout = TokenLayout.build(scans, depth, per_slice)
    tokens = torch.randn(layout.num_tokens, 2, dtype=torch.float64)
    src, dst = data.draw(st.permutations([SLICE, SCAN, STUDY]))[:2]
    x = layout.pack(torch.zeros(2, dtype=torch.float64), tokens, src)
    cls = torch.randn(layout.levels[src].num_groups, 2, dtype=torch.float64)
    x[layout.levels[src].cls_pos] = cls
    y = layout.regroup(x, src, dst)

    lengths = layout.levels[dst].segments.lengths
    assert list(lengths) == sorted(lengths) and sum(lengths) == len(y)
    counts = {SLICE: [t for d, t in zip(depth, per_slice, strict=True) for _ in range(d)]}
    counts[SCAN] = [d * t for d, t in zip(depth, per_slice, strict=True)]
    starts = [sum(scans[:i]) for i in range(len(scans))]
    counts[STUDY] = [sum(counts[SCAN][s : s + n]) for s, n in zip(starts, scans, strict=True)]
    parent = {  # group of each fine group at the coarser level, in natural order
        (SLICE, SCAN): [i for i, d in enumerate(depth) for _ in range(d)],
        (SCAN, STUDY): [i for i, n in enumerate(scans) for _ in range(n)],
    }
    parent[(SLICE, STUDY)] = [parent[(SCAN, STUDY)][s] for s in parent[(SLICE, SCAN)]]
    first = 0
    for g, count in enumerate(counts[dst]):
        pos = int(layout.levels[dst].cls_pos[g])
        assert torch.equal(y[pos + 1 : pos + 1 + count], tokens[first : first + count])
        assert torch.equal(layout.patch_max(y, dst)[g], tokens[first : first + count].max(0).values)
        first += count
        if src < dst:
            children = [c for c, p in enumerate(parent[(src, dst)]) if p == g]
            torch.testing.assert_close(y[pos], cls[children].mean(0))
        else:
            assert torch.equal(y[pos], cls[parent[(dst, src)][g]])


def test_row_gather_gradient_is_the_scatter_of_index_select():
    source = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    gather = RowGather.build(np.array([4, 0, 6, 2]), 7)
    assert torch.autograd.gradcheck(gather, (source,))
    assert torch.equal(gather(source), source[[4, 0, 6, 2]])


def test_segments_runs():
    segs = Segments.from_lengths([3, 3, 5, 7, 7, 7])
    assert segs.runs == ((3, 2), (5, 1), (7, 3)) and segs.total == 32
    assert segs.segment_ids("cpu").tolist() == [0] * 3 + [1] * 3 + [2] * 5 + [3] * 7 + [4] * 7 + [5] * 7


def test_patch_dropout_keeps_equal_counts_per_slice():
    packed = pack_studies([[torch.randn(8, 24, 16)], [torch.randn(4, 16, 16), torch.randn(12, 8, 8)]], PATCH)
    kept, layout = packed.drop_tokens(0.5)
    kept = kept.index
    assert layout.tokens_per_slice == (3, 2, 1)  # int(6*.5), int(4*.5), max(1, int(1*.5))
    assert layout.slices_per_scan == packed.layout.slices_per_scan
    assert layout.num_tokens == len(kept) == 2 * 3 + 1 * 2 + 3 * 1
    assert torch.equal(kept, kept.unique())  # sorted, no repeats
    slice_of = torch.repeat_interleave(torch.arange(6), torch.tensor([6, 6, 4, 1, 1, 1]))
    assert torch.bincount(slice_of[kept], minlength=6).tolist() == [3, 3, 2, 1, 1, 1]


def test_patch_dropout_forward_matches_naive_on_kept_tokens():
    """Training forward with dropout == the reference forward of exactly the kept tokens."""
    model = tiny_model(["slice", "scan", "study", "slice"], max_num_scans=3, seed=5)
    model.patch_drop_rate = 0.4
    studies = make_studies([[(12, 24, 24)] * 2, [(8, 16, 24)]], seed=1)
    packed = model.pack(studies)
    model.train()
    torch.manual_seed(7)
    with torch.no_grad():
        got = model.forward_packed(packed)
    torch.manual_seed(7)
    kept, layout = packed.drop_tokens(model.patch_drop_rate)
    kept = kept.index
    model.eval()
    start = 0
    for i, study in enumerate(studies):
        volumes = torch.stack(study)
        n, d = volumes.shape[0], volumes.shape[1] // PATCH[0]
        hw = math.prod(s // p for s, p in zip(volumes.shape[2:], PATCH[1:], strict=True))
        size, k = n * d * hw, layout.tokens_per_slice[sum(len(s) for s in studies[:i])]
        local = (kept[(kept >= start) & (kept < start + size)] - start).view(n, d, k) % hw
        want = naive_features(model.state_dict(), PATCH, 2, model_levels(model), volumes, keep=local)
        torch.testing.assert_close(got[i], want[0].float(), atol=1e-4, rtol=0)
        start += size


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model(["scan", "study", "slice"], seed=2).train()
    packed = model.pack(make_studies([[(8, 16, 16)] * 2, [(12, 24, 16)]], seed=0))
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model.forward_packed(packed).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_drop_path_is_per_segment_and_training_only():
    model = create_vision("vit_nano_multiscan_h3", drop_path_rate=0.5)
    packed = model.pack(make_studies([[(8, 16, 16)] * 3], seed=0))
    model.eval()
    assert torch.equal(model.forward_packed(packed), model.forward_packed(packed))
    model.train()
    torch.manual_seed(0)
    first = model.forward_packed(packed)
    assert any(not torch.equal(first, model.forward_packed(packed)) for _ in range(5))


def test_packed_moves_between_devices_and_rejects_wrong_patch():
    model = create_vision("vit_nano_multiscan_h3").eval()
    studies = make_studies([[(8, 16, 16)], [(4, 8, 8), (8, 16, 8)]], seed=0)
    packed = model.pack(studies)
    moved = packed.to("cpu")
    segments, moved_segments = packed.layout.levels[SCAN].segments, moved.layout.levels[SCAN].segments
    assert moved is not packed and moved_segments.lengths == segments.lengths
    assert torch.equal(moved_segments.cu_seqlens, segments.cu_seqlens)
    with torch.no_grad():
        assert torch.equal(model.forward_packed(moved), model.forward_packed(packed))
    if torch.cuda.is_available():
        assert packed.pin_memory().patches.is_pinned()
    with pytest.raises(ValueError, match="patch"):
        model.forward_packed(pack_studies(studies, (2, 8, 8)))


def test_pack_studies_validates_input():
    with pytest.raises(ValueError, match="at least one scan"):
        pack_studies([[torch.zeros(8, 16, 16)], []], PATCH)
    with pytest.raises(ValueError, match="smaller than one patch"):
        pack_studies([[torch.zeros(3, 16, 16)]], PATCH)
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        pack_studies([[torch.zeros(1, 8, 16, 16)]], PATCH)


def test_pack_studies_patch_rows_follow_conv_kernel_order():
    scan = torch.arange(8 * 16 * 24, dtype=torch.float32).view(8, 16, 24)
    packed = pack_studies([[scan]], PATCH)
    assert packed.patches.shape == (2 * 2 * 3, 4 * 8 * 8)
    z, y, x = 1, 0, 2  # token (z*h + y)*w + x holds voxels [z*4:(z+1)*4, y*8:(y+1)*8, x*8:(x+1)*8]
    want = scan[z * 4 : (z + 1) * 4, y * 8 : (y + 1) * 8, x * 8 : (x + 1) * 8].flatten()
    assert torch.equal(packed.patches[(z * 2 + y) * 3 + x], want)


class _OneBatch(torch.utils.data.Dataset):
    """One item, packed by the collate: what a DataLoader worker sends for it."""

    def __init__(self, studies: list[list[torch.Tensor]]) -> None:
        self.studies = studies

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list[list[torch.Tensor]]:
        return self.studies


def _pack_and_report(items):
    """Packs in the worker and reports whether the patches were allocated in shared memory."""
    patches = pack_studies(items[0], PATCH).patches
    return patches.is_shared(), patches


def test_pack_studies_in_a_worker_allocates_shared_memory():
    """The worker hands the main process its buffer (no copy into shared memory on send)."""
    studies = make_studies([[(8, 16, 24), (5, 9, 17)], [(12, 8, 8)]], seed=3)
    loader = torch.utils.data.DataLoader(_OneBatch(studies), num_workers=1, collate_fn=_pack_and_report)
    ((shared_in_worker, patches),) = list(loader)
    assert shared_in_worker
    here = pack_studies(studies, PATCH).patches
    assert not here.is_shared()
    assert torch.equal(patches, here)


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` is one study of scans seeded by ``i``: each batch's values are known."""

    shapes = [[(8, 16, 24), (5, 9, 17)]]

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> list[list[torch.Tensor]]:
        return make_studies(self.shapes, seed=index)


class _PackInto:
    def __init__(self, buffers: PatchBuffers) -> None:
        self.buffers = buffers

    def __call__(self, items):
        return pack_studies(items[0], PATCH, self.buffers)


def _pooled_loader(slots: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _Batches(), num_workers=1, prefetch_factor=2, collate_fn=_PackInto(PatchBuffers(1, slots))
    )


def test_pooled_buffers_are_reused_once_the_main_process_lets_go():
    slots, values = [], []
    for index, packed in enumerate(_pooled_loader(slots=4)):
        assert packed.patches.is_shared()
        slots.append(packed.lease.slot if packed.lease else None)
        values.append(
            torch.equal(packed.patches, pack_studies(make_studies(_Batches.shapes, index), PATCH).patches)
        )
        del packed  # what a training step does with its batch once it is on the device
    assert all(values)
    assert None not in slots  # every batch found a free slot: none needed fresh memory
    assert len(set(slots)) < len(slots)


def test_pooled_buffers_never_overwrite_a_batch_still_held():
    held = list(_pooled_loader(slots=3))  # every batch kept: slots run out, later batches get fresh memory
    assert sum(packed.lease is not None for packed in held) == 3
    for index, packed in enumerate(held):
        assert torch.equal(packed.patches, pack_studies(make_studies(_Batches.shapes, index), PATCH).patches)


def test_pooled_buffers_outside_a_worker_are_plain_memory():
    packed = pack_studies(make_studies(_Batches.shapes, 0), PATCH, PatchBuffers(1, 2))
    assert packed.lease is None and not packed.patches.is_shared()


def test_backend_selection_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("flash", torch.device("cpu"))
    model = create_vision("vit_nano_multiscan_h3").eval()
    with torch.no_grad():
        model.forward_packed(model.pack(make_studies([[(8, 16, 16)]], seed=0)))
    assert "xformers" not in sys.modules  # never imported for CPU tensors
