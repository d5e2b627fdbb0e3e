"""Text-tower cost of padding, and of encoding a sentence that several reports share more than
once, on real reports.

A training step runs the text tower over a batch of reports; with every batch padded to the
context length the encoder also computes every padding position. Mean and CLS pooling ignore
padding (attention-mask aware), so both paddings give the same features; this prints the
forward+backward time of each over the same batches, their ratio, and the largest feature
difference.

Then the demo's text recipe (each report the mean of its sentences, measurements dropped),
embedded as evaluation embeds reports and prompts (no gradient, no dropout): every sentence of
the batch encoded (the baseline) against each distinct sentence encoded once and shared by the
reports that hold it (what ``TextTower`` does outside training).

    .venv/bin/python bench/text.py REPORTS.csv [--column report] [--sections findings]

REPORTS.csv: any report table, e.g. the ``reports.csv`` that ``hlip-ingest synth`` writes.
Two towers: the demo's (built-in MiniLM, mean pooling, last two layers trained, 96 tokens as
the demo-cpu preset) and a BERT-base of the published presets' shape (config only, CLS
pooling, fully trained, 256 tokens as hlip-brain-mri; random weights time the same).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow.csv as pacsv
import torch
from transformers import BertConfig

from hlip.model.text import TextTower, Tokenizer
from hlip.train.data import select_sections

TOWERS = {
    "demo (MiniLM, 2 of 6 layers trained)": dict(context=96, pooling="mean", unlocked=2),
    "published shape (BERT-base, all trained)": dict(context=256, pooling="cls", unlocked=None),
}


def build_tower(name: str) -> TextTower:
    spec = TOWERS[name]
    torch.manual_seed(0)
    if spec["unlocked"] is None:
        return TextTower.from_config(BertConfig(), 512, spec["pooling"])
    tower = TextTower.from_pretrained(None, 128, spec["pooling"])
    tower.lock(spec["unlocked"])
    return tower


def padded_to_context(tokenizer: Tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """The baseline: every batch padded to the full context length (a static shape)."""
    encoded = tokenizer.tokenizer(
        texts, padding="max_length", truncation=True, max_length=tokenizer.context_length, return_tensors="pt"
    )
    return {key: encoded[key].long() for key in ("input_ids", "attention_mask")}


def every_sentence(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The baseline of sentence-mean reports: one row per sentence of each report, repeated
    wordings included (the rows the tower encodes in training)."""
    rows = tokens["sentence_rows"]
    return {
        "input_ids": tokens["input_ids"][rows],
        "attention_mask": tokens["attention_mask"][rows],
        "text_index": tokens["text_index"],
    }


def step_seconds(
    tower: TextTower, batches: list[dict[str, torch.Tensor]], repeats: int, backward: bool = True
) -> float:
    """Median over ``repeats`` passes of the mean forward(+backward) time per batch."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for tokens in batches:
            features = tower(**tokens)
            if backward:
                features.pow(2).sum().backward()
        times.append((time.perf_counter() - start) / len(batches))
    tower.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reports")
    parser.add_argument("--column", default="report")
    parser.add_argument("--sections", nargs="*", default=["findings"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    column = pacsv.read_csv(args.reports).column(args.column).to_pylist()
    texts = [select_sections(text, args.sections) for text in column if text]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(texts), (args.batches, args.batch), replace=len(texts) < args.batches * args.batch)
    print(f"{len(texts)} reports, {args.batches} batches of {args.batch}, forward+backward per batch:")
    print(
        "| tower | tokens per report (median / max) | padded to context | padded to longest | ratio | max feature diff |"
    )
    print("|---|---|---|---|---|---|")
    for name, spec in TOWERS.items():
        tower = build_tower(name).train()
        tokenizer = Tokenizer(None, spec["context"])
        lengths = tokenizer([texts[i] for i in picks.ravel()])["attention_mask"].sum(1).tolist()
        fixed_batches = [padded_to_context(tokenizer, [texts[i] for i in batch]) for batch in picks]
        longest_batches = [tokenizer([texts[i] for i in batch]) for batch in picks]
        tower.eval()
        with torch.no_grad():
            diff = max(
                float((tower(**a) - tower(**b)).abs().max())
                for a, b in zip(fixed_batches, longest_batches, strict=True)
            )
        tower.train()
        step_seconds(tower, fixed_batches[:1], 1)  # warm-up
        slow = step_seconds(tower, fixed_batches, args.repeats)
        fast = step_seconds(tower, longest_batches, args.repeats)
        print(
            f"| {name}, {spec['context']} tokens | {statistics.median(lengths):.0f} / {max(lengths)} | "
            f"{slow * 1e3:.0f} ms | {fast * 1e3:.0f} ms | **{slow / fast:.2f}x** | {diff:.1e} |"
        )
    batches = [[texts[i] for i in batch] for batch in picks]
    sentence_batches(batches, args.repeats)


def sentence_batches(batches: list[list[str]], repeats: int) -> None:
    """The demo's sentence-mean reports embedded for evaluation: every sentence encoded against
    each distinct one once."""
    tower = build_tower("demo (MiniLM, 2 of 6 layers trained)").eval()
    tokenizer = Tokenizer(None, TOWERS["demo (MiniLM, 2 of 6 layers trained)"]["context"], True, True)
    distinct = [tokenizer(batch) for batch in batches]
    every = [every_sentence(tokens) for tokens in distinct]
    with torch.no_grad():
        diff = max(float((tower(**a) - tower(**b)).abs().max()) for a, b in zip(every, distinct, strict=True))
        step_seconds(tower, every[:1], 1, backward=False)  # warm-up
        slow = step_seconds(tower, every, repeats, backward=False)
        fast = step_seconds(tower, distinct, repeats, backward=False)
    rows = sum(len(t["text_index"]) for t in every), sum(len(t["input_ids"]) for t in distinct)
    print("\nDemo recipe (sentence mean, measurements dropped), embedding per batch (evaluation):")
    print(
        "| sentences per batch (all / distinct) | every sentence | distinct sentences once | ratio | max feature diff |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {rows[0] / len(batches):.0f} / {rows[1] / len(batches):.0f} | {slow * 1e3:.0f} ms | "
        f"{fast * 1e3:.0f} ms | **{slow / fast:.2f}x** | {diff:.1e} |"
    )


if __name__ == "__main__":
    main()
