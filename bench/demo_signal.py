"""Where the demo's zero-shot AUC is lost: the data, the vision trunk, or the text tower.

Three upper bounds per planted finding, on held-out synthetic studies, for the demo recipe
(the demo-cpu preset's transforms and crops):

* **histogram**: logistic regression on intensity histograms of the evaluation crops (is the
  finding in the voxels at all, at the demo's grid?);
* **crop medians**: the same on each crop's median alone (is the finding visible in a crop's
  overall brightness, which a lesion can set through the intensity normalisation? a trunk can
  then learn it without ever finding the lesion);
* **supervised**: the demo's vision trunk trained with the labels (masked BCE) instead of
  reports, for ``--steps`` steps, scored every 50 (can this trunk learn the finding in the
  budget, whatever the text side does?);
* **report text**: the pretrained MiniLM embedding of each held-out report's findings against
  the finding's prompts (how well the frozen text encoder separates positive from negative
  reports; zero-shot can only approach this through the image);
* **trained image embeddings** (``--checkpoint``, e.g. the demo's ``run/checkpoints/last.pt``):
  logistic regression on that model's image embeddings, fit on the training studies and scored
  on the held-out ones: what any prompts and text tower could get out of its image side, to
  set beside its zero-shot AUC; the same on its report embeddings (does the tuned text
  tower still hold each finding at all?); and its held-out report embeddings scored along the
  prompts' directions and along the training reports' directions (positive minus negative
  mean), without a fit (do the prompts point where the tuned reports put the finding?); and
  its held-out image embeddings scored the same two ways (is the image side aligned with the
  reports' finding directions, and with the prompts'?).

    python bench/demo_signal.py TRAIN_SHARDS HELDOUT_SHARDS [--steps 300] [--set key=value ...]
                                [--checkpoint CKPT] [--prompts TOML] [--template-set NAME]

The prompts are the demo's (the shipped prompt set synth, each phrase in a findings-section
context); ``--template-set sentence`` scores with the bare phrases.

The shards come from `hlip-ingest run` on `hlip-ingest synth` archives (see scripts/demo.sh).
On a GPU machine the supervised part runs there (``--device cuda``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hlip.evaluate.embed import embed_dataset, load_model, text_encoder
from hlip.evaluate.grounding import similarity_encoder
from hlip.evaluate.labels import binary_targets
from hlip.evaluate.prompts import PromptSet, load_prompts
from hlip.evaluate.zeroshot import SentenceBank
from hlip.shards.reader import ShardDataset
from hlip.synth import FINDINGS
from hlip.train.checkpoint import build_model
from hlip.train.config import load_config
from hlip.train.data import StudyTransform, select_sections

LABELS = list(FINDINGS)
"""The findings scored: those of :data:`FINDINGS` that both the training and the held-out
studies carry (narrowed in ``main``; a chest + brain archive has no CT-head labels)."""


def load_studies(path: str) -> list:
    dataset = ShardDataset(path)
    keys = dataset.keys()
    return [dataset[key] for key in keys]


def label_matrix(labels: list[dict]) -> np.ndarray:
    """[N, findings] of 0/1 from per-study label dicts, NaN where a study has no such label
    (the other modality)."""
    return np.stack([binary_targets(labels, label) for label in LABELS], axis=1)


def targets(studies) -> np.ndarray:
    return label_matrix([study.labels for study in studies])


def aucs(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    out = {}
    for j, label in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        out[label] = roc_auc_score(y[known, j], scores[known, j])
    return out


def probe_aucs(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, y_held: np.ndarray) -> dict:
    """Per finding, a standardised logistic regression fit on the training studies that have
    the label, scored on the held-out ones."""
    scores = np.zeros(y_held.shape)
    for j in range(len(LABELS)):
        known = ~np.isnan(y_train[:, j])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        scores[:, j] = model.fit(x_train[known], y_train[known, j]).decision_function(x_held)
    return aucs(y_held, scores)


HISTOGRAM_EDGES = np.append(np.linspace(-2.2, 2.5, 49), np.inf)
"""Standardised intensity bins: 48 over the [0, 1] range, one for anything brighter (MR voxels
kept above the upper percentile by ``mr_ceiling``)."""


def crop_features(studies, transform, summary) -> np.ndarray:
    """[N, 3 * k]: ``summary`` (k numbers) of each of a study's first three evaluation crops,
    the last one repeated for studies with fewer."""
    rows = []
    for study in studies:
        parts = [summary(crop.tensor().numpy()) for crop in transform(study)["scans"][:3]]
        rows.append(np.concatenate(parts + [parts[-1]] * (3 - len(parts))))
    return np.array(rows)


def intensity_bounds(train, heldout, transform) -> dict[str, dict[str, float]]:
    """Logistic regression on each crop's intensity histogram (are the findings in the voxels?)
    and on each crop's median alone (can a finding be told from the crop's overall brightness,
    which a lesion can shift through the intensity normalisation, without finding the lesion?)."""
    summaries = {
        "histogram": lambda t: np.histogram(t, bins=HISTOGRAM_EDGES)[0] / t.size,
        "median": lambda t: np.array([np.median(t)]),
    }
    y_train, y_held = targets(train), targets(heldout)
    return {
        name: probe_aucs(
            crop_features(train, transform, f), y_train, crop_features(heldout, transform, f), y_held
        )
        for name, f in summaries.items()
    }


def trained_bounds(
    checkpoint: str, train_path: str, heldout_path: str, prompts: PromptSet
) -> dict[str, dict[str, float]]:
    """Logistic regression on the trained model's image embeddings, and on its report
    embeddings (studies with a report), fit on the training studies, scored on the held-out;
    and the held-out report and image embeddings scored without a fit, along the prompt
    directions (what zero-shot asks of them) and along the training reports' finding
    directions (images along those: is the image side aligned with what the reports say,
    whatever the prompts?)."""
    loaded = load_model(checkpoint)
    train, heldout = embed_dataset(loaded, train_path), embed_dataset(loaded, heldout_path)
    y_train, y_held = label_matrix(train.labels), label_matrix(heldout.labels)
    bounds = {}
    for side in ("image", "report"):
        fit = train.has_report if side == "report" else np.ones(len(train), bool)
        held = heldout.has_report if side == "report" else np.ones(len(heldout), bool)
        bounds[side] = probe_aucs(
            getattr(train, side)[fit], y_train[fit], getattr(heldout, side)[held], y_held[held]
        )
    reports, y_reports = unit(heldout.report[heldout.has_report]), y_held[heldout.has_report]
    along_prompts = prompt_directions(text_encoder(loaded), prompts)
    along_reports = report_directions(train.report[train.has_report], y_train[train.has_report])
    for side, embeddings, y in (("report", reports, y_reports), ("image", unit(heldout.image), y_held)):
        bounds[f"{side}_prompts"] = aucs(y, embeddings @ along_prompts)
        bounds[f"{side}_directions"] = aucs(y, embeddings @ along_reports)
    return bounds


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def prompt_directions(embed, prompts: PromptSet) -> np.ndarray:
    """[E, findings]: per finding, the class embedding of its positive phrases minus that of its
    negative ones, in the label's templates (the direction zero-shot scores along)."""
    bank, labels = SentenceBank.for_prompts(embed, prompts), {b.name: b for b in prompts.binary}
    directions = []
    for name in LABELS:
        label = labels[name]
        positive, negative = bank.class_embeddings([label.positive, label.negative], label.templates).mean(1)
        directions.append(positive - negative)
    return np.stack(directions, axis=1)


