"""Vision-trunk benchmark on CPU (fp32, 2 threads), printed as markdown for docs/performance.md.

1. Hierarchical attention (vit_base_multiscan_h2_token1176) vs the same trunk with every block at
   study level: forward+backward time and peak memory at 2 and 4 scans (batch 1).
2. Padding-free packing vs the reference's batching (every study's scans repeated to a fixed N):
   useful tokens/s of forward+backward on a mix of studies with 1..8 scans (vit_tiny_multiscan_h2:
   the ratio depends on token counts, and ViT-B would take minutes per step on 2 cores).
3. Absolute times (median of 3) beside a same-run baseline running the published forward
   algorithm on the same weights, and beside the published encoder's times on this machine kind.

Each configuration runs in its own subprocess so that peak RSS (ru_maxrss, minus the RSS before
the measured step) belongs to it alone.

    .venv/bin/python bench/model.py            # about 5 minutes on an idle machine
    .venv/bin/python bench/model.py --quick    # 2 scans only, one repeat: under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Published encoder (Zch0414/hlip fe8d764 + timm), batch 1, fp32, 2 threads, this machine kind:
# (attention, scans) -> (forward s, forward+backward s).
REFERENCE_SECONDS = {("hier", 2): (1.96, 5.53), ("hier", 4): (4.55, 13.3), ("full", 2): (2.19, 6.77)}
TRUNK = "vit_base_multiscan_h2_token1176"
PACKING_PRESET = "vit_tiny_multiscan_h2"


LEVEL_KEY = ("slice", "scan", "study")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, run in alternation so load changes hit all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _train_step(model, run):
    def step():
        model.zero_grad(set_to_none=True)
        run().sum().backward()

    return step


def reference_style(model):
    """The published encoder's forward (SPEC.md section 3) on ``model``'s weights: Conv3d patch
    embedding, dense [groups, L, C] tensors regrouped by reshape/cat, timm's attention layout,
    every token through every block. The same-run baseline for "equal work"."""
    import torch
    import torch.nn.functional as F

    from hlip.model.pos_embed import resample_spatial

    def attend(block, x):
        groups, length, dim = x.shape
        heads = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(x)).reshape(groups, length, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(groups, length, dim)
        x = x + block.attn.proj(out)
        return x + block.mlp(block.norm2(x))

    def regroup(x, src, dst, shape):
        batch, scans, depth = shape
        counts = {"slice": batch * scans * depth, "scan": batch * scans, "study": batch}
        cls, patches = x[:, :1], x[:, 1:]
        if counts[dst] < counts[src]:
            cls = cls.reshape(counts[dst], -1, x.shape[-1]).mean(1, keepdim=True)
        else:
            cls = cls.repeat_interleave(counts[dst] // counts[src], dim=0)
        return torch.cat([cls, patches.reshape(counts[dst], -1, x.shape[-1])], dim=1)

    def forward(x):
        batch, scans = x.shape[:2]
        tokens = model.patch_embed.proj(x.flatten(0, 1))
        dim, grid = tokens.shape[1], tuple(tokens.shape[2:])
        tokens = tokens.permute(0, 2, 3, 4, 1).reshape(batch, scans, *grid, dim)
        pos = resample_spatial(model.spatial_posemb, grid).view(1, 1, *grid, dim)
        pos = pos + model.sequential_posemb[0, :scans].float().view(1, scans, 1, 1, 1, dim)
        level = LEVEL_KEY[model.block_levels[0]]
        shape = (batch, scans, grid[0])
        counts = {"slice": batch * scans * grid[0], "scan": batch * scans, "study": batch}
        x = (tokens + pos).reshape(counts[level], -1, dim)
        x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1)
        for block, block_level in zip(model.blocks, model.block_levels, strict=True):
            if LEVEL_KEY[block_level] != level:
                x, level = regroup(x, level, LEVEL_KEY[block_level], shape), LEVEL_KEY[block_level]
            x = attend(block, x)
        if level != "study":
            x = regroup(x, level, "study", shape)
        return model.norm(x)[:, 0]

    return forward


def trunk_worker(attention: str, scans: int, repeats: int, baseline: bool) -> dict:
    """Forward (eval, no_grad) and forward+backward (train) of the ViT-B trunk, batch 1, with
    the reference-style forward on the same weights interleaved when ``baseline``."""
    import torch

    from hlip.model import create_vision

    overrides = {}
    if attention == "full":
        overrides = dict(slice_attn_indexes=(), scan_attn_indexes=(), study_attn_indexes=tuple(range(12)))
    model = create_vision(TRUNK, **overrides)
    x = torch.randn(1, scans, 1, *model.img_size)
    reference = reference_style(model)
    model.eval()
    with torch.no_grad():
        base = _rss_bytes()
        ours = model(x)  # warm-up, and our forward's peak
        peak_forward = _peak_bytes() - base
        if baseline:
            gap = (ours - reference(x)).abs().max().item()
            assert gap < 1e-4, f"reference-style baseline disagrees by {gap}"
        fns = {"forward": lambda: model(x), "ref_forward": lambda: reference(x)}
        result = _interleaved(fns if baseline else {"forward": fns["forward"]}, repeats)
    model.train()
    base = _rss_bytes()
    _train_step(model, lambda: model(x))()  # warm-up, and our step's peak
    result.update(peak_forward=peak_forward, peak_train=_peak_bytes() - base)
    fns = {
        "train": _train_step(model, lambda: model(x)),
        "ref_train": _train_step(model, lambda: reference(x)),
    }
    result.update(_interleaved(fns if baseline else {"train": fns["train"]}, repeats))
    return result


def packing_worker(scan_counts: list[int], repeats: int) -> dict:
    """Forward+backward of one batch, packed vs every study repeated to max(scan_counts) scans."""
    import torch

    from hlip.model import create_vision

    model = create_vision(PACKING_PRESET).train()
    gen = torch.Generator().manual_seed(0)
    studies = [[torch.randn(*model.img_size, generator=gen) for _ in range(n)] for n in scan_counts]
    start = time.perf_counter()
    packed = model.pack(studies)
    pack_seconds = time.perf_counter() - start
    fixed = max(scan_counts)
    padded = torch.stack([torch.stack([s[i % len(s)] for i in range(fixed)]) for s in studies])[:, :, None]
    model.forward_packed(packed).sum().backward()  # warm-up
    fns = {
        "packed": _train_step(model, lambda: model.forward_packed(packed)),
        "padded": _train_step(model, lambda: model(padded)),
    }
    return dict(
        _interleaved(fns, repeats),
        pack_seconds=pack_seconds,
        useful_tokens=packed.num_tokens,
        padded_tokens=len(studies) * fixed * packed.num_tokens // sum(scan_counts),
    )


def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def report(quick: bool) -> None:
    repeats = 1 if quick else 3
    scan_counts = (2,) if quick else (2, 4)
    print(
        f"## Vision trunk ({'--quick, ' if quick else ''}fp32, torch threads 2, batch 1, median of {repeats})\n"
    )
    print(f"load average at start (1/5/15 min): {_load()}\n")
    trunk = {
        (attn, n): _spawn(
            dict(
                kind="trunk",
                attention=attn,
                scans=n,
                repeats=repeats,
                baseline=(attn, n) in REFERENCE_SECONDS,
            )
        )
        for n in scan_counts
        for attn in ("hier", "full")
    }

    print(f"### 1. Hierarchical vs full-study attention ({TRUNK}, forward+backward)\n")
    print("| scans | hierarchical s | full-study s | speed-up | hier peak GiB | full peak GiB |")
    print("|---|---|---|---|---|---|")
    for n in scan_counts:
        h, f = trunk[("hier", n)], trunk[("full", n)]
        print(
            f"| {n} | {h['train']:.2f} | {f['train']:.2f} | {f['train'] / h['train']:.2f}x "
            f"| {_gib(h['peak_train'])} | {_gib(f['peak_train'])} |"
        )

    print("\n### 2. Packed batch vs repeat-to-fixed-N batching (forward+backward)\n")
    counts = [1, 2, 3, 4] if quick else [3, 1, 8, 5, 2, 7, 4, 6]
    pack = _spawn(dict(kind="packing", scan_counts=counts, repeats=repeats))
    useful = pack["useful_tokens"]
    packed_rate, padded_rate = useful / pack["packed"], useful / pack["padded"]
    print(f"{PACKING_PRESET}, studies with {counts} scans: {useful} useful tokens; repeat-padding to")
    print(
        f"{max(counts)} scans computes {pack['padded_tokens']}. pack_studies took {pack['pack_seconds']:.3f} s.\n"
    )
    print("| batching | step s | useful tokens/s | vs repeat-padding |")
    print("|---|---|---|---|")
    print(
        f"| repeat scans to N={max(counts)} (reference) | {pack['padded']:.2f} | {padded_rate:.0f} | 1.00x |"
    )
    print(
        f"| packed, padding-free | {pack['packed']:.2f} | {packed_rate:.0f} | {packed_rate / padded_rate:.2f}x |"
    )

    print(f"\n### 3. Absolute times vs the reference ({TRUNK})\n")
    print("ours: pooled forward (eval, no_grad) and forward+backward (train); ref-style: the published")
    print("forward algorithm on the same weights, same run, interleaved; published: the reference")
    print("encoder measured on this machine kind. ratio = ours / ref-style (below 1: faster).\n")
    print(
        "| attention | scans | fwd ours | fwd ref-style | ratio | fwd published | fwd+bwd ours | ref-style | ratio | published | fwd peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (attn, n), r in trunk.items():
        published = REFERENCE_SECONDS.get((attn, n), ("-", "-"))
        cells = []
        for key, pub in (("forward", published[0]), ("train", published[1])):
            ref = r.get(f"ref_{key}")
            ratio = f"{r[key] / ref:.2f}" if ref else "-"
            cells.append(f"{r[key]:.2f} | {f'{ref:.2f}' if ref else '-'} | {ratio} | {pub}")
        print(f"| {attn} | {n} | {' | '.join(cells)} | {_gib(r['peak_forward'])} |")
    print(f"\nload average at end (1/5/15 min): {_load()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 scans only, one repeat, smaller packing mix")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        report(args.quick)
        return
    import torch

    torch.set_num_threads(2)
    spec = json.loads(args.worker)
    kind = spec.pop("kind")
    result = trunk_worker(**spec) if kind == "trunk" else packing_worker(**spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
