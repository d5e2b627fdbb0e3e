"""Padding-free packing of studies with any number of scans, each with its own grid.

Patch tokens of a batch are stored once, in study order (study, scan, z, y, x). For each attention
level (slice, scan, study) the encoder runs on a packed sequence [T, C] made of one segment per
group, each segment being the group's cls token followed by its patch tokens. ``TokenLayout``
holds every index needed to build those sequences and to move between them, computed once on
the CPU with numpy when the batch is packed (in the DataLoader's collate), so the forward only
issues row gathers (whose backward is a gather too, see ``RowGather``).

At every level segments are ordered by length (stable), which makes runs of equal-length segments
contiguous: the SDPA backend then attends each run with one reshaped call, with no gather.

A "slice" is one patch-row along depth of one scan (h*w tokens), as in the reference.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from hlip.model.attention import Segments

SLICE, SCAN, STUDY = 0, 1, 2
LEVEL_NAMES = ("slice", "scan", "study")
Grid = tuple[int, int, int]


def patch_view(volumes: Tensor, grid: Grid, patch_size: Grid) -> Tensor:
    """[..., D, H, W] -> view [..., d, h, w, pd, ph, pw] of the voxels of each patch.

    Voxels beyond ``grid * patch_size`` on each axis are dropped, as the reference's strided
    Conv3d drops them. Flattening the last three axes gives the Conv3d kernel's (pd, ph, pw) order.
    """
    (d, h, w), (pd, ph, pw) = grid, patch_size
    cropped = volumes[..., : d * pd, : h * ph, : w * pw]
    lead = cropped.shape[:-3]
    blocks = cropped.reshape(*lead, d, pd, h, ph, w, pw)
    n = len(lead)
    return blocks.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)


def grid_of(shape: Sequence[int], patch_size: Grid) -> Grid:
    """Token grid of a [D, H, W] volume; refuses volumes smaller than one patch on any axis."""
    grid = tuple(int(s) // p for s, p in zip(shape, patch_size, strict=True))
    if min(grid) < 1:
        raise ValueError(f"scan of shape {tuple(shape)} is smaller than one patch {patch_size}")
    return grid


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    return np.cumsum(a) - a


def _patch_counts(level: int, scans_per_study, slices_per_scan, tokens_per_slice) -> np.ndarray:
    """Patch tokens per group of ``level`` (groups in natural order)."""
    if level == SLICE:
        return np.repeat(tokens_per_slice, slices_per_scan)
    per_scan = slices_per_scan * tokens_per_slice
    if level == SCAN:
        return per_scan
    return np.add.reduceat(per_scan, _exclusive_cumsum(scans_per_study))


def _place(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions of cls and patch tokens when groups are laid out [cls, patches...] sorted by length.

    Returns (cls_pos [G], patch_pos [P], segment lengths in packed order, rank [G] = packed
    segment index of each group).
    """
    order = np.argsort(counts, kind="stable")
    lengths = counts[order] + 1
    start, rank = np.empty_like(counts), np.empty_like(counts)
    start[order], rank[order] = _exclusive_cumsum(lengths), np.arange(len(counts))
    group = np.repeat(np.arange(len(counts)), counts)
    patch_pos = np.arange(counts.sum()) + (start + 1 - _exclusive_cumsum(counts))[group]
    return start, patch_pos, lengths, rank


def _gather_map(cls_pos: np.ndarray, patch_pos: np.ndarray, patch_src: np.ndarray) -> np.ndarray:
    """Index into cat([cls (G), source]) that yields the packed sequence with cls and patch positions."""
    num_groups = len(cls_pos)
    src = np.empty(num_groups + len(patch_pos), dtype=np.int64)
    src[cls_pos] = np.arange(num_groups)
    src[patch_pos] = num_groups + patch_src
    return src


class _InjectiveGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return padded.index_select(0, inverse), None, None


