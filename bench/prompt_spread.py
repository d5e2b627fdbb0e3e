"""How much zero-shot AUC hangs on the prompts' phrasing: several ways a user could write the
same findings, scored on the same held-out studies with the same model(s).

    python bench/prompt_spread.py HELDOUT_SHARDS --model RUN [--model RUN2 ...] [--ground TRAIN_SHARDS] [--json OUT]

Phrasings (each a full prompt set over the synth findings; the positive and negative phrases
of a label always differ only by the finding):

* ``plain``: the shipped ``synth`` prompts, plain clinical phrases ("Pulmonary nodule." /
  "No pulmonary nodules."): the default;
* ``plain + size``: the same phrases with a typical size for the focal lesions
  ("Pulmonary nodule of 30 mm.");
* ``report``: sentences in the style of radiology reports, with a side and lobe but no size
  ("There is a pulmonary nodule in the right upper lobe.");
* ``report + size``: the same with a size ("A 30 mm solid nodule in the right upper lobe.");
* ``plain in context``: the plain phrase followed by normal findings of its modality, the text
  around a finding in a report;
* ``plain, positive only``: the plain positive phrases without negatives, scored by their
  cosine similarity to the study (HLIP's protocol for RSNA and CQ500).

With ``--ground``, every phrasing is grounded in the reports of those shards (the model's
training shards: what ``hlip-eval run`` does by default, docs/evaluation.md §4).

The sizes are fixed typical values (nodule 30 mm, mass 40 mm, hematoma 40 mm), not the held-out
studies' sizes. Prints per model a table of AUC per finding and phrasing, and the spread (max -
min) per finding over the phrasings.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from hlip.evaluate.embed import embed_dataset, load_model, text_encoder
from hlip.evaluate.grounding import model_corpus
from hlip.evaluate.prompts import load_prompts, parse_prompts
from hlip.evaluate.zeroshot import run_zeroshot
from hlip.synth import FINDINGS

REPORT = {  # label: (positive without size, positive with size, negative)
    "lung_nodule": (
        "There is a pulmonary nodule in the right upper lobe.",
        "A 30 mm solid nodule in the right upper lobe.",
        "There is no evidence of a pulmonary nodule.",
    ),
    "pleural_effusion": (
        "There is a moderate right pleural effusion.",
        "There is a moderate right pleural effusion.",
        "There is no evidence of pleural effusion.",
    ),
    "emphysema": (
        "There is moderate centrilobular emphysema.",
        "There is moderate centrilobular emphysema.",
        "There is no evidence of emphysema.",
    ),
    "mass": (
        "There is a left parietal mass with vasogenic edema.",
        "There is a 40 mm left parietal mass with vasogenic edema.",
        "There is no evidence of a mass lesion.",
    ),
    "hemorrhage": (
        "There is a right frontal hematoma.",
        "There is a 40 mm right frontal hematoma.",
        "There is no evidence of hemorrhage.",
    ),
    "hydrocephalus": (
        "The lateral ventricles are enlarged, consistent with hydrocephalus.",
        "The lateral ventricles are enlarged, consistent with hydrocephalus.",
        "The ventricles are normal in size.",
    ),
}
SIZE = {"lung_nodule": " of 30 mm", "mass": " of 40 mm", "hemorrhage": " of 40 mm"}
CONTEXT = {
    "CT": "The heart is normal in size. No mediastinal or hilar lymphadenopathy. The osseous structures are unremarkable.",
    "MR": "No midline shift. The cerebellum and brainstem are normal. The orbits are unremarkable.",
}


def phrasings() -> dict[str, dict]:
    """Each phrasing as a prompts-file mapping over the shipped synth labels."""
    plain = load_prompts("synth")
    out = {}
    for name in (
        "plain",
        "plain + size",
        "report",
        "report + size",
        "plain in context",
        "plain, positive only",
    ):
        labels = {}
        for label in plain.binary:
            modality = FINDINGS[label.name].modality
            if name.startswith("report"):
                positive, sized, negative = REPORT[label.name]
                spec = {"positive": [sized if name.endswith("size") else positive], "negative": [negative]}
            elif name == "plain + size":
                grow = SIZE.get(label.name, "")
                spec = {
                    "positive": [p.rstrip(".") + grow + "." for p in label.positive],
                    "negative": list(label.negative),
                }
            else:
                spec = {"positive": list(label.positive), "negative": list(label.negative)}
            if name == "plain, positive only":
                del spec["negative"]
            if name == "plain in context":
                spec["templates"] = ["{} " + CONTEXT[modality]]
            labels[label.name] = spec
        out[name] = {"version": 1, "name": name, "templates": ["{}"], "labels": labels}
    return out


def spread(model: str, heldout: str, ground: str | None) -> dict[str, dict[str, float]]:
    """AUC per phrasing and finding (and macro) for one model on the held-out shards."""
    loaded = load_model(model)
    embeddings = embed_dataset(loaded, heldout)
    encode = text_encoder(loaded)
    corpus = model_corpus(loaded, [ground]) if ground else None
    table = {}
    for name, spec in phrasings().items():
        result = run_zeroshot(
            embeddings.image,
            embeddings.labels,
            parse_prompts(spec, source=name),
            encode,
            loaded.logit_scale,
            corpus=corpus,
            n_boot=200,
        )
        row = {label: m["auc"]["value"] for label, m in result.metrics["binary"].items()}
        row["macro"] = result.metrics["macro"]["auc"]["value"]
        table[name] = row
    return table


def print_table(model: str, table: dict[str, dict[str, float]]) -> None:
    columns = list(next(iter(table.values())))
    print(f"\n{model}")
    print("| phrasing | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    ranges = [np.ptp([row[c] for row in table.values()]) for c in columns]
    print("| spread (max - min) | " + " | ".join(f"{r:.3f}" for r in ranges) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("heldout", help="held-out shard dataset")
    parser.add_argument(
        "--model", action="append", required=True, help="trained run or model folder (repeatable)"
    )
    parser.add_argument("--ground", help="shards whose reports ground the prompts (the training shards)")
    parser.add_argument("--json", help="write all tables to this file")
    args = parser.parse_args()
    tables = {}
    for model in args.model:
        tables[model] = spread(model, args.heldout, args.ground)
        print_table(model, tables[model])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=2)


if __name__ == "__main__":
    main()