def report_directions(reports: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[E, findings]: per finding, the mean unit embedding of the reports stating it minus that
    of the reports negating it."""
    reports = unit(reports)
    return np.stack(
        [reports[y[:, j] == 1].mean(0) - reports[y[:, j] == 0].mean(0) for j in range(len(LABELS))], axis=1
    )


def supervised_bound(train, heldout, config, steps: int, device: str) -> list[tuple[int, dict]]:
    torch.manual_seed(config.seed)
    trunk = build_model(config, pretrained_text=False)[0].visual.trunk.to(device)
    head = torch.nn.Linear(trunk.embed_dim, len(LABELS)).to(device)
    params = [*trunk.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, pct_start=0.05)
    train_tf, eval_tf = StudyTransform(config, train=True), StudyTransform(config, train=False)
    y_train, y_held = targets(train), targets(heldout)
    held_scans = [eval_tf(study)["scans"] for study in heldout]
    rng, curve = np.random.default_rng(config.seed), []

    def logits(scans):
        return head(trunk.forward_packed(trunk.pack(scans).to(device)))

    for step in range(1, steps + 1):
        batch = rng.choice(len(train), config.batch_size, replace=False)
        y = torch.tensor(y_train[batch], dtype=torch.float32, device=device)
        z = logits([train_tf(train[i], step)["scans"] for i in batch])
        known = ~torch.isnan(y)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z[known], y[known])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            trunk.eval()
            with torch.no_grad():
                scores = torch.cat([logits(held_scans[i : i + 16]).cpu() for i in range(0, len(heldout), 16)])
            trunk.train()
            curve.append((step, aucs(y_held, scores.numpy())))
            print(f"  supervised step {step}: " + row(curve[-1][1]), flush=True)
    return curve


def report_text_bound(heldout, prompts: PromptSet) -> dict[str, float]:
    embed = similarity_encoder()
    with_report = [s for s in heldout if s.report.strip()]
    reports = embed([select_sections(s.report, ["findings"]) or s.report for s in with_report])
    return aucs(targets(with_report), reports @ prompt_directions(embed, prompts))


def row(values: dict[str, float]) -> str:
    return (
        " ".join(f"{values[label]:.2f}" for label in LABELS)
        + f" | macro {np.mean(list(values.values())):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("train")
    parser.add_argument("heldout")
    parser.add_argument("--steps", type=int, default=300, help="supervised steps (0: skip that bound)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="demo-cpu config override, key=value")
    parser.add_argument("--checkpoint", help="a trained model whose image embeddings to probe")
    parser.add_argument("--prompts", default="synth", help="the zero-shot prompts")
    parser.add_argument("--template-set", help="one template set for every label (e.g. sentence)")
    args = parser.parse_args()
    prompts = load_prompts(args.prompts, template_set=args.template_set)
    config = load_config("demo-cpu", [f'data=["{args.train}"]', *args.set]).resolve()
    train, heldout = load_studies(args.train), load_studies(args.heldout)
    present = (~np.isnan(targets(train))).any(axis=0) & (~np.isnan(targets(heldout))).any(axis=0)
    LABELS[:] = [label for label, kept in zip(LABELS, present, strict=True) if kept]
    print(f"{len(train)} training and {len(heldout)} held-out studies; AUC per finding:")
    print("  " + " ".join(LABELS))
    intensity = intensity_bounds(train, heldout, StudyTransform(config, False))
    print("  histogram + logistic regression: " + row(intensity["histogram"]))
    print("  crop medians + LR (no lesion):   " + row(intensity["median"]))
    print("  report text (frozen MiniLM):     " + row(report_text_bound(heldout, prompts)))
    if args.checkpoint:
        bounds = trained_bounds(args.checkpoint, args.train, args.heldout, prompts)
        print("  trained image embeddings + LR:   " + row(bounds["image"]))
        print("  trained report embeddings + LR:  " + row(bounds["report"]))
        print("  trained reports vs prompts:      " + row(bounds["report_prompts"]))
        print("  trained reports vs report dirs:  " + row(bounds["report_directions"]))
        print("  trained images vs prompts:       " + row(bounds["image_prompts"]))
        print("  trained images vs report dirs:   " + row(bounds["image_directions"]))
    if args.steps:
        supervised_bound(train, heldout, config, args.steps, args.device)


if __name__ == "__main__":
    main()
