"""Block-diagonal self-attention over a packed token sequence, and the pre-norm ViT block.

A packed sequence [T, C] is a concatenation of independent segments (one per slice, scan or study,
each starting with its cls token). Segments never attend to each other. Interchangeable backends
compute this:

- ``sdpa``: PyTorch ``scaled_dot_product_attention``, one call per run of equal-length segments.
  The packing orders segments by length at every level, so a run is a contiguous [G*L] slice that
  reshapes to [G, heads, L, head_dim] without any gather. Works everywhere, in any dtype.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention over cumulative sequence
  lengths, torch >= 2.10) in one call per block; CUDA, float16/bfloat16 only.
- ``xformers``: ``memory_efficient_attention`` with ``fmha.BlockDiagonalMask`` (CUDA only; imported
  lazily, never needed on CPU; the wheel must be built for the installed torch).
- ``auto``: on CUDA, the faster of varlen and xformers by a one-call probe of each (those that
  fail to load or run are left out), else sdpa; on CPU, sdpa with no probe. The choice is logged.

Parameter names follow timm's ``Block`` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) so
published state_dicts load unchanged. The token-wise parts of a block (everything but the
attention core) can be compiled with :func:`compile_blocks`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

BACKENDS_NAMES = ("auto", "sdpa", "varlen", "xformers")
PROBED = ("varlen", "xformers")
"""The packed kernels ``auto`` probes on CUDA, before falling back to sdpa."""
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(eq=False)
class Segments:
    """Segment lengths of a packed sequence, in packed order, plus their runs of equal length.

    ``runs`` is ((length, count), ...) with consecutive segments of equal length merged; the sdpa
    backend issues one call per run. ``cu_seqlens`` [n_segments + 1] (int32, from 0) are the
    cumulative lengths the varlen kernel takes; it is built on the host with the lengths and moves
    with the batch (``apply``: pinning, non-blocking device copies), so no step copies it from
    pageable memory. Other device tensors derived from it (segment starts, token ids, xformers
    masks) are cached because every block of one level reuses them.
    """

    lengths: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    cu_seqlens: Tensor
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
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu_seqlens[1:])
        return cls(lengths, tuple((n, g) for n, g in runs), cu_seqlens)

    @property
    def total(self) -> int:
        return sum(n * g for n, g in self.runs)

    @property
    def max_len(self) -> int:
        """The longest segment (varlen's ``max_k``: a host int, so reading it never syncs)."""
        return max(self.lengths)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Segments:
        """Copy with ``fn`` applied to ``cu_seqlens`` (device moves, pinning)."""
        return replace(self, cu_seqlens=fn(self.cu_seqlens), _cache={})

    def _cached(self, name: str, device, build):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def cumulative(self, device) -> Tensor:
        """``cu_seqlens`` on ``device`` (copied only when the batch was not moved there)."""
        device = torch.device(device)
        if self.cu_seqlens.device == device:
            return self.cu_seqlens
        return self._cached("cu", device, lambda: self.cu_seqlens.to(device))

    def segment_ids(self, device) -> Tensor:
        """[T] index of the segment each token belongs to (for per-segment drop-path)."""

        def build():
            cu = self.cumulative(device)
            ids = torch.arange(len(self.lengths), device=cu.device)
            return torch.repeat_interleave(ids, cu.diff(), output_size=self.total)

        return self._cached("ids", device, build)

    def starts(self, device) -> Tensor:
        """[n_segments] position of each segment's first token (its cls token)."""
        return self._cached("starts", device, lambda: self.cumulative(device)[:-1].long())

    def varlen_queries(self, device, first_only: bool) -> tuple[Tensor, int]:
        """(cu_seq_q, max_q): every token queries, or with ``first_only`` one query per segment."""
        if not first_only:
            return self.cumulative(device), self.max_len
        n = len(self.lengths)
        return self._cached("cu1", device, lambda: torch.arange(n + 1, device=device, dtype=torch.int32)), 1

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


def _varlen_kernel():
    """``varlen_attn`` of this torch (ImportError before 2.10); tests replace it on CPU."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


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


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments, first_only: bool = False) -> Tensor:
    """As ``sdpa_attention``, with one ``varlen_attn`` call over the cumulative lengths.

    With ``first_only`` the queries are the segments' first tokens, each its own query segment
    of length 1 (cu_seq_q = 0..n) against the full key segments.
    """
    if first_only:
        q = q.index_select(0, segments.starts(q.device))
    cu_q, max_q = segments.varlen_queries(q.device, first_only)
    cu_k = segments.cumulative(q.device)
    return _varlen_kernel()(q, k, v, cu_q, cu_k, max_q, segments.max_len)


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
    "varlen": varlen_attention,
    "xformers": xformers_attention,
}
CUDA_ONLY = ("varlen", "xformers")


def probe_backends(device: torch.device, heads: int, head_dim: int, dtype=torch.bfloat16) -> dict[str, float]:
    """Milliseconds of one forward+backward call of each ``PROBED`` backend that works here.

    The probe packs four 1177-token segments (a ViT-B scan level) with the caller's heads and
    head_dim. A backend that fails to import or to run (no wheel, a wheel built for another
    torch, kernels missing for this GPU) is left out with the reason logged. Each runs once to
    load its kernels, then once timed.
    """
    segments = Segments.from_lengths([1177] * 4).apply(lambda t: t.to(device))
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (segments.total, heads, head_dim)
    qkv = [torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3)]
    timings = {}
    for name in PROBED:
        try:
            with torch.enable_grad():  # the first attention call may come from a no_grad forward
                for _ in range(2):
                    _synchronize(device)
                    start = time.perf_counter()
                    BACKENDS[name](*qkv, segments).sum().backward()
                    _synchronize(device)
            timings[name] = 1e3 * (time.perf_counter() - start)
        except Exception as error:  # missing wheel, ABI mismatch, kernels not built for this GPU
            log.info("attention backend %s unavailable on %s: %s", name, device, error)
    return timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _auto_ranking(device: torch.device, heads: int, head_dim: int) -> tuple[str, ...]:
    """Probed backends, fastest first (probed once per device and head shape)."""
    timings = probe_backends(device, heads, head_dim)
    ranking = tuple(sorted(timings, key=timings.get))
    probe = ", ".join(f"{name} {timings[name]:.2f} ms" for name in ranking) or "none works"
    log.info("attention auto on %s: %s (probe: %s)", device, ranking[0] if ranking else "sdpa", probe)
    return ranking


@functools.cache
def _announce(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    log.info("attention backend %s for %s tensors on %s", backend, str(dtype).removeprefix("torch."), device)


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32, heads: int = 12, head_dim: int = 64
) -> str:
    """Concrete backend for q of ``dtype`` [T, heads, head_dim] on ``device``.

    ``auto``: sdpa on CPU (no probe); on CUDA the fastest probed backend that takes ``dtype``
    (varlen needs float16/bfloat16), else sdpa.
    """
    if name == "auto":
        chosen = "sdpa"
        if device.type == "cuda":
            usable = [
                b for b in _auto_ranking(device, heads, head_dim) if b != "varlen" or dtype in HALF_DTYPES
            ]
            chosen = usable[0] if usable else "sdpa"
        _announce(chosen, device, dtype)
        return chosen
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS_NAMES}")
    if name in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"the {name} backend needs CUDA tensors; use 'sdpa' or 'auto' on CPU")
    if name == "varlen" and dtype not in HALF_DTYPES:
        raise ValueError(f"the varlen backend needs float16/bfloat16 inputs (got {dtype}): use bf16 autocast")
    _announce(name, device, dtype)
    return name


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Segments, backend: str = "auto", first_only: bool = False
) -> Tensor:
    """Block-diagonal attention over packed q, k, v [T, heads, head_dim].

    ``first_only`` keeps only each segment's first query (the cls token): the pooled output of
    the last block needs nothing else. On CPU the softmax runs in float32 whatever the input dtype
    (reduced-precision CPU attention is slow and inaccurate); the result has the input dtype.
    """
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return segment_attention(q.float(), k.float(), v.float(), segments, backend, first_only).to(q.dtype)
    attend = BACKENDS[resolve_backend(backend, q.device, q.dtype, q.shape[1], q.shape[2])]
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

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[T, C] -> q, k, v [T, heads, head_dim]."""
        tokens, dim = x.shape
        # qkv rows are [q | k | v], each split into heads as consecutive head_dim chunks.
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, dim // self.num_heads).unbind(1)
        return q, k, v

    def forward(
        self, x: Tensor, segments: Segments, backend: str = "auto", first_only: bool = False
    ) -> Tensor:
        q, k, v = self.heads(x)
        return self.proj(segment_attention(q, k, v, segments, backend, first_only).flatten(1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path_scale(rate: float, segment_ids: Tensor, num_segments: int) -> Tensor:
    """[rows, 1] stochastic-depth factor per segment (the reference drops per row of its
    [groups, L, C] batch): 0 for dropped segments, 1 / (1 - rate) for kept ones."""
    keep = torch.rand(num_segments, device=segment_ids.device) >= rate
    return (keep.float() / (1.0 - rate))[segment_ids][:, None]


class Block(nn.Module):
    """Pre-norm transformer block (timm layout) on a packed [T, C] sequence.

    The forward is three parts: the token-wise ``_qkv`` (norm1, qkv), the attention core, and the
    token-wise ``_residual_mlp`` (proj, residuals, norm2, mlp). :func:`compile_blocks` compiles
    the two token-wise parts, whose only varying shape is the number of rows; the attention core
    stays eager, as its segment layout changes with every batch.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.compiled: tuple[Callable, Callable] | None = None

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.attn.heads(self.norm1(x))

    def _residual_mlp(self, x: Tensor, attn: Tensor, scales: tuple[Tensor, Tensor] | None) -> Tensor:
        attn = self.attn.proj(attn.flatten(1))
        x = x + (attn if scales is None else attn * scales[0].to(attn.dtype))
        mlp = self.mlp(self.norm2(x))
        return x + (mlp if scales is None else mlp * scales[1].to(mlp.dtype))

    def forward(
        self, x: Tensor, segments: Segments, backend: str = "auto", first_only: bool = False
    ) -> Tensor:
        """[T, C] -> [T, C]; with ``first_only`` -> [n_segments, C], the segments' first tokens only."""
        qkv, residual_mlp = self.compiled or (self._qkv, self._residual_mlp)
        attn = segment_attention(*qkv(x), segments, backend, first_only)
        if first_only:
            x = x.index_select(0, segments.starts(x.device))
        scales = None
        if self.training and self.drop_path > 0:
            n = len(segments.lengths)
            ids = torch.arange(n, device=x.device) if first_only else segments.segment_ids(x.device)
            scales = (drop_path_scale(self.drop_path, ids, n), drop_path_scale(self.drop_path, ids, n))
        return residual_mlp(x, attn, scales)


class CompileCounter:
    """A ``torch.compile`` backend that counts the graphs it compiles (first compiles and
    recompiles alike) before handing them to the real backend (``inductor``, ``aot_eager``...)."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend, self.graphs = backend, 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        from torch._dynamo import lookup_backend

        self.graphs += 1
        return lookup_backend(self.backend)(graph, example_inputs)


def _rows_dynamic(fn: Callable) -> Callable:
    """``fn`` with the row dimension of its tensor arguments marked dynamic, so one graph serves
    every token count instead of one graph per count (packed batches rarely repeat a count)."""

    @functools.wraps(fn)
    def call(*args):
        for arg in torch.utils._pytree.tree_leaves(args):
            if isinstance(arg, Tensor):
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return fn(*args)

    return call


def compile_blocks(blocks: Iterable[Block], backend: str = "inductor") -> CompileCounter:
    """Compile every block's token-wise parts with ``torch.compile``; returns the graph counter.

    All blocks share the two functions' code, so graphs are reused across blocks: the count stays
    at a few graphs per variant (qkv, residual+mlp, the pooled last block, drop path) whatever
    the batches' token counts.
    """
    counter = CompileCounter(backend)
    for block in blocks:
        block.compiled = tuple(
            _rows_dynamic(torch.compile(fn, backend=counter, dynamic=False))
            for fn in (block._qkv, block._residual_mlp)
        )
    return counter
