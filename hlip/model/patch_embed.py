"""3-D patch embedding: a Conv3d with kernel = stride = patch, applied as one matmul over patches.

The parameter lives in a Conv3d (``patch_embed.proj``) so published state_dicts load unchanged,
but since kernel == stride the convolution is exactly a linear map of each patch's voxels. Packed
batches carry their voxels already cut into patch rows [P, pd*ph*pw], so scans of any grid share
one matmul.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed3D(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim: int, in_chans: int = 1):
        super().__init__()
        if in_chans != 1:
            raise ValueError("HLIP scans are single-channel volumes (in_chans=1)")
        self.img_size = tuple(int(n) for n in img_size)
        self.patch_size = tuple(int(n) for n in patch_size)
        if len(self.img_size) != 3 or len(self.patch_size) != 3:
            raise ValueError("img_size and patch_size need one value per axis (d, h, w)")
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size, strict=True))
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, patches: Tensor) -> Tensor:
        """[P, pd*ph*pw] voxel rows (kernel order) -> [P, C] tokens."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
