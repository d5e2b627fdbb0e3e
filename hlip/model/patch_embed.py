"""3-D patch embedding: a Conv3d with kernel = stride = patch, applied as one matmul over patches.

The parameter lives in a Conv3d (``patch_embed.proj``) so published state_dicts load unchanged,
but since kernel == stride the convolution is exactly a linear map of each patch's voxels. Packed
batches carry their voxels already cut into patch rows [P, pd*ph*pw], so scans of any grid share
one matmul.

That linear map weighs each voxel by its place in the patch, so a small lesion reads
differently wherever it sits, and a bright spot among brain tissue of varied intensity moves a
patch's projections no more than the tissue does. ``local_features`` adds a learned, position-
free view of each patch: a small 3x3x3 convolution (stride 2) with a nonlinearity, pooled over
the patch by mean and maximum, projected to the token and added to it. The projection starts at
zero, so the embedding starts as the plain linear one (docs/evaluation.md, "Lesion size").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LocalFeatures(nn.Module):
    """Per patch: ``channels`` 3x3x3 filters (stride 2) and GELU, pooled over the patch by mean and
    max -> a token-sized vector (zero at initialisation)."""

    def __init__(self, patch_size, channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.conv = nn.Conv3d(1, channels, kernel_size=3, stride=2, padding=1)
        self.proj = nn.Linear(2 * channels, embed_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, patches: Tensor) -> Tensor:
        """[P, pd*ph*pw] -> [P, C]."""
        maps = F.gelu(self.conv(patches.view(-1, 1, *self.patch_size))).flatten(2)
        return self.proj(torch.cat([maps.mean(2), maps.amax(2)], dim=1))


class PatchEmbed3D(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim: int, in_chans: int = 1, local_features: int = 0):
        super().__init__()
        if in_chans != 1:
            raise ValueError("HLIP scans are single-channel volumes (in_chans=1)")
        self.img_size = tuple(int(n) for n in img_size)
        self.patch_size = tuple(int(n) for n in patch_size)
        if len(self.img_size) != 3 or len(self.patch_size) != 3:
            raise ValueError("img_size and patch_size need one value per axis (d, h, w)")
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size, strict=True))
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.local = LocalFeatures(self.patch_size, local_features, embed_dim) if local_features else None

    def forward(self, patches: Tensor) -> Tensor:
        """[P, pd*ph*pw] voxel rows (kernel order) -> [P, C] tokens."""
        tokens = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
        return tokens if self.local is None else tokens + self.local(patches)
