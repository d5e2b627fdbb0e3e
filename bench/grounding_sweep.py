"""Zero-shot macro AUC with prompts grounded in the training reports, over the grounding's
settings, against the prompts as written, for one or more trained models.

    python bench/grounding_sweep.py TRAIN_SHARDS VAL_SHARDS HELDOUT_SHARDS --model RUN [--model RUN ...]
                                    [--prompts synth]

For each model it builds the grounding corpus from TRAIN_SHARDS' reports once, embeds the
validation and held-out studies once, and scores both with every combination of
``NEIGHBOURS`` (sentences a class gains at most) and ``KEEP`` (share of the best sentence's
relevance a sentence needs), plus the prompts alone, the shipped setting with other values of
``SHARED`` (0: a sentence grounds every label it is relevant enough to; 1: only the label it is
most relevant to; shipped: also labels within that share of it), the shipped setting without
report prototypes (each class its prompt plus grounded sentences; ``MIN_REPORTS`` out of
reach), and one diagnostic row: the shipped grounding with each binary label's
direction (positive minus negative class embedding, along which its two-prompt softmax ranks
studies) made orthogonal to the other labels' directions, which shows how much a finding's
score rises with the other findings. It also prints, per
model, what building the grounding corpus costs against embedding the held-out studies (the
baseline: what every evaluation pays). Choose the settings on the validation
studies (another draw than the held-out ones), then read the held-out column: the shipped
settings of :mod:`hlip.evaluate.grounding` were chosen that way (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import numpy as np

from hlip.evaluate import grounding
from hlip.evaluate.embed import embed_dataset, load_model, text_encoder
from hlip.evaluate.labels import binary_targets
from hlip.evaluate.metrics import MetricWarning, roc_auc
from hlip.evaluate.prompts import load_prompts
from hlip.evaluate.zeroshot import SentenceBank, l2_normalize, run_zeroshot

NEIGHBOURS = (3, 5, 8, 12)
KEEP = (0.0, 0.8, 0.9)
EVERY_LABEL = "each sentence grounding every label it is relevant enough to"
SENTENCES_ONLY = "shipped, without report prototypes (prompt and grounded sentences)"
SHARED_ROWS = {
    0.0: f"shipped, {EVERY_LABEL}",
    1.0: "shipped, each sentence grounding only the label it is most relevant to",
}


def setting(neighbours: int, keep: float) -> str:
    """The row name of one NEIGHBOURS / KEEP setting."""
    return f"{neighbours} sentences, keep {keep}"


def aucs(embeddings, prompts, encode, scale, corpus) -> dict[str, float]:
    """Zero-shot AUC per binary label and their macro ("macro")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        result = run_zeroshot(
            embeddings.image, embeddings.labels, prompts, encode, scale, corpus=corpus, n_boot=0
        )
    per_label = {name: m["auc"]["value"] for name, m in result.metrics["binary"].items()}
    return {"macro": result.metrics["macro"]["auc"]["value"], **per_label}


def orthogonal_aucs(embeddings, prompts, encode, corpus) -> dict[str, float]:
    """AUC per label (and "macro") along each label's grounded direction minus its projection
    on the others'."""
    bank = SentenceBank.for_prompts(encode, prompts, corpus)
    labels = [label for label in prompts.binary if label.has_negative]
    directions = []
    for label in labels:
        negative, positive = l2_normalize(
            bank.class_embeddings([label.negative, label.positive], label.templates).mean(1)
        )
        directions.append(positive - negative)
    directions, image, per_label = np.array(directions), l2_normalize(embeddings.image), {}
    for k, label in enumerate(labels):
        others = np.delete(directions, k, axis=0).T
        own = directions[k] - others @ np.linalg.lstsq(others, directions[k], rcond=None)[0]
        y = binary_targets(embeddings.labels, label.column)
        known = ~np.isnan(y)
        per_label[label.name] = float(roc_auc(y[known], (image @ own)[known]))
    return {"macro": float(np.mean(list(per_label.values()))), **per_label}