@dataclass(eq=False)
class RowGather:
    """``source[index]`` for an index that never repeats a row.

    Its backward is a gather through ``inverse`` (unselected rows read an appended zero row)
    instead of index_select's scatter-add, which is about twice as slow on CPU.
    """

    index: Tensor
    inverse: Tensor

    @classmethod
    def build(cls, index: np.ndarray, source_len: int) -> RowGather:
        inverse = np.full(source_len, len(index), dtype=np.int64)
        inverse[index] = np.arange(len(index))
        return cls(torch.from_numpy(index), torch.from_numpy(inverse))

    @classmethod
    def of(cls, index: Tensor, source_len: int) -> RowGather:
        """From a device tensor (built on the fly, e.g. for the rows patch dropout keeps)."""
        inverse = torch.full((source_len,), len(index), dtype=torch.long, device=index.device)
        inverse[index] = torch.arange(len(index), device=index.device)
        return cls(index, inverse)

    def __call__(self, source: Tensor) -> Tensor:
        return _InjectiveGather.apply(source, self.index, self.inverse)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> RowGather:
        return RowGather(fn(self.index), fn(self.inverse))


@dataclass(eq=False)
class LevelIndex:
    """One level's packed sequence: its segments, its cls tokens, how to build it from patches."""

    segments: Segments
    cls: RowGather  # [T] sequence -> [G] cls tokens, groups in natural order
    pack: RowGather  # cat([cls (G), patch tokens (P)]) -> [T] sequence of this level
    rank: Tensor  # [G] index of each group's segment in packed (length-sorted) order

    @property
    def cls_pos(self) -> Tensor:
        return self.cls.index

    @property
    def num_groups(self) -> int:
        return len(self.cls.index)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> LevelIndex:
        return replace(
            self,
            segments=self.segments.apply(fn),
            cls=self.cls.apply(fn),
            pack=self.pack.apply(fn),
            rank=fn(self.rank),
        )


