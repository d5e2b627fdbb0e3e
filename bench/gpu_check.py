"""GPU check of the vision trunk; writes a markdown block for docs/performance.md.

1. xformers vs sdpa backends on one packed batch of mixed studies (bf16 autocast): max abs
   difference of the pooled embeddings (and of each against fp32 sdpa, for scale).
2. Forward+backward of vit_base_multiscan_h2_token1176 (bf16 autocast, backend "auto") on studies
   of 4 and 8 scans: step time, peak memory (torch.cuda.max_memory_allocated), achieved TFLOP/s
   and MFU against the H100/H200 bf16 dense peak (989 TFLOP/s). FLOPs are counted analytically
   from the packed layout (matmuls only, backward = 2x forward, no recomputation).

    python3 bench/gpu_check.py --out gpu_check.md      # on a CUDA machine (bench/gpu_check.sh)
    python3 bench/gpu_check.py --dry-run --out x.md    # CPU, tiny preset: checks the logic only
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from hlip.model import create_vision
from hlip.model.attention import xformers_available
from hlip.model.packing import PackedStudies

PEAK_TFLOPS = 989.0  # H100 / H200 SXM, bf16 dense


def trunk_flops(model, packed: PackedStudies) -> float:
    """Forward FLOPs of ``model.forward_packed(packed)`` (multiply-add = 2), matmuls only."""
    dim, layout = model.embed_dim, packed.layout
    hidden = model.blocks[0].mlp.fc1.out_features
    flops = 2.0 * packed.patches.numel() * dim  # patch embedding
    last = len(model.blocks) - 1
    for i, level in enumerate(model.block_levels):
        lengths = layout.levels[level].segments.lengths
        tokens = sum(lengths)
        flops += 2.0 * tokens * dim * 3 * dim  # qkv for every token
        if i == last:  # pooled output: only cls rows go on past the keys and values
            queries, attended = len(lengths), sum(lengths)
        else:
            queries, attended = tokens, sum(n * n for n in lengths)
        flops += 4.0 * dim * attended  # q k^T and attn v
        flops += 2.0 * queries * (dim * dim + 2 * dim * hidden)  # proj, fc1, fc2
    return flops


def make_studies(model, scans: list[int], seed: int, vary_depth: bool = False) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    depth, height, width = model.img_size
    studies = []
    for i, n in enumerate(scans):
        d = max(model.patch_size[0], depth - (i % 3) * model.patch_size[0]) if vary_depth else depth
        studies.append([torch.randn(d, height, width, generator=gen) for _ in range(n)])
    return studies


def _pooled(model, packed, backend: str, dtype) -> torch.Tensor:
    model.attn_backend = backend
    with (
        torch.no_grad(),
        torch.autocast(packed.patches.device.type, dtype=dtype, enabled=dtype != torch.float32),
    ):
        return model.forward_packed(packed).float()


def backend_check(model, device, dtype) -> list[str]:
    packed = model.pack(make_studies(model, [1, 3, 2, 4], seed=1, vary_depth=True)).to(device)
    exact = _pooled(model, packed, "sdpa", torch.float32)
    sdpa = _pooled(model, packed, "sdpa", dtype)
    lines = [f"| sdpa {dtype} vs sdpa fp32 | {(sdpa - exact).abs().max().item():.3e} |"]
    if device.type == "cuda" and xformers_available():
        xf = _pooled(model, packed, "xformers", dtype)
        lines.insert(0, f"| xformers vs sdpa ({dtype}) | {(xf - sdpa).abs().max().item():.3e} |")
        lines.append(f"| xformers {dtype} vs sdpa fp32 | {(xf - exact).abs().max().item():.3e} |")
    else:
        lines.insert(0, "| xformers vs sdpa | xformers unavailable on this device |")
    model.attn_backend = "auto"
    return lines


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_check(model, device, dtype, scans: int, studies: int, steps: int) -> str:
    packed = model.pack(make_studies(model, [scans] * studies, seed=scans)).to(device)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.forward_packed(packed).float().square().mean()
        loss.backward()

    step()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    tflops = 3 * trunk_flops(model, packed) / seconds / 1e12
    return (
        f"| {scans} | {studies} | {packed.num_tokens} | {seconds * 1e3:.1f} | {peak:.2f} "
        f"| {tflops:.1f} | {100 * tflops / PEAK_TFLOPS:.1f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, fp32: logic check only")
    parser.add_argument("--studies", type=int, default=4, help="studies per batch in the step check")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    if args.dry_run:
        device, dtype, preset = torch.device("cpu"), torch.float32, "vit_nano_multiscan_h3"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --dry-run to check the logic on CPU)")
        device, dtype, preset = torch.device("cuda"), torch.bfloat16, "vit_base_multiscan_h2_token1176"
    torch.manual_seed(0)
    model = create_vision(preset).to(device).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    xformers = "yes" if xformers_available() else "no"
    lines = [
        f"#### GPU check: {name}, torch {torch.__version__}, xformers kernels run: {xformers}, {preset}",
        "",
        "| backend comparison (pooled embeddings, packed studies of 1/3/2/4 scans) | max abs diff |",
        "|---|---|",
        *backend_check(model, device, dtype),
        "",
        f"Forward+backward, {dtype} autocast, backend auto, median of {args.steps} steps "
        f"(MFU vs {PEAK_TFLOPS:.0f} TFLOP/s):",
        "",
        "| scans/study | studies | tokens | step ms | peak GiB | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
        *(step_check(model, device, dtype, scans, args.studies, args.steps) for scans in (4, 8)),
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
