"""Time of one `demo-cpu` training step (forward, backward, optimizer) under other settings
(the candidate) against demo-cpu with the baseline's settings, on the same batches of real shards.

    .venv/bin/python bench/demo_step.py TRAIN_SHARDS [--base precision=fp32] [--set precision=bf16] [--steps 6]

By default the candidate is bf16 autocast and the baseline fp32: on a CPU with bf16 matrix
instructions (AMX, AVX512-BF16) the step runs in bf16, elsewhere both run fp32 (the line
"bf16 native on this CPU" says which). HLIP's patch dropout against every patch:
``--set patch_drop_rate=0.5`` with the default baseline ``--base precision=fp32`` and
``--set precision=fp32``.

Both models start from the same weights and take the same batches, in turns (a slow spell of
the machine falls on both); the median step of each is printed, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hlip.train import checkpoint
from hlip.train.config import load_config
from hlip.train.data import DataState, build_train_loader
from hlip.train.distributed import DistInfo
from hlip.train.loop import build_optimizer, create_loss


def stepper(data: str, settings: list[str]):
    """A function running one training step of demo-cpu (with ``settings``) on a batch."""
    config = load_config("demo-cpu", [f'data=["{data}"]', "out=/tmp/hlip-demo-step", *settings]).resolve()
    torch.manual_seed(0)
    model, tokenizer = checkpoint.build_model(config, "cpu")
    model.train()
    loss_fn, optimizer = create_loss(model, DistInfo()), build_optimizer(model, config)

    def step(batch) -> float:
        start = time.perf_counter()
        loss_fn(**model(batch.packed, batch.tokens)).backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    return step, config, tokenizer, model.visual.trunk.patch_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("train")
    parser.add_argument("--base", action="append", help="baseline setting key=value (default precision=fp32)")
    parser.add_argument("--set", action="append", help="candidate setting key=value (default precision=bf16)")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    base, candidate = args.base or ["precision=fp32"], args.set or ["precision=bf16"]
    runs = {" ".join(base): stepper(args.train, base), " ".join(candidate): stepper(args.train, candidate)}
    _, config, tokenizer, patch_size = next(iter(runs.values()))
    loader = iter(build_train_loader(config, tokenizer, patch_size, 0, 1, DataState(), False))
    batches = [next(loader) for _ in range(args.steps + 1)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i, batch in enumerate(batches):
        for name, (step, *_) in runs.items():
            seconds = step(batch)
            if i:  # the first step of each warms up
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"bf16 native on this CPU: {checkpoint.native_bf16('cpu')}")
    for name, seconds in medians.items():
        print(f"{name:36s} {seconds:.2f} s/step (median of {args.steps}, {torch.get_num_threads()} threads)")
    base_time, candidate_time = medians.values()
    print(f"candidate / baseline: {candidate_time / base_time:.2f}x")


if __name__ == "__main__":
    main()
