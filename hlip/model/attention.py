"""Block-diagonal self-attention over a packed token sequence, and the pre-norm ViT block.

A packed sequence [T, C] is a concatenation of independent segments (one per slice, scan or study,
each starting with its cls token). Segments never attend to each other. Two interchangeable
backends compute this:

- ``sdpa``: PyTorch ``scaled_dot_product_attention``, one call per run of equal-length segments.
  The packing orders segments by length at every level, so a run is a contiguous [G*L] slice that
  reshapes to [G, heads, L, head_dim] without any gather.
- ``xformers``: ``memory_efficient_attention`` with ``fmha.BlockDiagonalMask`` (CUDA only; imported
  lazily, never needed on CPU).
- ``auto``: xformers for CUDA tensors when its kernels run on this GPU, else sdpa.

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
    backend issues one call per run. Device tensors derived from the lengths (segment starts,
    token ids, xformers masks) are cached because every block of one level reuses them.
    """

    lengths: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    _cache: dict = field(default_factory=dict, repr=False)

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

    def _cached(self, name: str, device, build):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def segment_ids(self, device) -> Tensor:
        """[T] index of the segment each token belongs to (for per-segment drop-path)."""

        def build():
            lengths = torch.tensor(self.lengths, device=device)
            return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

        return self._cached("ids", device, build)

    def starts(self, device) -> Tensor:
        """[n_segments] position of each segment's first token (its cls token)."""

        def build():
            lengths = torch.tensor(self.lengths, device=device)
            return torch.cumsum(lengths, 0) - lengths

        return self._cached("starts", device, build)

    def xformers_bias(self, device, first_only: bool = False):
        """Block-diagonal mask; with ``first_only`` one query (the segment's first token) per segment."""

        def build():
            mask = _xformers_fmha().BlockDiagonalMask
            if first_only:
                return mask.from_seqlens([1] * len(self.lengths), list(self.lengths), device=device)
            return mask.from_seqlens(list(self.lengths), device=device)

        return self._cached(f"xformers{int(first_only)}", device, build)


@functools.cache
def _xformers_fmha():
    from xformers.ops import fmha

    return fmha


@functools.cache
def xformers_available() -> bool:
    """True when xformers' memory-efficient kernels run on this machine's GPU.

    Importing is not enough: a wheel built for another torch or CUDA version imports with a
    warning and has no kernels, failing only at the first call. One tiny call decides instead.
    """
    if not torch.cuda.is_available():
        return False
    try:
        x = torch.zeros(1, 2, 1, 64, device="cuda", dtype=torch.float16)
        _xformers_fmha().memory_efficient_attention(x, x, x)
    except Exception:  # missing wheel, ABI mismatch, kernels not built for this GPU
        return False
    return True


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments, first_only: bool = False) -> Tensor:
    """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]; one SDPA call per equal-length run.

    With ``first_only`` only each segment's first token queries: -> [n_segments, heads, head_dim].
    """
    outputs, start = [], 0
    for length, count in segments.runs:
        stop = start + length * count
        q_run, k_run, v_run = (
            t[start:stop].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        if first_only:
            q_run = q_run[:, :, :1]
        out = F.scaled_dot_product_attention(q_run, k_run, v_run)
        outputs.append(out.transpose(1, 2).reshape(-1, *q.shape[1:]))
        start = stop
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def xformers_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Segments, first_only: bool = False
) -> Tensor:
    """As ``sdpa_attention``, for CUDA tensors, with one block-diagonal memory-efficient call."""
    fmha = _xformers_fmha()
    if first_only:
        q = q.index_select(0, segments.starts(q.device))
    bias = segments.xformers_bias(q.device, first_only)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


BACKENDS: dict[str, Callable[..., Tensor]] = {
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


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Segments, backend: str = "auto", first_only: bool = False
) -> Tensor:
    """Block-diagonal attention over packed q, k, v [T, heads, head_dim].

    ``first_only`` keeps only each segment's first query (the cls token): the pooled output of
    the last block needs nothing else. On CPU the softmax runs in float32 whatever the input dtype
    (reduced-precision CPU attention is slow and inaccurate); the result has the input dtype.
    """
    attend = BACKENDS[resolve_backend(backend, q.device)]
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return attend(q.float(), k.float(), v.float(), segments, first_only).to(q.dtype)
    return attend(q, k, v, segments, first_only)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, applied segment by segment."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, segments: Segments, backend: str = "auto", first_only: bool = False
    ) -> Tensor:
        tokens, dim = x.shape
        # qkv rows are [q | k | v], each split into heads as consecutive head_dim chunks.
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, dim // self.num_heads).unbind(1)
        return self.proj(segment_attention(q, k, v, segments, backend, first_only).flatten(1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: Tensor, rate: float, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Stochastic depth per segment (the reference drops per row of its [groups, L, C] batch)."""
    keep = torch.rand(num_segments, device=x.device) >= rate
    scale = keep.to(x.dtype) / (1.0 - rate)
    return x * scale[segment_ids][:, None]


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

    def forward(
        self, x: Tensor, segments: Segments, backend: str = "auto", first_only: bool = False
    ) -> Tensor:
        """[T, C] -> [T, C]; with ``first_only`` -> [n_segments, C], the segments' first tokens only."""
        attn = self.attn(self.norm1(x), segments, backend, first_only)
        if first_only:
            x = x.index_select(0, segments.starts(x.device))
        if self.training and self.drop_path > 0:
            n = len(segments.lengths)
            ids = torch.arange(n, device=x.device) if first_only else segments.segment_ids(x.device)
            attn = drop_path(attn, self.drop_path, ids, n)
            x = x + attn
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, ids, n)
        x = x + attn
        return x + self.mlp(self.norm2(x))
