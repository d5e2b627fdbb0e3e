"""GPU check of the training path; prints one markdown block for docs/performance.md.

1. Accuracy: every attention backend that loads, under bf16 autocast, against an fp32 sdpa run
   on the same packed studies (1-8 scans of mixed grids): max abs difference of the pooled
   embeddings and of the trunk's parameter gradients.
2. The attention kernel alone on ViT-B packings (scan and study level, 8 studies of 8 scans),
   forward+backward, per backend, with FlexAttention (a block mask from the segments) as a
   candidate row: it is not a backend, and becomes one only if it beats the others here.
3. Forward+backward+fused AdamW of vit_base_multiscan_h2_token1176 at 4 and 8 scans per study,
   batch 4 and 8, per backend, eager and compiled: step ms, peak memory, TFLOP/s and MFU against
   the card's dense bf16 peak (FLOPs counted analytically from the packed layout: matmuls only,
   backward = 2x forward). Then the host synchronisations of one step (CUDA's sync debug mode) and
   a torch.profiler summary of one step: where its GPU time goes.
4. 50 steps of hlip-train with the ct-rate preset on synthetic shards written here, today's
   eager sdpa path against the compiled auto path: studies/s and the data-wait share.

    bash bench/gpu_check.sh                            # on a CUDA machine, under 5 minutes
    python3 bench/gpu_check.py --dry-run --out x.md    # CPU, tiny preset, 2 steps: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from hlip.model import attention, create_vision
from hlip.model.attention import Segments, compile_blocks, probe_backends
from hlip.model.packing import PackedStudies

PEAKS_BF16_DENSE = {  # TFLOP/s, dense bf16 tensor-core peak by card
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
}
STEP_PRESET = "vit_base_multiscan_h2_token1176"


def card_peak(name: str) -> tuple[str, float | None]:
    """(card, dense bf16 peak TFLOP/s) for a CUDA device name; None when the card is not listed."""
    upper = name.upper()
    if "H200" in upper:
        card = "H200"
    elif "H100" in upper:
        card = "H100 PCIe" if "PCIE" in upper else "H100 NVL" if "NVL" in upper else "H100 SXM"
    elif "A100" in upper:
        card = "A100"
    else:
        return name, None
    return card, PEAKS_BF16_DENSE[card]


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
    """Studies of ``scans[i]`` scans at the model's crop size; ``vary_depth`` also varies depth and
    in-plane size by whole patches (mixed grids)."""
    gen = torch.Generator().manual_seed(seed)
    depth, height, width = model.img_size
    pd, ph, pw = model.patch_size
    studies = []
    for i, n in enumerate(scans):
        study = []
        for j in range(n):
            k = (i + j) % 3 if vary_depth else 0
            shape = (max(pd, depth - k * pd), max(ph, height - k * ph), max(pw, width - k * pw))
            study.append(torch.randn(*shape, generator=gen))
        studies.append(study)
    return studies


class Bench:
    """Device, dtype, time budget and the backends that load here."""

    def __init__(self, args) -> None:
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.preset = "vit_nano_multiscan_h3" if self.dry else STEP_PRESET
        self.compile_backend = "aot_eager" if self.dry else "inductor"
        self.steps = args.steps
        self.grid = ((2,), (2,)) if self.dry else ((4, 8), (4, 8))
        """(scans per study, studies per batch) of the trunk steps"""
        self.deadline = time.monotonic() + args.budget_s
        self.probe = {} if self.dry else probe_backends(self.device, 12, 64)
        self.backends = ["sdpa", *sorted(self.probe, key=self.probe.get)]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


# --- 1. accuracy ---------------------------------------------------------------------------------


def _pooled_and_grads(model, packed, backend: str, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.attn_backend = backend
    with autocast:
        pooled = model.forward_packed(packed).float()
    weights = torch.linspace(-1, 1, pooled.numel(), device=pooled.device).view_as(pooled)
    (pooled * weights).sum().backward()
    return pooled.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def accuracy_rows(bench: Bench, model) -> list[str]:
    packed = model.pack(make_studies(model, [1, 3, 8, 2, 5], seed=1, vary_depth=True)).to(bench.device)
    model.train()
    exact, exact_grads = _pooled_and_grads(
        model, packed, "sdpa", torch.autocast(bench.device.type, enabled=False)
    )
    scale = max(g.abs().max().item() for g in exact_grads.values())
    rows = []
    for backend in bench.backends:
        try:
            pooled, grads = _pooled_and_grads(model, packed, backend, bench.autocast())
        except Exception as error:  # a backend that probed but fails here is a finding, not a crash
            rows.append(f"| {backend} | failed: {type(error).__name__}: {error} | | |")
            continue
        grad_diff = max((grads[n] - g).abs().max().item() for n, g in exact_grads.items())
        rows.append(
            f"| {backend} | {(pooled - exact).abs().max().item():.3e} | {grad_diff:.3e} "
            f"| {grad_diff / scale:.3e} |"
        )
    model.attn_backend = "auto"
    return rows


# --- 2. the attention kernel alone ---------------------------------------------------------------


def flex_attention_fn(segments: Segments, device):
    """FlexAttention over the packed sequence with a block mask built from the segments."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    ids = segments.segment_ids(device)
    total = segments.total

    def same_segment(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    mask = create_block_mask(same_segment, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention) if device.type == "cuda" else flex_attention

    def attend(q, k, v, segments, first_only=False):
        out = compiled(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask)
        return out[0].transpose(0, 1)

    return attend


def _time_attention(bench: Bench, attend, segments, heads: int, head_dim: int) -> float:
    shape = (segments.total, heads, head_dim)
    q, k, v = (
        torch.randn(shape, device=bench.device, dtype=bench.dtype, requires_grad=True) for _ in range(3)
    )
    for _ in range(2):  # kernels loaded, compiled
        attend(q, k, v, segments).sum().backward()
    bench.sync()
    start = time.perf_counter()
    for _ in range(bench.steps):
        attend(q, k, v, segments).sum().backward()
    bench.sync()
    return 1e3 * (time.perf_counter() - start) / bench.steps


def attention_rows(bench: Bench, model) -> tuple[list[str], list[str]]:
    heads, head_dim = model.blocks[0].attn.num_heads, model.embed_dim // model.blocks[0].attn.num_heads
    per_scan = math.prod(model.grid_size)
    levels = {
        f"scan level, 64 x {per_scan + 1}": Segments.from_lengths([per_scan + 1] * 64),
        f"study level, 8 x {8 * per_scan + 1}": Segments.from_lengths([8 * per_scan + 1] * 8),
    }
    candidates = {name: attention.BACKENDS[name] for name in bench.backends}
    rows = []
    for name in [*candidates, "flex (candidate)"]:
        cells = []
        for segments in levels.values():
            segments = segments.apply(lambda t: t.to(bench.device))
            try:
                attend = candidates.get(name) or flex_attention_fn(segments, bench.device)
                cells.append(f"{_time_attention(bench, attend, segments, heads, head_dim):.2f}")
            except Exception as error:
                cells.append(f"failed: {type(error).__name__}: {str(error)[:80]}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows, list(levels)


# --- 3. trunk steps --------------------------------------------------------------------------------


class TrunkStep:
    """One forward+backward+fused-AdamW step of a trunk on one packed batch."""

    def __init__(self, bench: Bench, model) -> None:
        self.bench, self.model = bench, model
        fused = bench.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused or None)
        self.eager = [None] * len(model.blocks)
        self.counter = None

    def set_compiled(self, compiled: bool) -> None:
        if compiled and self.counter is None:
            self.counter = compile_blocks(self.model.blocks, self.bench.compile_backend)
            self.compiled = [block.compiled for block in self.model.blocks]
        for block, fns in zip(self.model.blocks, self.compiled if compiled else self.eager, strict=True):
            block.compiled = fns

    def __call__(self, packed) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.bench.autocast():
            loss = self.model.forward_packed(packed).float().square().mean()
        loss.backward()
        self.optimizer.step()


def step_row(bench: Bench, step: TrunkStep, packed, peak: float | None) -> str:
    for _ in range(2):
        step(packed)
    bench.sync()
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(bench.steps):
        step(packed)
    bench.sync()
    seconds = (time.perf_counter() - start) / bench.steps
    memory = torch.cuda.max_memory_allocated() / 2**30 if bench.device.type == "cuda" else float("nan")
    tflops = 3 * trunk_flops(step.model, packed) / seconds / 1e12
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    return f"{packed.num_tokens} | {seconds * 1e3:.1f} | {memory:.1f} | {tflops:.1f} | {mfu}"


def step_rows(bench: Bench, step: TrunkStep, peak: float | None) -> list[str]:
    rows = []
    for scans in bench.grid[0]:
        for studies in bench.grid[1]:
            packed = step.model.pack(make_studies(step.model, [scans] * studies, seed=scans)).to(bench.device)
            for compiled in (False, True):
                step.set_compiled(compiled)
                for backend in bench.backends:
                    label = f"| {scans} | {studies} | {backend} | {'compiled' if compiled else 'eager'} | "
                    if bench.left() < 60:
                        rows.append(label + "skipped: time budget | | | | |")
                        continue
                    step.model.attn_backend = backend
                    try:
                        rows.append(label + step_row(bench, step, packed, peak) + " |")
                    except torch.OutOfMemoryError:
                        rows.append(label + "out of memory | | | | |")
                        torch.cuda.empty_cache()
            del packed
    return rows


def host_syncs(bench: Bench, step: TrunkStep, packed) -> int:
    """Host synchronisations in one step (warnings of CUDA's sync debug mode)."""
    if bench.device.type != "cuda":
        return 0
    step(packed)
    bench.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(packed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "cutlass::fmha", "efficient")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "sm90", "sm80", "cublas")),
    ("fused pointwise/norm (triton)", ("triton",)),
    ("layernorm", ("layer_norm", "layernorm")),
    ("optimizer", ("adam",)),
    ("copy/gather/index", ("copy", "index", "gather", "scatter", "cat")),
)