def sweep(run: str, train: str, sets: dict[str, str], prompts) -> dict[str, dict[str, dict[str, float]]]:
    """{setting: {split: {label or "macro": AUC}}} for one model."""
    loaded = load_model(run)
    encode = text_encoder(loaded)
    start = time.perf_counter()
    corpus = grounding.model_corpus(loaded, [train])
    corpus_s = time.perf_counter() - start
    embedded = {}
    for split, path in sets.items():
        start = time.perf_counter()
        embedded[split] = embed_dataset(loaded, path)
        embed_s = time.perf_counter() - start
    print(f"{run}: grounding corpus {corpus_s:.1f} s ({corpus.info['sentences']} distinct sentences of "
          f"{corpus.info['reports']} reports) against embedding the {len(embedded[split])} {split} studies "
          f"{embed_s:.1f} s: {corpus_s / embed_s:.2f}x")  # fmt: skip
    scale = loaded.logit_scale
    rows = {"prompts alone": {s: aucs(e, prompts, encode, scale, None) for s, e in embedded.items()}}
    shipped = grounding.NEIGHBOURS, grounding.KEEP, grounding.SHARED, grounding.MIN_REPORTS
    try:
        for grounding.NEIGHBOURS, grounding.KEEP in itertools.product(NEIGHBOURS, KEEP):
            rows[setting(grounding.NEIGHBOURS, grounding.KEEP)] = {
                s: aucs(e, prompts, encode, scale, corpus) for s, e in embedded.items()
            }
        grounding.NEIGHBOURS, grounding.KEEP = shipped[:2]
        for grounding.SHARED, name in SHARED_ROWS.items():
            rows[name] = {s: aucs(e, prompts, encode, scale, corpus) for s, e in embedded.items()}
        grounding.SHARED, grounding.MIN_REPORTS = shipped[2], len(corpus.reports) + 1
        rows[SENTENCES_ONLY] = {s: aucs(e, prompts, encode, scale, corpus) for s, e in embedded.items()}
    finally:
        grounding.NEIGHBOURS, grounding.KEEP, grounding.SHARED, grounding.MIN_REPORTS = shipped
    rows["shipped, directions orthogonal to the other labels'"] = {
        s: orthogonal_aucs(e, prompts, encode, corpus) for s, e in embedded.items()
    }
    return rows


def cell(results: list[dict], name: str, split: str, label: str = "macro") -> str:
    """Mean over the models (and each model's value) of one setting, split and label."""
    values = [r[name][split][label] for r in results]
    return f"{np.mean(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("train")
    parser.add_argument("val")
    parser.add_argument("heldout")
    parser.add_argument("--model", action="append", required=True, help="trained run directory (repeatable)")
    parser.add_argument("--prompts", default="synth")
    args = parser.parse_args()
    prompts = load_prompts(args.prompts)
    results = [
        sweep(run, args.train, {"val": args.val, "held-out": args.heldout}, prompts) for run in args.model
    ]
    shipped = setting(grounding.NEIGHBOURS, grounding.KEEP)
    print(f"macro AUC over {len(args.model)} model(s): mean (per model), shipped setting {shipped}")
    print("| setting | validation | held-out |\n|---|---|---|")
    for name in results[0]:
        print(f"| {name} | {cell(results, name, 'val')} | {cell(results, name, 'held-out')} |")
    print(
        f"\nper finding, shipped (SHARED = {grounding.SHARED}) against {EVERY_LABEL}, and without report prototypes:"
    )
    print("| finding | split | shipped | every label | without prototypes |\n|---|---|---|---|---|")
    for label in (label.name for label in prompts.binary if label.has_negative):
        for split in ("val", "held-out"):
            print(f"| {label} | {split} | {cell(results, shipped, split, label)} | {cell(results, SHARED_ROWS[0.0], split, label)} | {cell(results, SENTENCES_ONLY, split, label)} |")  # fmt: skip


if __name__ == "__main__":
    main()
