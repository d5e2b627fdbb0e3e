"""Fixed sin-cos position tables of the HLIP encoder and their resampling to an input grid.

The tables are built in float32 with numpy exactly as the published encoder builds them, so a
freshly constructed model carries bit-identical tables. Checkpoints may carry different tables
(the published training overwrote the spatial table with an MAE-derived one), which is why the
model stores them as parameters and loads them rather than regenerating them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), embed_dim] float32: all sines first, then all cosines (MAE layout)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos codes need an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", np.asarray(positions, dtype=np.float32).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def spatial_table(embed_dim: int, grid: tuple[int, int, int]) -> Tensor:
    """[1, d, h, w, C]: channel thirds encode the (w, h, d) index of each grid cell, in that order."""
    if embed_dim % 6:
        raise ValueError(f"embed_dim must be divisible by 6 for the 3-D sin-cos table, got {embed_dim}")
    mesh = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in grid), indexing="ij")
    third = embed_dim // 3
    codes = [sincos_1d(third, mesh[axis]) for axis in (2, 1, 0)]
    table = np.concatenate(codes, axis=1).reshape(*grid, embed_dim)
    return torch.from_numpy(table)[None]


def scan_table(embed_dim: int, max_num_scans: int) -> Tensor:
    """[1, M, C]: 1-D sin-cos code of the scan index 0..M-1 over the full width."""
    return torch.from_numpy(sincos_1d(embed_dim, np.arange(max_num_scans)))[None]


def resample_spatial(table: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """[d*h*w, C] float32 table for one scan grid (trilinear, align_corners=False, as the reference)."""
    table = table.float()
    if tuple(table.shape[1:4]) != tuple(grid):
        table = F.interpolate(table.permute(0, 4, 1, 2, 3), size=grid, mode="trilinear", align_corners=False)
        table = table.permute(0, 2, 3, 4, 1)
    return table.reshape(-1, table.shape[-1])


def resample_scans(table: Tensor, num_scans: int) -> Tensor:
    """[num_scans, C] float32 scan table stretched by linear interpolation (used when N > M)."""
    table = table.float()
    stretched = F.interpolate(table.permute(0, 2, 1), size=num_scans, mode="linear", align_corners=False)
    return stretched.permute(0, 2, 1)[0]