def profile_rows(bench: Bench, step: TrunkStep, packed) -> tuple[list[str], list[str], float]:
    """Share of one step's device time by kernel kind, then its ten longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    step(packed)
    bench.sync()
    with profile(activities=activities) as prof:
        step(packed)
        bench.sync()
    device_attr = "self_device_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, device_attr) > 0]
    if bench.device.type == "cuda":  # kernels only (operator rows would count their kernels twice)
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
    total = sum(getattr(e, device_attr) for e in events) or 1.0
    kinds: dict[str, float] = defaultdict(float)
    for event in events:
        name = event.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(s in name for s in keys)), "other")
        kinds[kind] += getattr(event, device_attr)
    rows = [
        f"| {kind} | {us / 1e3:.1f} | {100 * us / total:.0f}% |"
        for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])
    ]
    top = sorted(events, key=lambda e: -getattr(e, device_attr))[:10]
    tops = [
        f"| `{e.key[:90]}` | {getattr(e, device_attr) / 1e3:.1f} | {100 * getattr(e, device_attr) / total:.0f}% |"
        for e in top
    ]
    return rows, tops, total / 1e3


# --- 4. hlip-train ---------------------------------------------------------------------------------


def write_shards(root: Path, dry: bool, studies: int) -> Path:
    from hlip.shards.synthetic import synthetic_study
    from hlip.shards.writer import write_dataset

    shape = (16, 32, 32) if dry else (112, 336, 336)
    data = root / "shards"
    write_dataset(
        data, (synthetic_study(f"study{i:04d}", n_scans=1, shape=shape, seed=i) for i in range(studies))
    )
    return data


def train_command(
    dry: bool, data: Path, out: Path, settings: list[str], steps: int, workers: int
) -> list[str]:
    """The hlip-train command line of one run (a preset plus ``--set`` overrides only)."""
    if dry:
        preset = "demo-cpu"
        model = [
            'model_overrides.vision={name = "vit_nano_multiscan_h3"}',
            "model_overrides.text={context_length = 16}",
        ]
        model.append("batch_size=2")
    else:
        preset = "ct-rate"
        # The built-in MiniLM text tower (no CXR-BERT on the machine), locked as the preset says;
        # 16 studies per step: one GPU of the published 4 x 16.
        model = ['model_overrides.text={requires = ""}', "batch_size=16"]
    common = [
        f"data={json.dumps([str(data)])}",
        f'out="{out}"',
        f"steps={steps}",
        f"num_workers={workers}",
        "progress=false",
        "tensorboard=false",
        "log_every=10",
        f"checkpoint_every={steps}",
        "warmup_steps=1",
    ]
    sets = [x for s in [*model, *common, *settings] for x in ("--set", s)]
    return [sys.executable, "-m", "hlip.train.cli", "--config", preset, *sets]


def train_run(bench: Bench, data: Path, out: Path, settings: list[str], steps: int, workers: int) -> dict:
    """One hlip-train run; medians of its steps after the first tenth (warm-up, compilation)."""
    command = train_command(bench.dry, data, out, settings, steps, workers)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "studies_per_s" in r]
    kept = records[max(1, len(records) // 10) :] or records
    kernels = sorted(
        {
            line.split("attention backend ", 1)[1].split(" for ")[0]
            for line in done.stderr.splitlines()
            if "attention backend " in line
        }
    )
    return {
        "studies_per_s": statistics.median(r["studies_per_s"] for r in kept),
        "data_wait": statistics.median(r["data_wait"] for r in kept),
        "graphs": kept[-1].get("compiled_graphs", "-"),
        "syncs": sum("synchroniz" in line for line in done.stderr.splitlines()),
        "kernels": ", ".join(kernels) or "?",
        "wall": wall,
    }


def train_rows(bench: Bench, steps: int, workers: int, studies: int) -> list[str]:
    runs = {
        "eager sdpa (today)": ["attention=sdpa", "compile=false"],
        "compiled auto": [
            "attention=auto",
            "compile=true",
            f"compile_backend={bench.compile_backend}",
            "sync_debug=true",
        ],
    }
    rows, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shards(Path(tmp), bench.dry, studies)
        for name, settings in runs.items():
            if bench.left() < 40:
                rows.append(f"| {name} | skipped: time budget | | | | | |")
                continue
            r = train_run(bench, data, Path(tmp) / name.split()[0], settings, steps, workers)
            if "error" in r:
                rows.append(f"| {name} | failed: {r['error'][:160]} | | | | | |")
                continue
            baseline = baseline or r["studies_per_s"]
            rows.append(
                f"| {name} | {r['kernels']} | {r['studies_per_s']:.2f} | {r['studies_per_s'] / baseline:.2f}x "
                f"| {100 * r['data_wait']:.0f}% | {r['graphs']} | {r['syncs']} |"
            )
    return rows


def train_section(bench: Bench, args) -> list[str]:
    return [
        "",
        f"hlip-train, {'demo-cpu shrunk to the nano trunk' if bench.dry else 'ct-rate preset at 16 studies per step'}, "
        f"{args.train_steps} steps on {args.train_studies} synthetic studies, {args.train_workers} loader workers "
        "(medians after the first tenth of the steps):",
        "",
        "| path | kernel logged | studies/s | vs today | data wait | compiled graphs | sync warnings |",
        "|---|---|---|---|---|---|---|",
        *train_rows(bench, args.train_steps, args.train_workers, args.train_studies),
    ]


# --- the report ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, 2 steps: the plumbing only")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--train-workers", type=int, default=12)
    parser.add_argument(
        "--train-studies", type=int, default=48, help="synthetic studies written for hlip-train"
    )
    parser.add_argument("--budget-s", type=float, default=270.0, help="sections left past this are skipped")
    parser.add_argument("--skip-train", action="store_true", help="leave out the hlip-train runs")
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.train_steps, args.train_workers, args.train_studies = 1, 2, 0, 4
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run to check the plumbing on CPU)")

    bench = Bench(args)
    torch.manual_seed(0)
    model = create_vision(bench.preset).to(bench.device)
    name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU (dry run)"
    card, peak = card_peak(name) if bench.device.type == "cuda" else (name, None)
    probe = ", ".join(f"{b} {ms:.2f} ms" for b, ms in bench.probe.items()) or "no packed kernel loads"
    try:
        import xformers

        xformers_version = xformers.__version__
    except Exception:  # not installed, or built for another torch
        xformers_version = "not importable"
    lines = [
        f"#### GPU check: {name} ({card}, dense bf16 peak {peak or 'n/a'} TFLOP/s), torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), xformers {xformers_version}",
        "",
        f"Probe (one forward+backward call each): {probe}; auto picks "
        f"{attention.resolve_backend('auto', bench.device, bench.dtype) if bench.device.type == 'cuda' else 'sdpa'}.",
        "",
        f"Accuracy, {bench.dtype} autocast vs fp32 sdpa, {bench.preset}, packed studies of 1/3/8/2/5 scans "
        "of mixed grids:",
        "",
        "| backend | pooled max abs diff | gradient max abs diff | gradient diff / max abs gradient |",
        "|---|---|---|---|",
        *accuracy_rows(bench, model),
    ]
    attn_rows, level_names = attention_rows(bench, model)
    lines += [
        "",
        f"Attention kernel alone, forward+backward ms ({bench.dtype}, mean of {bench.steps}):",
        "",
        "| kernel | " + " | ".join(level_names) + " |",
        "|---|" + "---|" * len(level_names),
        *attn_rows,
    ]
    step = TrunkStep(bench, model)
    lines += [
        "",
        f"{bench.preset} forward+backward+fused AdamW, {bench.dtype} autocast, mean of {bench.steps} steps "
        f"(MFU vs {peak or 'n/a'} TFLOP/s):",
        "",
        "| scans/study | studies | backend | blocks | tokens | step ms | peak GiB | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
        *step_rows(bench, step, peak),
    ]
    packed = model.pack(make_studies(model, [8] * 4, seed=8)).to(bench.device)
    step.set_compiled(True)
    model.attn_backend = "auto"
    kinds, tops, total_ms = profile_rows(bench, step, packed)
    lines += [
        "",
        f"Compiled graphs over all of the above: {step.counter.graphs}. Host synchronisations in one "
        f"compiled auto step (8 scans x 4 studies): {host_syncs(bench, step, packed)}.",
        "",
        f"Profile of that step: {total_ms:.1f} ms of device time by kernel kind, then the longest kernels:",
        "",
        "| kind | ms | share |",
        "|---|---|---|",
        *kinds,
        "",
        "| kernel | ms | share |",
        "|---|---|---|",
        *tops,
    ]
    del packed, step
    model.cpu()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    if args.skip_train:
        lines += ["", "hlip-train runs left out (--skip-train)."]
    else:
        try:
            lines += train_section(bench, args)
        except ImportError as error:  # the machine has torch but not the data stack
            lines += ["", f"hlip-train runs not possible here: {error}"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
