"""HLIP hierarchical ViT: every block attends within a slice, a scan or the whole study.

Both entry points run the same packed machinery:

- ``forward_features(x)`` / ``forward(x)`` take the reference's dense [B, N, 1, D, H, W] input and
  return what the published encoder returns (see ../shared/reference/SPEC.md), except that scan
  codes are deterministic in eval for any batch size (rows 0..N-1);
- ``forward_packed(packed)`` takes a ``PackedStudies`` (studies with different scan counts, scans
  with different grids) and returns one pooled embedding per study, padding-free.

Regrouping between levels averages cls tokens on merge and copies them on split, per segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hlip.model.attention import BACKENDS_NAMES, Block
from hlip.model.packing import (
    LEVEL_NAMES,
    STUDY,
    PackedStudies,
    TokenLayout,
    grid_of,
    pack_studies,
    patch_view,
)
from hlip.model.patch_embed import PatchEmbed3D
from hlip.model.pos_embed import resample_scans, resample_spatial, scan_table, spatial_table

SCAN_POS_SAMPLING = ("ordered", "random")
POOLS = ("token", "token+max")
"""Study embedding: the study cls token (HLIP), or that plus the elementwise maximum over the
study's normed patch tokens, a multiple-instance pooling under which one patch that shows a small
lesion can set a feature whatever the rest of the study holds."""


def block_levels(depth: int, slice_attn_indexes, scan_attn_indexes, study_attn_indexes) -> tuple[int, ...]:
    """Level of each block; every block must be listed in exactly one of the three index sets.

    (The reference silently keeps a stale layout for unlisted blocks and crashes when block 0 is
    unlisted; both are configuration errors here.)
    """
    sets = [set(int(i) for i in s) for s in (slice_attn_indexes, scan_attn_indexes, study_attn_indexes)]
    stray = set().union(*sets) - set(range(depth))
    if stray:
        raise ValueError(f"attention indexes {sorted(stray)} are outside 0..{depth - 1}")
    levels = []
    for i in range(depth):
        hits = [lvl for lvl, s in enumerate(sets) if i in s]
        if len(hits) != 1:
            names = [LEVEL_NAMES[lvl] for lvl in hits] or ["none"]
            raise ValueError(f"block {i} must be in exactly one of slice/scan/study indexes, got {names}")
        levels.append(hits[0])
    return tuple(levels)


class HierarchicalViT(nn.Module):
    """The HLIP vision trunk; parameter names match the published (timm-based) encoder."""

    def __init__(
        self,
        img_size: Sequence[int] = (48, 224, 224),
        patch_size: Sequence[int] = (8, 16, 16),
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        max_num_scans: int = 40,
        slice_attn_indexes: Sequence[int] = (),
        scan_attn_indexes: Sequence[int] = (0, 1, 3, 4, 6, 7, 9, 10),
        study_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        scan_pos_sampling: str = "ordered",
        attn_backend: str = "auto",
        pool: str = "token",
    ):
        super().__init__()
        if scan_pos_sampling not in SCAN_POS_SAMPLING:
            raise ValueError(f"scan_pos_sampling must be one of {SCAN_POS_SAMPLING}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}")
        if attn_backend not in BACKENDS_NAMES:
            raise ValueError(f"attn_backend must be one of {BACKENDS_NAMES}")
        if not 0.0 <= patch_drop_rate < 1.0:
            raise ValueError("patch_drop_rate must be in [0, 1)")
        self.block_levels = block_levels(depth, slice_attn_indexes, scan_attn_indexes, study_attn_indexes)
        self.patch_embed = PatchEmbed3D(img_size, patch_size, embed_dim)
        self.embed_dim = self.num_features = embed_dim
        self.img_size, self.patch_size = self.patch_embed.img_size, self.patch_embed.patch_size
        self.grid_size = self.patch_embed.grid_size
        self.max_num_scans = int(max_num_scans)
        self.patch_drop_rate = float(patch_drop_rate)
        self.scan_pos_sampling = scan_pos_sampling
        self.attn_backend = attn_backend
        self.pool = pool
        self.grad_checkpointing = False

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.spatial_posemb = nn.Parameter(spatial_table(embed_dim, self.grid_size), requires_grad=False)
        if self.max_num_scans > 1:
            scans = scan_table(embed_dim, self.max_num_scans)
            self.sequential_posemb = nn.Parameter(scans, requires_grad=False)
        else:
            self.register_parameter("sequential_posemb", None)
        rates = np.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: cls ~ N(0, 1e-6), Linear ~ trunc-normal(0.02) with zero bias."""
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def pack(self, studies: Sequence[Sequence[Tensor]]) -> PackedStudies:
        """``pack_studies`` with this encoder's patch size."""
        return pack_studies(studies, self.patch_size)

    # -- position codes -------------------------------------------------------------------

    def _scan_codes(self, scans_per_study: Sequence[int], scan_rows: Tensor | None, device) -> Tensor | None:
        """[S, C] scan-order code of every scan, or None for single-scan models (M == 1).

        Rows 0..N-1 of the table per study; a study with N > M gets the table stretched to N
        rows; with ``scan_pos_sampling="random"`` in training, each study draws N distinct rows
        in random order (the reference's randperm subset). ``scan_rows`` [S] overrides the choice.
        """
        if self.sequential_posemb is None:
            return None
        table = self.sequential_posemb[0].float()
        if scan_rows is not None:
            rows = torch.as_tensor(scan_rows, dtype=torch.long).reshape(-1)
            if len(rows) != sum(scans_per_study) or not 0 <= int(rows.min()) <= int(rows.max()) < len(table):
                raise ValueError(
                    f"scan_rows needs one row in 0..{len(table) - 1} per scan, got {rows.tolist()}"
                )
            return table.index_select(0, rows.to(device))
        rows, stretched, next_row = [], [], table.shape[0]
        for n in scans_per_study:
            if n > table.shape[0]:
                stretched.append(resample_scans(self.sequential_posemb, n))
                rows.append(np.arange(next_row, next_row + n))
                next_row += n
            elif self.training and self.scan_pos_sampling == "random":
                rows.append(torch.randperm(table.shape[0])[:n].numpy())
            else:
                rows.append(np.arange(n))
        table = torch.cat([table, *stretched]) if stretched else table
        # Non-blocking: a copy from pageable memory that does not wait for the GPU's queue.
        rows = torch.from_numpy(np.concatenate(rows)).to(device, non_blocking=True)
        return table.index_select(0, rows)

    def _position_codes(self, packed: PackedStudies, scan_rows: Tensor | None) -> Tensor:
        """[P, C] float32 spatial + scan-order code of every patch token."""
        spatial = [resample_spatial(self.spatial_posemb, grid) for grid in packed.distinct_grids]
        codes = torch.cat(spatial).index_select(0, packed.grid_index)
        scans = self._scan_codes(packed.scans_per_study, scan_rows, codes.device)
        if scans is not None:
            codes = codes + scans.index_select(0, packed.scan_of_token)
        return codes

    # -- forward ----------------------------------------------------------------------------

    def _encode(
        self, packed: PackedStudies, scan_rows: Tensor | None = None, pooled: bool = True
    ) -> tuple[Tensor, TokenLayout]:
        """Run the trunk (before the final norm); also returns the layout the tokens ended in
        (fewer tokens under patch dropout).

        ``pooled``: [n_studies, C] study cls tokens. The last block then computes only its cls
        rows (their queries still attend over every token), which is all the pooled output
        depends on. Otherwise: the study-level packed sequence [T, C].
        """
        if tuple(packed.patch_size) != self.patch_size:
            raise ValueError(f"batch packed with patch {packed.patch_size}, encoder uses {self.patch_size}")
        tokens = self.patch_embed(packed.patches)
        # float32 codes promote the residual stream to float32 under autocast, as the reference.
        tokens = tokens + self._position_codes(packed, scan_rows).to(self.cls_token.dtype)
        layout = packed.layout
        if self.training and self.patch_drop_rate > 0:
            kept, layout = packed.drop_tokens(self.patch_drop_rate)
            tokens = kept(tokens)
        level = self.block_levels[0]
        x = layout.pack(self.cls_token.view(-1), tokens, level)
        last = len(self.blocks) - 1
        for i, (block, block_level) in enumerate(zip(self.blocks, self.block_levels, strict=True)):
            if block_level != level:
                x, level = layout.regroup(x, level, block_level), block_level
            args = (x, layout.levels[level].segments, self.attn_backend, pooled and i == last)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        if pooled:  # x holds the last level's cls tokens in packed order
            cls = x.index_select(0, layout.levels[level].rank)
            return (cls if level == STUDY else layout.merge_cls(cls, level, STUDY)), layout
        return (x if level == STUDY else layout.regroup(x, level, STUDY)), layout

    def forward_packed(self, packed: PackedStudies, scan_rows: Tensor | None = None) -> Tensor:
        """[n_studies, C]: each study's cls token after the final norm (plus the maximum over
        its normed patch tokens with ``pool="token+max"``).

        ``scan_rows`` [n_scans] optionally fixes the scan-table row of every scan.
        """
        if self.pool == "token":
            return self.norm(self._encode(packed, scan_rows)[0])
        x, layout = self._encode(packed, scan_rows, pooled=False)
        x = self.norm(x)
        return layout.cls_tokens(x, STUDY) + layout.patch_max(x, STUDY)

    def _pack_dense(self, x: Tensor, scan_rows: Tensor | None) -> tuple[PackedStudies, Tensor | None]:
        """Reference input [B, N, 1, D, H, W] (+ rows [N] or [B, N]) -> packed batch (+ rows [B*N])."""
        if x.ndim != 6 or x.shape[2] != 1:
            raise ValueError(f"expected [B, N, 1, D, H, W], got {tuple(x.shape)}")
        batch, scans = x.shape[:2]
        grid = grid_of(x.shape[3:], self.patch_size)
        voxels = patch_view(x.reshape(batch * scans, *x.shape[3:]), grid, self.patch_size)
        patches = voxels.reshape(batch * scans * math.prod(grid), -1)
        packed = PackedStudies.from_patches(
            patches, [grid] * (batch * scans), [scans] * batch, self.patch_size
        )
        if scan_rows is not None:
            scan_rows = torch.as_tensor(scan_rows)
            if tuple(scan_rows.shape) not in ((scans,), (batch, scans)):
                raise ValueError(f"scan_rows must be [N] or [B, N], got {tuple(scan_rows.shape)}")
            scan_rows = scan_rows.expand(batch, scans).reshape(-1)
        return packed, scan_rows

    def forward_features(self, x: Tensor, scan_rows: Tensor | None = None) -> Tensor:
        """[B, N, 1, D, H, W] -> [B, 1 + N*d*h*w, C]: normed cls then patch tokens in study order.

        ``scan_rows`` ([N], shared by the batch, or [B, N]) fixes the scan-table rows; by default
        rows 0..N-1 (see ``scan_pos_sampling`` for training).
        """
        packed, scan_rows = self._pack_dense(x, scan_rows)
        tokens = self._encode(packed, scan_rows, pooled=False)[0]
        # Equal-length studies keep their natural order in the study-level packing.
        return self.norm(tokens).view(x.shape[0], -1, self.embed_dim)

    def forward(self, x: Tensor, scan_rows: Tensor | None = None) -> Tensor:
        """[B, N, 1, D, H, W] -> [B, C] pooled cls (== forward_features(x)[:, 0])."""
        return self.forward_packed(*self._pack_dense(x, scan_rows))
