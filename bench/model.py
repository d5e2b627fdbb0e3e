"""Vision-trunk benchmark on CPU (fp32, 2 threads), printed as markdown for docs/performance.md.

1. Hierarchical attention (vit_base_multiscan_h2_token1176) vs the same trunk with every block at
   study level: forward+backward time and peak memory at 2 and 4 scans (batch 1).
2. Padding-free packing vs the reference's batching (every study's scans repeated to a fixed N):
   useful tokens/s of forward+backward on a mix of studies with 1..8 scans (vit_tiny_multiscan_h2:
   the ratio depends on token counts, and ViT-B would take minutes per step on 2 cores).
3. Absolute times (median of 3) beside the published encoder's, measured on this machine kind.

Each configuration runs in its own subprocess so that peak RSS (ru_maxrss, minus the RSS before
the measured step) belongs to it alone.

    .venv/bin/python bench/model.py            # about 4 minutes
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model, run):
    def step():
        model.zero_grad(set_to_none=True)
        run().sum().backward()

    return step


def trunk_worker(attention: str, scans: int, repeats: int) -> dict:
    """Forward (eval, no_grad) and forward+backward (train) of the ViT-B trunk, batch 1."""
    import torch

    from hlip.model import create_vision

    overrides = {}
    if attention == "full":
        overrides = dict(slice_attn_indexes=(), scan_attn_indexes=(), study_attn_indexes=tuple(range(12)))
    model = create_vision(TRUNK, **overrides)
    x = torch.randn(1, scans, 1, *model.img_size)
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        base = _rss_bytes()
        forward = _timed(lambda: model(x), repeats)
        peak_forward = _peak_bytes() - base
    model.train()
    base = _rss_bytes()
    train = _timed(_train_step(model, lambda: model(x)), repeats)
    return dict(forward=forward, train=train, peak_forward=peak_forward, peak_train=_peak_bytes() - base)


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
    return dict(
        packed=_timed(_train_step(model, lambda: model.forward_packed(packed)), repeats),
        padded=_timed(_train_step(model, lambda: model(padded)), repeats),
        pack_seconds=pack_seconds,
        useful_tokens=packed.num_tokens,
        padded_tokens=padded.shape[0] * fixed * packed.num_tokens // sum(scan_counts),
    )


def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def report(quick: bool) -> None:
    repeats = 1 if quick else 3
    scan_counts = (2,) if quick else (2, 4)
    print(
        f"## Vision trunk ({'--quick, ' if quick else ''}fp32, torch threads 2, batch 1, median of {repeats})\n"
    )
    trunk = {
        (attn, n): _spawn(dict(kind="trunk", attention=attn, scans=n, repeats=repeats))
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
    print(f"{PACKING_PRESET}, studies with {counts} scans ({useful} useful tokens; repeat-padding to")
    print(
        f"{max(counts)} scans computes {pack['padded_tokens']}). pack_studies took {pack['pack_seconds']:.3f} s.\n"
    )
    print("| batching | step s | useful tokens/s | vs repeat-padding |")
    print("|---|---|---|---|")
    print(
        f"| repeat scans to N={max(counts)} (reference) | {pack['padded']:.2f} | {padded_rate:.0f} | 1.00x |"
    )
    print(
        f"| packed, padding-free | {pack['packed']:.2f} | {packed_rate:.0f} | {packed_rate / padded_rate:.2f}x |"
    )

    print(f"\n### 3. Absolute times vs the published encoder ({TRUNK})\n")
    print("| attention | scans | forward s (ref) | ratio | fwd+bwd s (ref) | ratio | fwd peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for (attn, n), r in trunk.items():
        ref = REFERENCE_SECONDS.get((attn, n))
        fwd = f"{r['forward']:.2f} ({ref[0]})" if ref else f"{r['forward']:.2f} (-)"
        bwd = f"{r['train']:.2f} ({ref[1]})" if ref else f"{r['train']:.2f} (-)"
        ratios = (f"{r['forward'] / ref[0]:.2f}", f"{r['train'] / ref[1]:.2f}") if ref else ("-", "-")
        print(f"| {attn} | {n} | {fwd} | {ratios[0]} | {bwd} | {ratios[1]} | {_gib(r['peak_forward'])} |")
    print("\nratio = ours / reference (below 1 is faster).")


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
