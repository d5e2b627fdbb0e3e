"""Block-diagonal self-attention over a packed token sequence, and the pre-norm ViT block.

A packed sequence [T, C] is a concatenation of independent segments (one per slice, scan or study,
each starting with its cls token). Segments never attend to each other. Two interchangeable
backends compute this:

- ``sdpa``: PyTorch ``scaled_dot_product_attention``, one call per run of equal-length segments.
  The packing orders segments by length at every level, so a run is a contiguous [G*L] slice that
  reshapes to [G, heads, L, head_dim] without any gather.
- ``xformers``: ``memory_efficient_attention`` with ``fmha.BlockDiagonalMask`` (CUDA only; imported
  lazily, never needed on CPU).
- ``auto``: xformers for CUDA tensors when it imports, else sdpa.

Parameter names follow timm's ``Block`` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) so
published state_dicts load unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS_NAMES = ("auto", "sdpa", "xformers")


@dataclass(eq=False)
class Segments:
    """Segment lengths of a packed sequence, in packed order, plus their runs of equal length.

    ``runs`` is ((length, count), ...) with consecutive segments of equal length merged; the sdpa
    backend issues one call per run. The xformers mask is cached per device because every block
    of one level reuses it.
    """

    lengths: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    _bias_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_lengths(cls, lengths) -> Segments:
        lengths = tuple(int(n) for n in lengths)
        runs: list[list[int]] = []
        for n in lengths:
            if runs and runs[-1][0] == n:
                runs[-1][1] += 1
            else:
                runs.append([n, 1])
        return cls(lengths, tuple((n, g) for n, g in runs))

    @property
    def total(self) -> int:
        return sum(n * g for n, g in self.runs)

    def segment_ids(self, device) -> Tensor:
        """[T] index of the segment each token belongs to (for per-segment drop-path)."""
        lengths = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

    def xformers_bias(self, device):
        key = str(device)
        if key not in self._bias_cache:
            self._bias_cache[key] = _xformers_fmha().BlockDiagonalMask.from_seqlens(
                list(self.lengths), device=device
            )
        return self._bias_cache[key]


@functools.cache
def _xformers_fmha():
    from xformers.ops import fmha

    return fmha


@functools.cache
def xformers_available() -> bool:
    """True when xformers imports (and so can serve CUDA tensors)."""
    try:
        _xformers_fmha()
    except Exception:  # any import-time failure (missing wheel, ABI mismatch) means unavailable
        return False
    return True


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments) -> Tensor:
    """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]; one SDPA call per equal-length run."""
    outputs, start = [], 0
    for length, count in segments.runs:
        stop = start + length * count
        q_run, k_run, v_run = (
            t[start:stop].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q_run, k_run, v_run)
        outputs.append(out.transpose(1, 2).reshape(stop - start, *q.shape[1:]))
        start = stop
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments) -> Tensor:
    """q, k, v [T, heads, head_dim] on CUDA -> [T, heads, head_dim] via a block-diagonal mask."""
    fmha = _xformers_fmha()
    bias = segments.xformers_bias(q.device)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


BACKENDS: dict[str, Callable[[Tensor, Tensor, Tensor, Segments], Tensor]] = {
    "sdpa": sdpa_attention,
    "xformers": xformers_attention,
}


def resolve_backend(name: str, device: torch.device) -> str:
    """Concrete backend for a tensor on ``device``: ``auto`` picks xformers only on CUDA."""
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS_NAMES}")
    if name == "xformers" and device.type != "cuda":
        raise ValueError("the xformers backend needs CUDA tensors; use 'sdpa' or 'auto' on CPU")
    return name


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments, backend: str = "auto") -> Tensor:
    """Block-diagonal attention over packed q, k, v [T, heads, head_dim].

    On CPU the softmax runs in float32 whatever the input dtype (reduced-precision CPU attention
    is slow and inaccurate); the result comes back in the input dtype.
    """
    name = resolve_backend(backend, q.device)
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return BACKENDS[name](q.float(), k.float(), v.float(), segments).to(q.dtype)
    return BACKENDS[name](q, k, v, segments)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, applied segment by segment."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, segments: Segments, backend: str = "auto") -> Tensor:
        tokens, dim = x.shape
        # qkv rows are [q | k | v], each split into heads as consecutive head_dim chunks.
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, dim // self.num_heads).unbind(1)
        return self.proj(segment_attention(q, k, v, segments, backend).reshape(tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: Tensor, rate: float, segments: Segments) -> Tensor:
    """Stochastic depth per segment (the reference drops per row of its [groups, L, C] batch)."""
    keep = torch.rand(len(segments.lengths), device=x.device) >= rate
    scale = keep.to(x.dtype) / (1.0 - rate)
    return x * scale[segments.segment_ids(x.device)][:, None]


class Block(nn.Module):
    """Pre-norm transformer block (timm layout) on a packed [T, C] sequence."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor, segments: Segments, backend: str = "auto") -> Tensor:
        attn = self.attn(self.norm1(x), segments, backend)
        if self.training and self.drop_path > 0:
            attn = drop_path(attn, self.drop_path, segments)
        x = x + attn
        mlp = self.mlp(self.norm2(x))
        if self.training and self.drop_path > 0:
            mlp = drop_path(mlp, self.drop_path, segments)
        return x + mlp