@dataclass(eq=False)
class TokenLayout:
    """Every index that moves tokens between the slice, scan and study packings of one batch.

    ``regroup_src[(a, b)]`` gathers cat([cls of level b, sequence of level a]) into level b's
    sequence; ``parent[(fine, coarse)]`` maps each fine group to its coarse group and
    ``inv_children[(fine, coarse)]`` is 1 / (number of fine groups in each coarse group).
    """

    scans_per_study: tuple[int, ...]
    slices_per_scan: tuple[int, ...]
    tokens_per_slice: tuple[int, ...]
    levels: tuple[LevelIndex, LevelIndex, LevelIndex]
    regroup_src: dict[tuple[int, int], RowGather]
    parent: dict[tuple[int, int], Tensor]
    inv_children: dict[tuple[int, int], Tensor]

    @classmethod
    def build(cls, scans_per_study, slices_per_scan, tokens_per_slice) -> TokenLayout:
        shape = [np.asarray(a, dtype=np.int64) for a in (scans_per_study, slices_per_scan, tokens_per_slice)]
        if (shape[0] < 1).any() or len(shape[1]) != shape[0].sum() or len(shape[2]) != len(shape[1]):
            raise ValueError("inconsistent layout: every study needs >= 1 scan, one entry per scan")
        placed = [_place(_patch_counts(level, *shape)) for level in (SLICE, SCAN, STUDY)]
        num_tokens = int((shape[1] * shape[2]).sum())
        levels = tuple(
            LevelIndex(
                Segments.from_lengths(lengths),
                RowGather.build(cls_pos, len(cls_pos) + num_tokens),
                RowGather.build(
                    _gather_map(cls_pos, patch_pos, np.arange(num_tokens)), len(cls_pos) + num_tokens
                ),
                torch.from_numpy(rank),
            )
            for cls_pos, patch_pos, lengths, rank in placed
        )
        regroup_src = {
            (a, b): RowGather.build(
                _gather_map(placed[b][0], placed[b][1], placed[a][1]),
                len(placed[b][0]) + len(placed[a][0]) + num_tokens,
            )
            for a in range(3)
            for b in range(3)
            if a != b
        }
        scan_parent = np.repeat(np.arange(len(shape[1])), shape[1])
        study_parent = np.repeat(np.arange(len(shape[0])), shape[0])
        parents = {(SLICE, SCAN): scan_parent, (SCAN, STUDY): study_parent}
        parents[(SLICE, STUDY)] = study_parent[scan_parent]
        return cls(
            tuple(int(n) for n in shape[0]),
            tuple(int(n) for n in shape[1]),
            tuple(int(n) for n in shape[2]),
            levels,
            regroup_src,
            {key: torch.from_numpy(p) for key, p in parents.items()},
            {key: torch.from_numpy(1.0 / np.bincount(p)).float() for key, p in parents.items()},
        )

    def apply(self, fn: Callable[[Tensor], Tensor]) -> TokenLayout:
        """Copy with ``fn`` applied to every index tensor (device moves, pinning)."""
        return replace(
            self,
            levels=tuple(level.apply(fn) for level in self.levels),
            regroup_src={k: v.apply(fn) for k, v in self.regroup_src.items()},
            parent={k: fn(v) for k, v in self.parent.items()},
            inv_children={k: fn(v) for k, v in self.inv_children.items()},
        )

    @property
    def num_tokens(self) -> int:
        """Patch tokens (without cls tokens)."""
        return sum(d * t for d, t in zip(self.slices_per_scan, self.tokens_per_slice, strict=True))

    def pack(self, cls_token: Tensor, tokens: Tensor, level: int) -> Tensor:
        """[P, C] patch tokens -> [T, C] sequence of ``level`` with ``cls_token`` [C] in every group."""
        index = self.levels[level]
        cls = cls_token.to(tokens.dtype).expand(index.num_groups, -1)
        return index.pack(torch.cat([cls, tokens]))

    def merge_cls(self, cls: Tensor, src: int, dst: int) -> Tensor:
        """[G_src, C] cls tokens -> [G_dst, C], each the mean of its children (src finer than dst)."""
        summed = cls.new_zeros(self.levels[dst].num_groups, cls.shape[1]).index_add(
            0, self.parent[(src, dst)], cls
        )
        return summed * self.inv_children[(src, dst)].to(cls.dtype)[:, None]

    def regroup(self, x: Tensor, src: int, dst: int) -> Tensor:
        """Move a sequence from level ``src`` to ``dst``: cls averaged on merge, copied on split."""
        cls = self.cls_tokens(x, src)
        cls = self.merge_cls(cls, src, dst) if src < dst else cls.index_select(0, self.parent[(dst, src)])
        return self.regroup_src[(src, dst)](torch.cat([cls, x]))

    def cls_tokens(self, x: Tensor, level: int) -> Tensor:
        """[G, C] cls tokens of ``level``'s groups, in natural order."""
        return self.levels[level].cls(x)

    def patch_max(self, x: Tensor, level: int) -> Tensor:
        """[G, C] elementwise maximum over each group's patch tokens (not its cls token) of
        ``level``'s sequence ``x`` [T, C], groups in natural order."""
        index = self.levels[level]
        group_of_row = torch.argsort(index.rank)[index.segments.segment_ids(x.device)]
        patches = x.index_fill(0, index.cls_pos, float("-inf"))
        out = x.new_full((index.num_groups, x.shape[1]), float("-inf"))
        return out.scatter_reduce(0, group_of_row[:, None].expand_as(x), patches, "amax")


@dataclass(eq=False)
class PackedStudies:
    """A batch of studies as one token stream plus its layout; cheap to build in a collate.

    ``patches`` [P, K] holds the voxels of every patch (K = pd*ph*pw) in study order; the patch
    embedding is one matmul over it. ``grid_index`` maps each token to its row in the
    concatenation of the spatial position tables resampled to ``distinct_grids``, and
    ``scan_of_token`` to its scan (for the scan-order code).
    """

    patches: Tensor
    patch_size: Grid
    scan_grids: tuple[Grid, ...]
    distinct_grids: tuple[Grid, ...]
    layout: TokenLayout
    grid_index: Tensor
    scan_of_token: Tensor
    _dropped_layouts: dict = field(default_factory=dict, repr=False)
    lease: BufferLease | None = field(default=None, repr=False)
    """The pool slot ``patches`` lives in, when a DataLoader worker packed it (:class:`PatchBuffers`)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.lease is not None:
            self.lease.release_when_freed(self.patches)

    @classmethod
    def from_patches(
        cls, patches: Tensor, scan_grids, scans_per_study, patch_size, lease: BufferLease | None = None
    ) -> PackedStudies:
        """Bookkeeping for ``patches`` [P, K] already in study order with the given scan grids."""
        scan_grids = tuple(tuple(int(n) for n in g) for g in scan_grids)
        distinct = tuple(dict.fromkeys(scan_grids))
        sizes = np.array([math.prod(g) for g in scan_grids], dtype=np.int64)
        if patches.shape[0] != sizes.sum():
            raise ValueError(f"{patches.shape[0]} patch rows for grids holding {sizes.sum()} tokens")
        offsets = _exclusive_cumsum(np.array([math.prod(g) for g in distinct], dtype=np.int64))
        scan_offset = offsets[[distinct.index(g) for g in scan_grids]]
        scan_of_token = np.repeat(np.arange(len(sizes)), sizes)
        grid_index = np.arange(sizes.sum()) + (scan_offset - _exclusive_cumsum(sizes))[scan_of_token]
        layout = TokenLayout.build(
            scans_per_study, [g[0] for g in scan_grids], [g[1] * g[2] for g in scan_grids]
        )
        device = patches.device
        return cls(
            patches,
            tuple(patch_size),
            scan_grids,
            distinct,
            layout.apply(lambda t: t.to(device)),
            torch.from_numpy(grid_index).to(device),
            torch.from_numpy(scan_of_token).to(device),
            lease=lease,
        )

    @property
    def num_studies(self) -> int:
        return len(self.layout.scans_per_study)

    @property
    def scans_per_study(self) -> tuple[int, ...]:
        return self.layout.scans_per_study

    @property
    def num_tokens(self) -> int:
        return self.patches.shape[0]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> PackedStudies:
        return replace(
            self,
            patches=fn(self.patches),
            layout=self.layout.apply(fn),
            grid_index=fn(self.grid_index),
            scan_of_token=fn(self.scan_of_token),
            _dropped_layouts={},
        )

    def to(self, device, non_blocking: bool = False) -> PackedStudies:
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedStudies:
        return self.apply(lambda t: t.pin_memory())

    def drop_tokens(self, rate: float) -> tuple[RowGather, TokenLayout]:
        """Random patch dropout: (gather of the kept tokens [P'] in study order, their layout).

        Every slice keeps the same number of tokens, max(1, int(h*w*(1-rate))) as timm's
        PatchDropout computes it, so slices of one scan stay equal and the slice level stays
        meaningful. Kept counts depend only on shapes, so the layout is built once per batch.
        """
        layout = self.layout
        per_scan = np.asarray(layout.tokens_per_slice)
        keep_per_scan = np.maximum(1, (per_scan * (1.0 - rate)).astype(np.int64))
        depth = np.asarray(layout.slices_per_scan)
        per_slice, keep_per_slice = np.repeat(per_scan, depth), np.repeat(keep_per_scan, depth)
        slice_start = _exclusive_cumsum(per_slice)
        device = self.patches.device
        pieces = []
        for size in np.unique(per_slice):
            chosen = per_slice == size
            starts = torch.from_numpy(slice_start[chosen]).to(device)
            scores = torch.rand(len(starts), int(size), device=device)
            local = scores.topk(int(keep_per_slice[chosen][0]), dim=1, sorted=False).indices
            pieces.append((local + starts[:, None]).flatten())
        kept = torch.cat(pieces).sort().values
        key = tuple(keep_per_scan.tolist())
        if key not in self._dropped_layouts:
            dropped = TokenLayout.build(layout.scans_per_study, layout.slices_per_scan, keep_per_scan)
            # Non-blocking: a copy from pageable memory that does not wait for the GPU's queue.
            self._dropped_layouts[key] = dropped.apply(lambda t: t.to(device, non_blocking=True))
        return RowGather.of(kept, self.num_tokens), self._dropped_layouts[key]


def empty_patches(rows: int, voxels: int) -> Tensor:
    """An uninitialised float32 [rows, voxels] buffer for packed patches.

    In a DataLoader worker it is allocated in shared memory, as ``default_collate`` allocates
    its batches: the worker then sends the main process a handle to it instead of copying the
    batch (over 100 MB for 4 studies of 4 scans) into shared memory to send it.
    """
    if get_worker_info() is None:
        return torch.empty(rows, voxels, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(rows * voxels * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, (rows, voxels))


def _free_slot(in_use: Tensor, slot: int) -> None:
    in_use[slot] = 0


@dataclass(frozen=True)
class BufferLease:
    """A worker's claim on one slot of a :class:`PatchBuffers` pool; travels with the batch."""

    in_use: Tensor
    slot: int
    owner: int
    """pid of the worker that packed the batch"""

    def release_when_freed(self, patches: Tensor) -> None:
        """In the process that received the batch: free the slot once no tensor there views
        ``patches``' memory any more (moved to the GPU, pinned, or the step is done with it)."""
        if os.getpid() != self.owner and patches.is_shared():
            weakref.finalize(patches.untyped_storage(), _free_slot, self.in_use, self.slot).atexit = False


class PatchBuffers:
    """Shared-memory buffers for packed patches that DataLoader workers reuse batch after batch.

    A fresh shared-memory buffer costs the kernel a page fault and a zeroed page per 4 KiB on
    first write: about 5 ms per 48x224x224 scan, as much CPU as decoding it. Made in the main
    process before the workers start, with ``slots`` buffers per worker (the batches in flight:
    the prefetched ones, the one in use, one being pinned). A worker packs into a free slot's
    buffer (grown when a batch needs more) and marks it used; the process that unpickles the
    batch marks it free once every tensor viewing it there is gone (:class:`BufferLease`).
    With every slot in use, or outside a worker, a batch gets a fresh buffer as before.
    """

    def __init__(self, workers: int, slots: int) -> None:
        self.slots = slots
        self.in_use = torch.zeros(workers * slots, dtype=torch.uint8).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}

    def __getstate__(self) -> dict:
        return {"slots": self.slots, "in_use": self.in_use}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _storages={})

    def empty(self, rows: int, voxels: int) -> tuple[Tensor, BufferLease | None]:
        """A float32 [rows, voxels] buffer and the lease of its slot (None: not pooled)."""
        info = get_worker_info()
        if info is not None and (info.id + 1) * self.slots <= len(self.in_use):
            flags, nbytes = self.in_use.numpy(), rows * voxels * 4
            for slot in range(info.id * self.slots, (info.id + 1) * self.slots):
                if flags[slot]:
                    continue
                storage = self._storages.get(slot)
                if storage is None or storage.nbytes() < nbytes:
                    storage = self._storages[slot] = torch.UntypedStorage._new_shared(nbytes)
                flags[slot] = 1
                patches = torch.empty(0, dtype=torch.float32).set_(storage, 0, (rows, voxels))
                return patches, BufferLease(self.in_use, slot, os.getpid())
        return empty_patches(rows, voxels), None


def pack_studies(
    studies: Sequence[Sequence[Tensor]],
    patch_size: Sequence[int] = (8, 16, 16),
    buffers: PatchBuffers | None = None,
) -> PackedStudies:
    """Pack studies (each a list of [D, H, W] scans, any shapes) into one PackedStudies.

    ``patch_size`` must be the encoder's (``model.patch_size``); the encoder checks it. Voxels are
    copied once, straight into patch order, as float32, into a buffer of ``buffers`` if given.
    A scan is a tensor, or an object with a ``shape`` that renders itself as one with
    ``tensor()`` when its turn comes (the training transform's crops: the batch's scans are then
    float32 one at a time, not all at once).
    """
    patch_size = tuple(int(p) for p in patch_size)
    if not studies or any(len(study) == 0 for study in studies):
        raise ValueError("every study needs at least one scan")
    scans = [scan for study in studies for scan in study]
    for scan in scans:
        if len(scan.shape) != 3:
            raise ValueError(f"scans must be [D, H, W], got shape {tuple(scan.shape)}")
    grids = [grid_of(scan.shape, patch_size) for scan in scans]
    sizes = [math.prod(g) for g in grids]
    if buffers is None:
        patches, lease = empty_patches(sum(sizes), math.prod(patch_size)), None
    else:
        patches, lease = buffers.empty(sum(sizes), math.prod(patch_size))
    start = 0
    for scan, grid, size in zip(scans, grids, sizes, strict=True):
        target = patches[start : start + size].view(*grid, *patch_size)
        voxels = scan if isinstance(scan, Tensor) else scan.tensor()
        target.copy_(patch_view(voxels, grid, patch_size))
        start += size
    return PackedStudies.from_patches(patches, grids, [len(s) for s in studies], patch_size, lease)
